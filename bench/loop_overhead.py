"""Training-loop overhead: tldist's Trainer fed by the real shard pipeline vs by synthetic in-memory batches.

One process. The Trainer is built by ``tldist.train.main.build`` from a normal config (same model,
batch, precision, channels_last, optimizer, scheduler), then run in segments of ``--steps``
optimizer steps, alternating its ``train_loader`` between

* ``real``       the ``TrainLoader`` that ``build`` made (shards of ``make_images.py``, W workers), and
* ``synthetic``  an infinite loader with the same interface (``__iter__``, ``state_dict``,
                 ``stats``, ``steps_per_epoch``, ``num_samples``, ``classes``) that hands out one
                 pre-made uint8 batch: a loader that costs nothing.

Both segments run the very same ``Trainer.fit`` (normalization, forward, backward, optimizer step,
logging); the figure is the Trainer's own ``train/images_per_s`` (first log window of each segment
dropped), so it is about tldist's loop, not a toy loop. The real loader's workers stay alive
(idle) while the synthetic segment runs. Checkpoint writes are disabled for the benchmark.

On a CPU-only machine the loader workers take CPU from the training step itself, so ``real /
synthetic`` < 1 is expected even for a perfect loop whenever training and loading together want
more cores than there are. The script measures the single-core decode+augment rate at the
training size and prints what CPU sharing alone allows on an otherwise idle machine:
``min(1, cores / (threads + synthetic_rate / decode_rate))`` (training keeps ``threads`` cores busy;
loading needs ``synthetic_rate / decode_rate`` more). The default setting (1 torch thread, 1
loader worker on a 2-core machine) leaves that at 1.0, so any shortfall is the loop's own
overhead or the machine's other load. ``train/data_wait_frac`` (time blocked on ``next(loader)``)
is printed too: it is the part of the shortfall that the loader itself causes.

Usage::

    python bench/loop_overhead.py [--model mobilenet_v3_small] [--size 112] [--steps 20] [--repeats 3]
        [--decode pil|torchvision|nvjpeg] [--json OUT.json] [--quick]

The Trainer runs on whatever device ``build`` gives it (a GPU when one is visible); ``bench/gpu_check.py``
runs this script on a GPU (ResNet-50, bf16, 224 px) and reads the ``--json`` output.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the repo on sys.path)
from common import DEFAULT_ROOT, abba, fmt_ms, loadavg, machine_line, table


class SyntheticLoader:
    """Infinite loader of one fixed uint8 batch, with TrainLoader's interface."""

    def __init__(self, batch_size: int, image_size: int, classes: list[str], steps_per_epoch: int, num_samples: int):
        import torch

        g = torch.Generator().manual_seed(0)
        self.classes, self.steps_per_epoch, self.num_samples = classes, steps_per_epoch, num_samples
        self.batch_size = batch_size
        self.fault = None  # TrainLoader's agreed-stop data fault: a synthetic batch never fails
        self._batch = {"image": torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8,
                                              generator=g),
                       "label": torch.randint(0, len(classes), (batch_size,), generator=g),
                       "key": [f"synthetic{i}" for i in range(batch_size)]}
        self.batches = 0

    def __iter__(self) -> "SyntheticLoader":
        return self

    def __next__(self) -> dict:
        self.batches += 1
        return dict(self._batch)

    def state_dict(self) -> dict:
        return {"synthetic": True, "batches": self.batches}

    def load_state_dict(self, sd: dict) -> None:
        self.batches = int(sd.get("batches", 0))

    def stats(self) -> dict[str, int]:
        return {"read": self.batches * self.batch_size, "skipped": 0}


def decode_rate(files: list[Path], size: int, n: int) -> float:
    """Single-core decode + train-augment rate (img/s) at ``size`` on in-memory bytes, in this process."""
    import torch

    from tldist.data.transforms import build_train_transform, decode_image

    data = [f.read_bytes() for f in files[:n]]
    t = build_train_transform(size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t(decode_image(data[0]), random.Random(0))
        t0 = time.perf_counter()
        for i, b in enumerate(data):
            t(decode_image(b), random.Random(i))
        return len(data) / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=None, help="output dir of make_images.py (made if missing)")
    p.add_argument("--model", default="mobilenet_v3_small")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=1, help="loader worker processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    p.add_argument("--precision", default="no", choices=["no", "bf16"])
    p.add_argument("--decode", default="pil", choices=["pil", "torchvision", "nvjpeg"],
                   help="data.decode of the real loader")
    p.add_argument("--json", type=Path, default=None, help="also write the per-repeat figures to this JSON file")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per segment (first log window dropped)")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="smoke test: tiny model input, few steps, 1 repeat")
    a = p.parse_args(argv)
    if a.quick:
        a.size, a.batch, a.steps, a.log_every, a.repeats = 32, 16, 4, 2, 1
    os.environ.setdefault("WANDB_MODE", "disabled")
    from make_images import make_images

    data = a.data or DEFAULT_ROOT / ("images256_quick" if a.quick else "images256")
    info = make_images(data, 200 if a.quick else 3000, verbose=False)

    import torch

    torch.set_num_threads(a.threads)
    from tldist.config import load_config
    from tldist.train.main import build

    out = tempfile.mkdtemp(prefix="tldist_loop_")
    cfg = load_config(None, [
        f"data.train=[{info['shards']}]", f"output_dir={out}", f"model.name={a.model}", "model.pretrained=false",
        f"data.image_size={a.size}", f"data.batch_size={a.batch}", f"data.num_workers={a.workers}",
        *([f"train.mixed_precision={a.precision}"] if a.precision != "no" else []), "train.max_steps=1000000",
        f"data.decode={a.decode}",
        f"train.log_every_steps={a.log_every}",
        "tracker.backend=none", "checkpoint.resume=none"])
    trainer = build(cfg)
    torch.set_num_threads(a.threads)
    logging.getLogger("tldist").setLevel(logging.WARNING)
    records: list[dict] = []
    trainer.tracker.log = lambda metrics, step: records.append(dict(metrics))  # type: ignore[method-assign]
    trainer.save = lambda metric=None: None  # type: ignore[method-assign]  # no checkpoint writes in a benchmark
    trainer.run.steps_per_epoch = 10**9  # no epoch-end checkpoints inside segments
    real = trainer.train_loader
    synthetic = SyntheticLoader(a.batch, a.size, real.classes, real.steps_per_epoch, real.num_samples)
    loaders = {"real": real, "synthetic": synthetic}

    def segment(name: str) -> tuple[float, float]:
        trainer.train_loader = loaders[name]
        trainer.run.total_steps = trainer.state.step + a.steps
        records.clear()
        trainer.fit()
        windows = [m for m in records if "train/images_per_s" in m][1:]  # drop the warm-up window
        images = a.batch * a.log_every * len(windows)
        seconds = sum(a.batch * a.log_every / m["train/images_per_s"] for m in windows)
        wait = sum(m["train/data_wait_frac"] * a.batch * a.log_every / m["train/images_per_s"] for m in windows)
        return images / seconds, wait / seconds

    print(machine_line())
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    print(f"# {a.model} @ {a.size}px, batch {a.batch}, precision={a.precision}, channels_last="
          f"{cfg.train.channels_last}, decode={a.decode}, device "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"torch threads {torch.get_num_threads()}, {a.workers} loader workers; "
          f"{a.steps} steps per segment, log every {a.log_every} (first window dropped), {a.repeats} repeats")
    load_before = loadavg()
    segment("real")  # starts the loader workers; not counted
    segment("synthetic")
    res: dict[str, list[float]] = {"real": [], "synthetic": []}
    waits: dict[str, list[float]] = {"real": [], "synthetic": []}
    files = sorted(Path(info["images"]).rglob("*.jpg"))
    rates: list[float] = []
    for r, name in abba(["real", "synthetic"], a.repeats):
        ips, wait = segment(name)
        res[name].append(ips)
        waits[name].append(wait)
        print(f"  repeat {r} {name:9s} {ips:7.1f} img/s  data-wait {wait:5.1%}  (load {loadavg()})", flush=True)
        if name == "synthetic":
            rates.append(decode_rate(files, a.size, 24 if a.quick else 150))
    real.close()
    print(f"# load average before {load_before}, after {loadavg()}")
    cores = os.cpu_count() or 1
    ratios = [x / y for x, y in zip(res["real"], res["synthetic"])]
    predicted = [min(1.0, cores / (a.threads + syn / rate)) for syn, rate in zip(res["synthetic"], rates)]
    print("\n## Train throughput (Trainer's train/images_per_s; median [min-max])\n")
    print(table(["loader", "img/s", "data-wait fraction"],
                [[n, fmt_ms(res[n], 1), fmt_ms(waits[n], 3)] for n in ("real", "synthetic")]))
    print("\n## Ratio\n")
    med = sorted(ratios)[len(ratios) // 2]
    print(table(["ratio", "value", "target", "met"],
                [["real / synthetic", fmt_ms(ratios, 3), ">= 0.95", "yes" if med >= 0.95 else "NO"],
                 ["allowed by CPU sharing alone (idle machine)", fmt_ms(predicted, 3), "", ""],
                 ["measured / predicted (loop's own efficiency)", fmt_ms([m / q for m, q in zip(ratios, predicted)], 3),
                  "", ""]]))
    print(f"\n# single-core decode+augment at {a.size}px: {fmt_ms(rates, 0)} img/s")
    if a.json is not None:
        import json

        a.json.write_text(json.dumps({
            "model": a.model, "size": a.size, "batch": a.batch, "precision": a.precision, "decode": a.decode,
            "device": device.type, "workers": a.workers, "images_per_s": res, "data_wait_frac": waits,
            "real_over_synthetic": ratios, "decode_rate_1core": rates,
            "gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
