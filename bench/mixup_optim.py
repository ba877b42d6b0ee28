"""Cost of the issue-15 recipe pieces on the host, measured side by side (A/B interleaved, medians).

* ``mixup``: tldist's :class:`~tldist.train.recipe.DeterministicMixup` (timm's ``Mixup`` with numpy's
  global RNG seeded per (seed, rank, step, micro-batch) and put back) vs timm's ``Mixup`` called
  directly, on a float batch ``--batch`` x 3 x ``--size``^2 (the device batch; here on the CPU). The
  ratio is what the deterministic draw adds to a call.
* ``optim``: one optimizer step over resnet50's parameter groups (``build_param_groups``, weight decay
  0.05, layer decay 0.75, head x10) for ``sgd``, ``adamw``, ``lamb`` and ``lars`` (timm's), fixed random
  gradients; ratios against SGD.

    python bench/mixup_optim.py --repeats 7 --out bench/results/mixup_optim.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _time(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def bench_mixup(args) -> dict:
    from timm.data import Mixup

    from tldist.train.recipe import DeterministicMixup

    kw = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1)
    ours = DeterministicMixup(num_classes=1000, seed=0, rank=0, **kw)
    theirs = Mixup(mode="batch", num_classes=1000, **kw)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))
    step = [0]

    def a():
        step[0] += 1
        ours(x, y, step=step[0])

    def b():
        theirs(x, y)

    times = {"tldist": [], "timm": []}
    for r in range(args.repeats):  # A B, then B A: alternate the order
        for name, fn in (("tldist", a), ("timm", b)) if r % 2 == 0 else (("timm", b), ("tldist", a)):
            times[name].append(_time(fn, args.calls))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_ms": {k: 1e3 * v for k, v in med.items()}, "ratio_tldist_over_timm": med["tldist"] / med["timm"]}


def bench_optim(args) -> dict:
    from tldist.config import ModelConfig, OptimConfig
    from tldist.models import build_model, build_param_groups
    from tldist.train.optim import build_optimizer

    model, info = build_model(ModelConfig(name="resnet50", pretrained=False), 1000)
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = 1e-3 * torch.randn(p.shape, generator=g)
    opts = {}
    for name in ("sgd", "adamw", "lamb", "lars"):
        groups = build_param_groups(model, info, weight_decay=0.05, layer_decay=0.75, head_lr_mult=10.0)
        opts[name] = build_optimizer(OptimConfig(name=name), groups, lr=1e-4)
    times = {k: [] for k in opts}
    names = list(opts)
    for r in range(args.repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            times[name].append(_time(opts[name].step, args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_ms": {k: 1e3 * v for k, v in med.items()},
            "ratio_over_sgd": {k: v / med["sgd"] for k, v in med.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--calls", type=int, default=5, help="mixup calls per timed window")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per timed window")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", "--json", dest="out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {"args": vars(args), "torch_threads": torch.get_num_threads(), "mixup": bench_mixup(args),
              "optim": bench_optim(args)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
