"""``train.compile``: compile time and steady-state training speed, eager vs compiled, side by side.

One process, synthetic in-memory uint8 batches (``loop_overhead.SyntheticLoader``: no loader cost), the
Trainer built by ``tldist.train.main.build`` from a normal config with ``train.compile`` off and on.
For each variant it reports the wall time of the first optimizer steps (for the compiled model: the
``torch.compile`` graph capture + Inductor code generation) and the steady-state ``train/images_per_s``
of later steps. Variants alternate (ABBA) over ``--repeats`` fresh builds; ratios are compiled/eager.

Usage::

    python bench/compile.py [--model resnet18] [--size 64] [--batch 32] [--steps 30] [--repeats 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time

from common import machine_line, table
from loop_overhead import SyntheticLoader


def one_run(compiled: bool, a) -> tuple[float, float]:
    """(seconds for the first ``--warmup`` steps, steady img/s) of one freshly built Trainer."""
    import torch

    from tldist.config import load_config
    from tldist.train.main import build

    out = tempfile.mkdtemp(prefix="tldist_compile_")
    cfg = load_config(None, [
        f"data.train=[{a.shards}]", f"output_dir={out}", f"model.name={a.model}", "model.pretrained=false",
        f"data.image_size={a.size}", f"data.batch_size={a.batch}", "data.num_workers=0", "train.max_steps=1000000",
        f"train.log_every_steps={a.steps}", f"train.compile={str(compiled).lower()}", "tracker.backend=none",
        "checkpoint.resume=none"])
    trainer = build(cfg)
    torch.set_num_threads(a.threads)
    records: list[dict] = []
    trainer.tracker.log = lambda metrics, step: records.append(dict(metrics))  # type: ignore[method-assign]
    trainer.save = lambda metric=None: None  # type: ignore[method-assign]
    trainer.run.steps_per_epoch = 10**9
    real = trainer.train_loader
    trainer.train_loader = SyntheticLoader(a.batch, a.size, real.classes, real.steps_per_epoch, real.num_samples)
    real.close()
    trainer.eval_sets = []
    t0 = time.perf_counter()
    trainer.run.total_steps = a.warmup
    trainer.fit()
    first = time.perf_counter() - t0
    records.clear()
    trainer.run.total_steps = a.warmup + a.steps
    trainer.fit()
    ips = [m["train/images_per_s"] for m in records if "train/images_per_s" in m][-1]
    return first, ips


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3, help="steps timed as start-up (compilation happens here)")
    p.add_argument("--steps", type=int, default=30, help="steady-state steps measured after the warm-up")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    logging.getLogger("tldist").setLevel(logging.WARNING)
    from make_images import make_images

    from common import DEFAULT_ROOT

    a.shards = make_images(DEFAULT_ROOT / "images256_quick", 200, verbose=False)["shards"]
    print(machine_line())
    print(f"# {a.model} @ {a.size}px, batch {a.batch}, {a.threads} torch threads, synthetic batches; first "
          f"{a.warmup} steps = start-up, then {a.steps} steady steps; {a.repeats} repeats (ABBA)")
    res: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    order = [False, True, True, False] * a.repeats
    for compiled in order[: 2 * a.repeats]:
        first, ips = one_run(compiled, a)
        res[compiled].append((first, ips))
        print(f"  {'compiled' if compiled else 'eager':8s} start-up {first:6.1f} s  steady {ips:7.1f} img/s", flush=True)
    med = {k: (statistics.median(f for f, _ in v), statistics.median(i for _, i in v)) for k, v in res.items()}
    print()
    print(table(["variant", f"first {a.warmup} steps (s)", "steady img/s"],
                [["eager", f"{med[False][0]:.1f}", f"{med[False][1]:.1f}"],
                 ["compiled", f"{med[True][0]:.1f}", f"{med[True][1]:.1f}"],
                 ["compiled / eager", f"{med[True][0] / med[False][0]:.1f}x", f"{med[True][1] / med[False][1]:.3f}"]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
