"""Data-parallel scaling of tldist on CPU: 1 vs 2 training processes (gloo), measured side by side.

Same job as bench/versus.py's tldist side (resnet18 @ 16 px on the digits shards, batch 32 per
process, fp32, 1 torch thread and 1 loader worker per process), without evaluation, for
``--steps`` optimizer steps. The figure is tldist's own logged ``img/s`` (global), averaged over
the log windows that hold no checkpoint and leaving out the first; runs alternate 1, 2, 2, 1...

On a 2-core machine, 2 processes with 1 thread each is the most that can scale: ideal is 2.0x.
The gradient all-reduce (11.2 M parameters = 45 MB per step over gloo on loopback) and the two
loader workers compete with the training processes for the same 2 cores.

Usage::

    python bench/scaling.py [--steps 30] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse

import common  # noqa: F401  (puts the repo on sys.path)
from common import DEFAULT_ROOT, fmt_ms, loadavg, machine_line, table
from versus import prepare_digits, run_tldist


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=__import__("pathlib").Path, default=DEFAULT_ROOT / "digits")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="smoke test: 15 steps, 1 repeat")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.repeats = 15, 1
    _, shards = prepare_digits(a.root)
    print(machine_line())
    print(f"# tldist, resnet18 @ 16px, batch 32/process, fp32, {a.steps} steps, 1 thread + 1 loader worker per "
          f"process; {a.repeats} repeats, order alternating")
    res: dict[int, list[float]] = {1: [], 2: []}
    load_before = loadavg()
    for r in range(a.repeats):
        for n in ((1, 2) if r % 2 == 0 else (2, 1)):
            x = run_tldist(shards, a.root / "runs" / f"scale{n}_{r}", processes=n, epochs=1, seed=r, val=False,
                           extra=[f"train.max_steps={a.steps}", "data.image_size=16"])  # 16 px: as recorded
            res[n].append(x["train_ips"])
            print(f"  repeat {r} processes={n}  {x['train_ips']:6.1f} img/s  (world size {x['world_size']}; "
                  f"load {loadavg()})", flush=True)
    print(f"# load average before {load_before}, after {loadavg()}")
    speedup = [y / x for x, y in zip(res[1], res[2])]
    print("\n## Throughput (tldist's logged img/s, median [min-max])\n")
    print(table(["processes", "img/s (global)", "img/s per process"],
                [[n, fmt_ms(v, 1), fmt_ms([x / n for x in v], 1)] for n, v in res.items()]))
    print("\n## Scaling\n")
    print(table(["figure", "value", "ideal"],
                [["speed-up 2 vs 1 process", fmt_ms(speedup, 2), "2.00"],
                 ["scaling efficiency", fmt_ms([s / 2 for s in speedup], 2), "1.00"]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
