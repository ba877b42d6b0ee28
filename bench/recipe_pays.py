"""Does the strong recipe pay? The demo's digits target with few labels: default recipe vs the torchvision-style preset.

Both arms fine-tune the demo's source backbone, a resnet18 trained by ``configs/demo_source.yaml`` on
the demo's source shards (once here, seed 0, shared by every run; whatever source
``write_demo_shards`` makes: printed digits from ``tldist/data/glyphs.py`` when the recorded run was
made), on a stratified ``--label-fraction`` of scikit-learn's
digits (``tldist.data.demo.write_demo_shards(label_fraction=...)``; val: the full 539-image split),
with ``configs/demo_target.yaml``, at equal epochs, batch and seeds:

* ``default``: ``demo_target.yaml`` as shipped (crop scale [0.7, 1], no flip, AdamW, layer decay 0.8,
  no label smoothing);
* ``strong``:  the same plus the augmentation/regularization keys of
  ``configs/recipe_torchvision_resnet.yaml`` (:data:`STRONG_KEYS`, read from the preset with tldist's
  config loader): TrivialAugmentWide, random erasing 0.1, Mixup 0.2 / CutMix 1.0, label smoothing
  0.1, weight EMA 0.9998 with warm-up. Its final top-1 is reported for the raw weights and the EMA.

2 CPU processes (``accelerate launch``, configs/accelerate/cpu.yaml), arms alternating per seed
(A B, B A, A B) because the machine is shared; seeds set ``train.seed`` and ``data.seed``.

Usage::

    python bench/recipe_pays.py [--label-fraction 0.1] [--epochs 30] [--seeds 0,1,2] \
        [--json bench/results/recipe_pays.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common  # noqa: F401  (puts the repo on sys.path)
from common import DEFAULT_ROOT, REPO, abba, bench_env, fmt_ms, free_port, loadavg, machine_line, table

PRESET = REPO / "configs" / "recipe_torchvision_resnet.yaml"
STRONG_KEYS = ("data.auto_augment", "data.color_jitter", "data.random_erasing", "train.mixup_alpha",
               "train.cutmix_alpha", "train.mixup_prob", "train.mixup_switch_prob", "train.label_smoothing",
               "train.ema_decay", "train.ema_warmup", "train.ema_warmup_power")


def strong_overrides() -> list[str]:
    """``key=value`` overrides carrying the preset's augmentation/regularization settings."""
    from tldist.config import load_config

    cfg = load_config(PRESET)
    out = []
    for key in STRONG_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return out


def launch(config: Path, overrides: list[str], log: Path, processes: int, timeout: int = 3600) -> dict:
    """One ``tldist train`` under accelerate: its result.json plus ``wall`` seconds (a failure raises)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs/accelerate/cpu.yaml"), "--num_processes", str(processes), "--main_process_port",
           str(free_port()), "-m", "tldist.cli", "train", str(config), *overrides]
    out = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")))
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=bench_env(), cwd=REPO, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{config.name} failed ({proc.returncode}); log {log}:\n{log.read_text()[-3000:]}")
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == processes and result.get("ranks_agree") is not False, result
    result["wall"] = time.perf_counter() - t0
    return result


def source_checkpoint(root: Path, shards: Path, processes: int) -> Path:
    """The demo's source backbone (trained once, reused)."""
    from tldist.artifacts.checkpoint import CheckpointManager

    out = root / "runs" / "source"
    if not (out / "result.json").is_file():
        r = launch(REPO / "configs" / "demo_source.yaml",
                   [f"output_dir={out}", f"data.train=[{shards}/source/train]", f"data.val={shards}/source/val",
                    "tracker.backend=none", "checkpoint.resume=none"], root / "source.log", processes)
        print(f"# source pretraining ({shards}/source): top-1 {r['eval/top1']:.2f}% in {r['wall']:.0f} s", flush=True)
    best = CheckpointManager(out / "checkpoints", keep_last=1, is_main=False).best()
    if best is None:
        raise RuntimeError(f"no best checkpoint in {out / 'checkpoints'}")
    return best


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT / "recipe_pays")
    p.add_argument("--label-fraction", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    from tldist.data.demo import write_demo_shards
    from tldist.data.manifest import load_manifest

    seeds = [int(s) for s in a.seeds.split(",")]
    shards = a.root / f"shards_{a.label_fraction}"
    write_demo_shards(shards, label_fraction=a.label_fraction)
    n_train = load_manifest(shards / "target" / "train").num_samples
    print(machine_line())
    ckpt = source_checkpoint(a.root, shards, a.processes)
    strong = strong_overrides()
    steps = n_train // (a.batch_size * a.processes)
    print(f"# digits target: {n_train} labelled train images ({a.label_fraction:.0%}), 539 val; {a.epochs} epochs x "
          f"{steps} steps of {a.batch_size * a.processes}; fine-tuned from {ckpt}\n# strong = demo_target.yaml + "
          f"{' '.join(strong)}", flush=True)
    arms = {"default": [], "strong": []}
    res: dict[str, list[dict]] = {n: [] for n in arms}
    for i, arm in abba(list(arms), len(seeds)):
        seed = seeds[i]
        name = f"{arm}_s{seed}"
        overrides = [f"output_dir={a.root / 'runs' / name}", f"model.checkpoint={ckpt}",
                     f"data.train=[{shards}/target/train]", f"data.val={shards}/target/val",
                     f"data.batch_size={a.batch_size}", f"train.epochs={a.epochs}", f"train.seed={seed}",
                     f"data.seed={seed}", "train.eval_every_steps=1000000", "checkpoint.keep_last=1",
                     "checkpoint.resume=none", "tracker.backend=none", *(strong if arm == "strong" else [])]
        r = launch(REPO / "configs" / "demo_target.yaml", overrides, a.root / f"{name}.log", a.processes)
        x = {"seed": seed, "top1": r["eval/top1"], "ema_top1": r.get("eval_ema/top1"), "steps": r["step"],
             "wall": r["wall"]}
        res[arm].append(x)
        ema = f"  EMA {x['ema_top1']:.2f}%" if x["ema_top1"] is not None else ""
        print(f"  seed {seed} {arm:8s} top1 {x['top1']:.2f}%{ema}  ({x['steps']} steps, {x['wall']:.0f} s; "
              f"load {loadavg()})", flush=True)

    def cell(v: list[float]) -> str:
        sd = f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else ""
        return f"{statistics.mean(v):.2f}{sd} ({fmt_ms(v, 2)})"

    d, s = res["default"], res["strong"]
    rows = [["default (demo_target.yaml)", cell([x["top1"] for x in d])],
            ["strong, raw weights", cell([x["top1"] for x in s])],
            ["strong, EMA weights", cell([x["ema_top1"] for x in s])]]
    diff = [y["top1"] - x["top1"] for x, y in zip(d, s)]
    diff_ema = [y["ema_top1"] - x["top1"] for x, y in zip(d, s)]
    print("\n## Final val top-1 %, mean ± sd (median [min-max]) over seeds\n")
    print(table(["arm", "top-1 %"], rows))
    print("\n## Strong - default, per seed (points)\n")
    print(table(["figure", "per seed", "mean"],
                [["strong raw - default", " ".join(f"{v:+.2f}" for v in diff), f"{statistics.mean(diff):+.2f}"],
                 ["strong EMA - default", " ".join(f"{v:+.2f}" for v in diff_ema),
                  f"{statistics.mean(diff_ema):+.2f}"]]))
    summary = {"label_fraction": a.label_fraction, "train_images": n_train, "epochs": a.epochs,
               "batch_size": a.batch_size, "processes": a.processes, "strong_overrides": strong,
               "source_checkpoint": str(ckpt), "runs": res}
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
