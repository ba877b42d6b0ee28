"""tldist vs a standard DDP script (bench/reference_train.py): throughput and final accuracy.

Same model (resnet18, random init), same images (scikit-learn's 8x8 handwritten digits
stored as 32 px PNG: 1,257 train / 539 val, trained and evaluated at 32 px), same per-process
batch (32), epochs (8), precision (fp32), LR (the recipe's 0.1 per 256 images, i.e. 0.025 for the
global batch of 64), crop scale and flip, 2 CPU processes each over gloo with one torch thread
and one loader worker per process. The reference reads an ImageFolder tree, tldist
the shards that ``tldist shards imagefolder`` writes from that same tree. Both evaluate after
every epoch and save a checkpoint after every epoch, as their recipes do.

Launchers: ``torchrun --standalone --nproc_per_node 2`` for the reference (its documented
launch), ``accelerate launch --config_file configs/accelerate/cpu.yaml --num_processes 2`` for
tldist (tldist's documented CPU launch). Runs alternate (A B, B A, A B) with seed = repeat
index for both, so load drift hits both alike.

Figures per run:
* ``job img/s``   images trained / wall time of the whole launch (start-up, data scanning,
                  evaluation and checkpoints included). The reference trains 1,258 images per
                  epoch (its sampler pads 1,257 to a multiple of 2), tldist 19 full global
                  batches (1,216; its stream carries the rest into the next epoch).
* ``train img/s`` each program's own steady training rate without evaluation: the reference's
                  summed epoch time (fresh DataLoader workers each epoch included, as in the
                  recipe); for tldist the logged ``img/s`` windows, leaving out the first and
                  those holding an evaluation or checkpoint.
* ``top1``        final validation top-1 after the last epoch.

Usage::

    python bench/versus.py [--epochs 8] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import common  # noqa: F401  (puts the repo on sys.path)
from common import DEFAULT_ROOT, REPO, abba, bench_env, fmt_ms, free_port, loadavg, machine_line, table

CONFIG = REPO / "bench" / "versus_tldist.yaml"
LOG_LINE = re.compile(r"step (\d+)/(\d+) .* (\d+) img/s")
EVAL_LINE = re.compile(r"eval val @ step \d+: top1 ([\d.]+)%")


def prepare_digits(root: Path) -> tuple[Path, Path]:
    """Digits as an ImageFolder tree (``images/{train,val}/<digit>/*.png``) and as shards (via the CLI)."""
    from tldist.data.demo import digits_samples

    images, shards = root / "images", root / "shards"
    if (shards / "train" / "manifest.json").is_file() and (shards / "val" / "manifest.json").is_file():
        return images, shards
    shutil.rmtree(root, ignore_errors=True)
    for split in ("train", "val"):
        classes, samples = digits_samples(split, seed=0)
        for c in classes:
            (images / split / c).mkdir(parents=True, exist_ok=True)
        for s in samples:
            (images / split / classes[s.label] / f"{s.key}.{s.ext}").write_bytes(s.data)
    subprocess.run([sys.executable, "-m", "tldist.cli", "shards", "imagefolder", str(images), str(shards)],
                   check=True, env=bench_env(), cwd=REPO, stdout=subprocess.DEVNULL)
    return images, shards


def tldist_train_rate(stdout: str, steps_per_epoch: int, log_every: int) -> float:
    """Mean of tldist's logged img/s windows, without the first and those holding an eval/checkpoint.

    The window logged at step s covers steps s-L+1..s; the eval and checkpoint after epoch-end
    step e land in the window that holds step e+1.
    """
    rates = []
    for m in LOG_LINE.finditer(stdout):
        s, ips = int(m.group(1)), float(m.group(3))
        if s <= log_every:
            continue
        if any(e % steps_per_epoch == 0 for e in range(s - log_every, s)):
            continue
        rates.append(ips)
    if not rates:
        raise RuntimeError("no clean tldist log windows; train longer or log more often")
    return sum(rates) / len(rates)


def timed_run(cmd: list[str], label: str, timeout: int) -> tuple[subprocess.CompletedProcess, float]:
    """Run one training launch; its output and wall-clock seconds. A failure raises with the output's tail."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=bench_env(), cwd=REPO, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc, wall


def run_tldist(shards: Path, out: Path, *, processes: int, epochs: int, seed: int, extra: list[str] = (),
               val: bool = True, timeout: int = 1800) -> dict:
    """One ``tldist train`` launch (accelerate for 2+ processes); wall time, rates and final top-1."""
    shutil.rmtree(out, ignore_errors=True)
    overrides = [f"data.train=[{shards}/train]", *([f"data.val={shards}/val"] if val else []), f"output_dir={out}",
                 f"train.epochs={epochs}", f"train.seed={seed}", f"data.seed={seed}", *extra]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs/accelerate/cpu.yaml"), "--num_processes", str(processes),
           "--main_process_port", str(free_port()), "-m", "tldist.cli", "train", str(CONFIG), *overrides]
    if processes == 1:
        cmd = [sys.executable, "-m", "tldist.cli", "train", str(CONFIG), *overrides]
    proc, wall = timed_run(cmd, "tldist", timeout)
    result = json.loads((out / "result.json").read_text())
    m = re.search(r"steps_per_epoch=(\d+)", proc.stdout)
    spe = int(m.group(1))
    samples = int(re.search(r"train_samples=(\d+)", proc.stdout).group(1))
    gb = int(re.search(r"global_batch=(\d+)", proc.stdout).group(1))
    log_every = int(re.search(r"log_every_steps: (\d+)", proc.stdout).group(1))
    images = result["step"] * gb
    assert result["world_size"] == processes and result["ranks_agree"] is not False, result
    return {"wall": wall, "job_ips": images / wall, "train_ips": tldist_train_rate(proc.stdout, spe, log_every),
            "top1": result.get("eval/top1", float("nan")), "images": images, "samples": samples,
            "world_size": result["world_size"], "curve": [float(v) for v in EVAL_LINE.findall(proc.stdout)]}


def run_reference(images_dir: Path, out: Path, *, epochs: int, seed: int, timeout: int = 1800) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "bench" / "reference_train.py"), "--data-path", str(images_dir),
           "--model", "resnet18",
           "--batch-size", "32", "--epochs", str(epochs), "--workers", "1", "--lr", "0.025",
           "--lr-scheduler", "cosineannealinglr", "--train-crop-size", "32", "--val-crop-size", "32",
           "--crop-scale-min", "0.5", "--output-dir", str(out / "ckpt"), "--json", str(out / "result.json"),
           "--seed", str(seed), "--print-freq", "0"]
    _, wall = timed_run(cmd, "reference", timeout)
    r = json.loads((out / "result.json").read_text())
    assert r["world_size"] == 2, r
    return {"wall": wall, "job_ips": r["train_images"] / wall, "train_ips": r["train_images_per_s"],
            "top1": r["top1"], "images": r["train_images"], "curve": [h["top1"] for h in r["history"]]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT / "digits")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="smoke test: 1 epoch, 1 repeat")
    a = p.parse_args(argv)
    if a.quick:
        a.epochs, a.repeats = 1, 1
    images, shards = prepare_digits(a.root)
    print(machine_line())
    print(f"# resnet18 @ 32px, batch 32/process x 2 processes (gloo), fp32, {a.epochs} epochs, 1 torch thread and "
          f"1 loader worker per process; {a.repeats} repeats, order alternating")
    systems = ["tldist", "reference"]
    res: dict[str, list[dict]] = {n: [] for n in systems}
    load_before = loadavg()
    for r, name in abba(systems, a.repeats):
        out = a.root / "runs" / f"{name}{r}"
        if name == "tldist":
            x = run_tldist(shards, out, processes=2, epochs=a.epochs, seed=r)
        else:
            x = run_reference(images, out, epochs=a.epochs, seed=r)
        res[name].append(x)
        print(f"  repeat {r} {name:11s} wall {x['wall']:6.1f}s  job {x['job_ips']:6.1f} img/s  "
              f"train {x['train_ips']:6.1f} img/s  top1 {x['top1']:.2f}%  ({x['images']} images; "
              f"load {loadavg()})\n    top1 per epoch: {' '.join(f'{v:.1f}' for v in x['curve'])}", flush=True)
    print(f"# load average before {load_before}, after {loadavg()}")
    print("\n## Per system (median [min-max] over repeats)\n")
    print(table(["system", "job img/s", "train img/s", "wall s", "final top1 %"],
                [[n, fmt_ms([x["job_ips"] for x in v], 1), fmt_ms([x["train_ips"] for x in v], 1),
                  fmt_ms([x["wall"] for x in v], 1), fmt_ms([x["top1"] for x in v], 2)] for n, v in res.items()]))
    ref = res["reference"]
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    rows = []
    for name in ("tldist",):
        t = res[name]
        job = [x["job_ips"] / y["job_ips"] for x, y in zip(t, ref)]
        train = [x["train_ips"] / y["train_ips"] for x, y in zip(t, ref)]
        acc = [x["top1"] - y["top1"] for x, y in zip(t, ref)]
        rows += [[f"{name} / reference: job img/s", fmt_ms(job, 2), ">= 1.0", "yes" if med(job) >= 1.0 else "NO"],
                 [f"{name} / reference: train img/s", fmt_ms(train, 2), ">= 1.0", "yes" if med(train) >= 1.0 else "NO"],
                 [f"{name} - reference: top1 (points)", fmt_ms(acc, 2), "~0", ""]]
    print("\n## Ratios (per repeat, median [min-max])\n")
    print(table(["figure", "value", "target", "met"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
