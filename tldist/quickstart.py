"""``tldist demo``: the embedded default job, real transfer learning on a CPU machine.

1. Writes shards: printed digits rendered from matplotlib's fonts in the look of the target
   (:mod:`tldist.data.glyphs`, the source, 10 classes) and scikit-learn's *handwritten digits*
   (the target, real handwriting), see :mod:`tldist.data.demo`.
2. Pretrains a torchvision backbone from scratch on the printed digits (``configs/demo_source.yaml``).
3. Runs a label-budget study on the handwritten digits (``tldist study`` with
   ``configs/demo_target.yaml``): fine-tuning and a linear probe from the pretrained backbone
   against training from scratch, at 1, 5, 10 and all labels per class, 3 seeds, equal
   optimizer steps per arm; its table (``summary.md``), rows (``results.csv``) and plot
   (``study.png``) land in ``<out>/study/`` and the table is printed at the end.

Every stage runs under ``accelerate launch`` with ``configs/accelerate/cpu.yaml`` (or
``ddp.yaml`` when GPUs are present)."""

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
STUDY = ["--labels-per-class", "1,5,10,all", "--arms", "finetune,probe,scratch", "--seeds", "0,1,2",
         "--min-steps", "40", "--epochs", "3", "--scratch-lr-grid", "4e-3,8e-3", "--scratch-warmup-grid", "0.1"]
"""The demo's label-budget study on the target (``tldist study`` flags): 40 optimizer steps per cell at
k <= 10, 59 (3 epochs) with all labels, the same for every arm; the scratch arm's LR (2x or 4x the
fine-tuning LR) is picked per k on val with seed 0."""
QUICK_SHARDS = {"source_per_class": 20, "source_val_per_class": 5}
QUICK_SOURCE = ["train.epochs=1", "train.max_steps=4"]
QUICK_STUDY = ["--labels-per-class", "1,all", "--arms", "finetune,scratch", "--seeds", "0", "--steps", "4",
               "--scratch-lr-grid", "4e-3", "--scratch-warmup-grid", "0.1"]
"""``--quick`` (the CI test): a tiny source, 4 pretraining steps, a 2 x 2 x 1 study of 4 steps a cell."""


def launch_command(config: Path, overrides: list[str], processes: int, command: str = "train") -> list[str]:
    """The ``accelerate launch`` command line of ``tldist <command> CONFIG OVERRIDES`` on ``processes`` ranks."""
    import torch

    acc = CONFIGS / "accelerate" / ("ddp.yaml" if torch.cuda.is_available() else "cpu.yaml")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(acc),
            "--num_processes", str(processes), "--main_process_port", str(_free_port()),
            "-m", "tldist.cli", command, str(config), *overrides]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(name: str, cmd: list[str], log_dir: Path) -> float:
    """Run one stage's command with its output in ``<log_dir>/<name>.log``; returns its seconds.

    Raises UserError with the log's last lines when it fails."""
    log_file = log_dir / f"{name}.log"
    print(f"[demo] {name}: {' '.join(cmd[2:])}\n[demo]   log: {log_file}", flush=True)
    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log_file, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-25:])
        raise UserError(f"demo stage '{name}' failed (exit {proc.returncode}); last lines of {log_file}:\n{tail}")
    return round(time.time() - t0, 1)


def _train(name: str, config: Path, overrides: list[str], processes: int, log_dir: Path) -> dict:
    seconds = _run(name, launch_command(config, overrides, processes), log_dir)
    out_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir="))
    result = json.loads((Path(out_dir) / "result.json").read_text())
    result["seconds"] = seconds
    print(f"[demo]   {name}: top-1 {result.get('eval/top1', float('nan')):.2f}% in {seconds} s", flush=True)
    return result


def run_demo(out: str | Path = "demo_out", *, processes: int = 2, quick: bool = False) -> dict:
    """Run the whole demo (see the module docstring); returns the summary also written to
    ``<out>/demo_results.json``: source top-1, the study's rows, wall time in seconds."""
    from tldist.data.demo import write_demo_shards

    out = Path(out).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    shards = out / "shards"
    write_demo_shards(shards, **(QUICK_SHARDS if quick else {}))
    print(f"[demo] shards ready in {shards} ({time.time() - t0:.1f} s)", flush=True)
    source = _train("pretrain-glyphs", CONFIGS / "demo_source.yaml",
                    [f"output_dir={out}/runs/source", f"data.train=[{shards}/source/train]",
                     f"data.val={shards}/source/val", *(QUICK_SOURCE if quick else [])], processes, logs)
    best = out / "runs" / "source" / "checkpoints"
    ckpt = json.loads((best / "best.json").read_text())["dir"] if (best / "best.json").is_file() else None
    if ckpt is None:
        raise UserError(f"pretraining left no best checkpoint in {best}")
    study_dir = out / "study"
    overrides = [f"output_dir={out}/runs/target", f"model.checkpoint={best / ckpt}",
                 f"data.train=[{shards}/target/train]", f"data.val={shards}/target/val"]
    _run("study", launch_command(CONFIGS / "demo_target.yaml", overrides, processes, "study")
         + ["--out", str(study_dir), *(QUICK_STUDY if quick else STUDY)], logs)
    rows = _read_rows(study_dir / "results.csv")
    summary = {"source_top1": source.get("eval/top1"), "study": str(study_dir), "rows": rows,
               "seconds": round(time.time() - t0, 1), "processes": processes, "quick": quick}
    (out / "demo_results.json").write_text(json.dumps(summary, indent=1))
    table = study_dir / "summary.md"
    print("\n[demo] target: scikit-learn's handwritten digits; top-1 on the 539 val digits by labels per class")
    print(table.read_text() if table.is_file() else "(the study wrote no summary.md)")
    print(f"[demo] plot {study_dir / 'study.png'}; total {summary['seconds']} s; results in "
          f"{out / 'demo_results.json'}")
    return summary


def _read_rows(path: Path) -> list[dict]:
    import csv

    if not path.is_file():
        raise UserError(f"the study left no {path}; see {path.parent}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["top1"] = float(row["top1"])
    return rows
