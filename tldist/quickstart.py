"""``tldist demo``: the embedded default job, real transfer learning on a CPU machine.

1. Writes shards: a procedurally rendered *printed letters* source set (26 classes) and
   scikit-learn's *handwritten digits* target set (10 classes, real handwriting).
2. Pretrains a torchvision backbone from scratch on letters (``configs/demo_source.yaml``).
3. Fine-tunes it on digits (``configs/demo_target.yaml``) and, at the same budget, trains the
   same architecture on digits from scratch; prints both top-1 accuracies.

Every training stage runs under ``accelerate launch`` with ``configs/accelerate/cpu.yaml``
(or ``ddp.yaml`` when GPUs are present).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tldist.errors import UserError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SCRATCH_RECIPE = ["optim.lr=4.0e-3", "transfer.layer_decay=1.0", "transfer.head_lr_mult=1.0"]
"""Overrides of ``demo_target.yaml`` for the from-scratch baseline (see :func:`run_demo`)."""


def launch_command(config: Path, overrides: list[str], processes: int) -> list[str]:
    """The ``accelerate launch`` command line for one training stage."""
    import torch

    acc = CONFIGS / "accelerate" / ("ddp.yaml" if torch.cuda.is_available() else "cpu.yaml")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(acc),
            "--num_processes", str(processes), "--main_process_port", str(_free_port()),
            "-m", "tldist.cli", "train", str(config), *overrides]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(name: str, config: Path, overrides: list[str], processes: int, log_dir: Path) -> dict:
    cmd = launch_command(config, overrides, processes)
    log_file = log_dir / f"{name}.log"
    print(f"[demo] {name}: {' '.join(cmd[2:])}\n[demo]   log: {log_file}", flush=True)
    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log_file, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-25:])
        raise UserError(f"demo stage '{name}' failed (exit {proc.returncode}); last lines of {log_file}:\n{tail}")
    out_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir="))
    result = json.loads((Path(out_dir) / "result.json").read_text())
    result["seconds"] = round(time.time() - t0, 1)
    print(f"[demo]   {name}: top-1 {result.get('eval/top1', float('nan')):.2f}% in {result['seconds']} s", flush=True)
    return result


def run_demo(out: str | Path = "demo_out", *, processes: int = 2, quick: bool = False) -> dict:
    """Run the whole demo; returns ``{"transfer": top1, "scratch": top1, ...}`` and writes it to JSON."""
    from tldist.data.demo import write_demo_shards

    out = Path(out).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    shards = out / "shards"
    write_demo_shards(shards, **({"source_per_class": 40} if quick else {}))
    print(f"[demo] shards ready in {shards} ({time.time() - t0:.1f} s)", flush=True)
    budget = ["train.epochs=1", "train.max_steps=4"] if quick else []
    common = [f"data.val={shards}/target/val", f"data.train=[{shards}/target/train]"]
    source = _train("pretrain-letters", CONFIGS / "demo_source.yaml",
                    [f"output_dir={out}/runs/source", f"data.train=[{shards}/source/train]",
                     f"data.val={shards}/source/val", *budget], processes, logs)
    best = out / "runs" / "source" / "checkpoints"
    ckpt = json.loads((best / "best.json").read_text())["dir"] if (best / "best.json").is_file() else None
    if ckpt is None:
        raise UserError(f"pretraining left no best checkpoint in {best}")
    transfer = _train("finetune-digits", CONFIGS / "demo_target.yaml",
                      [f"output_dir={out}/runs/transfer", f"model.checkpoint={best / ckpt}", *common, *budget],
                      processes, logs)
    # The baseline gets the recipe that trains this network from scratch (the pretraining stage's
    # learning rate, no layer-wise decay), not the gentler fine-tuning one: a fair comparison.
    scratch = _train("scratch-digits", CONFIGS / "demo_target.yaml",
                     [f"output_dir={out}/runs/scratch", "model.pretrained=false", *SCRATCH_RECIPE, *common, *budget],
                     processes, logs)
    summary = {"source_top1": source.get("eval/top1"), "transfer_top1": transfer.get("eval/top1"),
               "scratch_top1": scratch.get("eval/top1"), "seconds": round(time.time() - t0, 1),
               "processes": processes}
    (out / "demo_results.json").write_text(json.dumps(summary, indent=1))
    print("\n[demo] target: handwritten digits (scikit-learn), same budget for both runs")
    print(f"[demo]   fine-tuned from letters : top-1 {summary['transfer_top1']:.2f}%")
    print(f"[demo]   trained from scratch    : top-1 {summary['scratch_top1']:.2f}%")
    print(f"[demo] total {summary['seconds']} s; results in {out / 'demo_results.json'}")
    return summary
