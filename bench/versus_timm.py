"""tldist's DeiT/MAE preset vs the same recipe written as a timm user would (bench/timm_style.py).

Recipe: ``configs/recipe_deit_vit_finetune.yaml`` (RandAugment ``rand-m9-mstd0.5-inc1``, here capped at
magnitude 9 with ``-mmax9`` because plain timm crashes on Pillow 13 at magnitude 10; random
erasing 0.25, Mixup 0.8 / CutMix 1.0, label smoothing 0.1, drop path 0.1, AdamW + weight decay 0.05
off norms/biases, cosine with warm-up, weight EMA 0.99996 with timm's warm-up), loaded with tldist's
own config loader; the timm script gets the same values as flags, read from that loaded config.
Bench-size overrides, the same for both (the ViT-B/16 MAE weights cannot be downloaded here and a
ViT at 32 px is not meaningful): timm's ``resnet18`` from random init, layer decay off (a fine-tuning
device; timm groups a ResNet per block and tldist per stage, so it would not be one setting),
scikit-learn's digits as 32 px PNG (1,257 train / 539 val, the tldist demo split; an ImageFolder
tree for timm, the shards ``tldist shards imagefolder`` writes from it for tldist), crop scale
[0.5, 1], no flip (digits), batch 32 per process x 2 CPU processes over gloo, fp32, LR 2e-3 per 256
images (5e-4 at the global 64), 1 warm-up epoch, eval + checkpoint after every epoch, one torch
thread and one loader worker per process.

Launchers: ``torchrun --standalone --nproc_per_node 2`` for the timm script, ``accelerate launch
--config_file configs/accelerate/cpu.yaml --num_processes 2`` for tldist. Runs alternate
(A B, B A, A B) with seed = repeat index for both, so load drift hits both alike.

Figures: ``job img/s`` (images trained / wall time of the whole launch), ``train img/s`` (each
program's own training rate without evaluation; see bench/versus.py), ``CPU ms/img`` (user + system
CPU time of the whole launch, all its processes, per image trained: start-up, evaluation and
checkpoints included; on a 2-core machine shared with other jobs this is the figure least moved
by their load), final top-1 of the raw weights and of the EMA.

Usage::

    python bench/versus_timm.py [--epochs 6] [--repeats 3] [--quick] [--json bench/results/versus_timm.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
from pathlib import Path

import common  # noqa: F401  (puts the repo on sys.path)
import versus
from common import DEFAULT_ROOT, REPO, abba, fmt_ms, loadavg, machine_line, table

PRESET = REPO / "configs" / "recipe_deit_vit_finetune.yaml"
LR_PER_256 = 2e-3
BENCH_OVERRIDES = [
    "model.name=timm:resnet18", "model.pretrained=false", "transfer.layer_decay=1.0",
    "data.image_size=32", "data.batch_size=32", "data.num_workers=1", "data.train_crop_scale=[0.5,1.0]",
    "data.hflip=false", "train.mixed_precision=no", "train.log_every_steps=5", f"optim.lr={LR_PER_256}",
    "optim.warmup_epochs=1", "checkpoint.every_steps=0", "checkpoint.keep_last=1", "checkpoint.resume=none",
    "tracker.backend=none",
    # timm 1.0.31's RandAugment asks Pillow 13 for a 0-bit posterize at magnitude 10 and Pillow raises
    # (tldist returns a black image instead): the cap at 9 keeps the plain timm script running.
    "data.auto_augment=rand-m9-mstd0.5-inc1-mmax9",
]


def recipe(epochs: int):
    """The preset with the bench overrides, as tldist resolves it (also the source of the timm flags)."""
    from tldist.config import load_config

    return load_config(PRESET, [*BENCH_OVERRIDES, f"train.epochs={epochs}", "data.train=[x]"]).validate()


def timm_flags(cfg, world: int) -> list[str]:
    """bench/timm_style.py flags carrying the same recipe as the tldist config ``cfg``."""
    d, t, o = cfg.data, cfg.train, cfg.optim
    assert cfg.model.name.startswith("timm:") and not cfg.model.pretrained and cfg.transfer.layer_decay == 1.0
    assert o.name == "adamw" and tuple(o.betas) == (0.9, 0.999) and o.min_lr_ratio == 0
    flags = ["--model", cfg.model.name[len("timm:"):], "--img-size", str(d.image_size), "-b", str(d.batch_size),
             "-j", str(d.num_workers), "--epochs", str(t.epochs), "--opt", "adamw",
             "--lr", repr(o.lr * d.batch_size * world / o.lr_ref_batch), "--weight-decay", repr(o.weight_decay),
             "--sched", "cosine", "--warmup-epochs", str(int(o.warmup_epochs)), "--min-lr", "0",
             "--scale", *map(str, d.train_crop_scale), "--hflip", "0.5" if d.hflip else "0",
             "--color-jitter", repr(d.color_jitter), "--reprob", repr(d.random_erasing), "--remode", "pixel",
             "--mixup", repr(t.mixup_alpha), "--cutmix", repr(t.cutmix_alpha), "--mixup-prob", repr(t.mixup_prob),
             "--mixup-switch-prob", repr(t.mixup_switch_prob), "--smoothing", repr(t.label_smoothing)]
    if d.auto_augment:
        flags += ["--aa", d.auto_augment]
    if cfg.model.drop_path_rate is not None:
        flags += ["--drop-path", repr(cfg.model.drop_path_rate)]
    if t.ema_decay:
        flags += ["--model-ema", "--model-ema-decay", repr(t.ema_decay)]
        flags += ["--model-ema-warmup"] if t.ema_warmup else []
    return flags


def run_timm(images_dir: Path, out: Path, flags: list[str], *, seed: int, timeout: int = 2400) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "bench" / "timm_style.py"), "--data-dir", str(images_dir), *flags, "--seed", str(seed),
           "--output", str(out / "ckpt"), "--json", str(out / "result.json")]
    _, wall = versus.timed_run(cmd, "timm-style", timeout)
    r = json.loads((out / "result.json").read_text())
    assert r["world_size"] == 2, r
    return {"wall": wall, "job_ips": r["train_images"] / wall, "train_ips": r["train_images_per_s"],
            "top1": r["top1"], "ema_top1": r["ema_top1"], "images": r["train_images"],
            "curve": [h["top1"] for h in r["history"]], "ema_curve": [h["ema_top1"] for h in r["history"]]}


def run_tldist(shards: Path, out: Path, *, epochs: int, seed: int) -> dict:
    versus.CONFIG = PRESET  # versus.run_tldist launches `tldist train CONFIG <overrides>`
    x = versus.run_tldist(shards, out, processes=2, epochs=epochs, seed=seed, extra=BENCH_OVERRIDES, timeout=2400)
    result = json.loads((out / "result.json").read_text())
    x["ema_top1"] = result.get("eval_ema/top1", float("nan"))
    return x


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT / "digits")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="smoke test: 1 epoch, 1 repeat")
    p.add_argument("--json", type=Path, default=None, help="write every run's figures here")
    a = p.parse_args(argv)
    if a.quick:
        a.epochs, a.repeats = 1, 1
    images, shards = versus.prepare_digits(a.root)
    cfg = recipe(a.epochs)
    flags = timm_flags(cfg, world=2)
    print(machine_line())
    print(f"# preset {PRESET.relative_to(REPO)} + {' '.join(BENCH_OVERRIDES)}\n# timm-style flags: {' '.join(flags)}")
    print(f"# {a.epochs} epochs, {a.repeats} repeats, order alternating, seed = repeat", flush=True)
    systems = ["tldist", "timm-style"]
    res: dict[str, list[dict]] = {n: [] for n in systems}
    load_before = loadavg()
    for r, name in abba(systems, a.repeats):
        out = a.root / "runs_timm" / f"{name}{r}"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        x = (run_tldist(shards, out, epochs=a.epochs, seed=r) if name == "tldist"
             else run_timm(images, out, flags, seed=r))
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        x["cpu_ms_per_img"] = 1000.0 * cpu / x["images"]
        x["seed"] = r
        res[name].append(x)
        print(f"  repeat {r} {name:10s} wall {x['wall']:6.1f}s  job {x['job_ips']:6.1f} img/s  "
              f"train {x['train_ips']:6.1f} img/s  CPU {x['cpu_ms_per_img']:5.1f} ms/img  "
              f"top1 {x['top1']:.2f}%  ema {x['ema_top1']:.2f}%  "
              f"({x['images']} images; load {loadavg()})\n    top1 per epoch: "
              f"{' '.join(f'{v:.1f}' for v in x['curve'])}", flush=True)
    print(f"# load average before {load_before}, after {loadavg()}")
    print("\n## Per system (median [min-max] over repeats; top-1 also mean ± sd)\n")
    print(table(["system", "job img/s", "train img/s", "CPU ms/img", "wall s", "final top1 %", "final EMA top1 %"],
                [[n, fmt_ms([x["job_ips"] for x in v], 1), fmt_ms([x["train_ips"] for x in v], 1),
                  fmt_ms([x["cpu_ms_per_img"] for x in v], 1), fmt_ms([x["wall"] for x in v], 1),
                  f"{fmt_ms([x['top1'] for x in v], 2)}; {mean_sd([x['top1'] for x in v])}",
                  f"{fmt_ms([x['ema_top1'] for x in v], 2)}; {mean_sd([x['ema_top1'] for x in v])}"]
                 for n, v in res.items()]))
    t, ref = res["tldist"], res["timm-style"]
    job = [x["job_ips"] / y["job_ips"] for x, y in zip(t, ref)]
    train = [x["train_ips"] / y["train_ips"] for x, y in zip(t, ref)]
    cpu = [y["cpu_ms_per_img"] / x["cpu_ms_per_img"] for x, y in zip(t, ref)]
    acc = [x["top1"] - y["top1"] for x, y in zip(t, ref)]
    ema = [x["ema_top1"] - y["ema_top1"] for x, y in zip(t, ref)]
    med = statistics.median
    print("\n## Ratios (per seed, median [min-max])\n")
    print(table(["figure", "value", "target", "met"], [
        ["tldist / timm-style: job img/s", fmt_ms(job, 2), ">= 1.0", "yes" if med(job) >= 1.0 else "NO"],
        ["tldist / timm-style: train img/s", fmt_ms(train, 2), ">= 1.0", "yes" if med(train) >= 1.0 else "NO"],
        ["timm-style / tldist: CPU ms/img (higher: tldist cheaper)", fmt_ms(cpu, 2), ">= 1.0",
         "yes" if med(cpu) >= 1.0 else "NO"],
        ["tldist - timm-style: top1 (points)", fmt_ms(acc, 2), "within seed spread", ""],
        ["tldist - timm-style: EMA top1 (points)", fmt_ms(ema, 2), "within seed spread", ""]]))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"epochs": a.epochs, "repeats": a.repeats, "preset": str(PRESET.name),
                                      "overrides": BENCH_OVERRIDES, "timm_flags": flags, "runs": res}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
