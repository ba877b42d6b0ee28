"""Cost of the EMA of the weights (``train.ema_decay``) per optimizer step, side by side.

One process, a real training step (forward, backward, SGD step) of a torchvision model, with and
without :meth:`tldist.train.ema.WeightEma.update` after it, interleaved A B B A... over repeats; also
the update alone. Reports medians and the ratio of step times.

    python bench/ema_overhead.py --model resnet18 --size 64 --batch 16 --repeats 7 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import common  # noqa: F401  (puts the repo on sys.path)
from common import abba, fmt_ms, machine_line, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default=None, help="write the measurements here")
    args = ap.parse_args()

    import torch
    import torchvision

    from tldist.train.ema import WeightEma

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ema = WeightEma(model, model, decay=0.999, warmup=True)
    x, y = torch.randn(args.batch, 3, args.size, args.size), torch.randint(0, 10, (args.batch,))
    step_no = 0

    def step(with_ema: bool) -> None:
        nonlocal step_no
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step_no += 1
        if with_ema:
            ema.update(step_no)

    for _ in range(2):  # warm-up
        step(True)
    times: dict[str, list[float]] = {"no EMA": [], "EMA": [], "update alone": []}
    for _, variant in abba(["no EMA", "EMA", "update alone"], args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            if variant == "update alone":
                step_no += 1
                ema.update(step_no)
            else:
                step(variant == "EMA")
        times[variant].append((time.perf_counter() - t0) / args.steps * 1e3)
    base = sorted(times["no EMA"])[len(times["no EMA"]) // 2]
    rows = [[k, fmt_ms(v), f"{sorted(v)[len(v) // 2] / base:.3f}"] for k, v in times.items()]
    params = sum(p.numel() for p in model.parameters())
    print(machine_line())
    print(f"# {args.model}, {params / 1e6:.1f} M parameters, batch {args.batch} x {args.size} px, "
          f"{args.steps} steps x {args.repeats} repeats (medians [min-max] in ms per step)")
    print(table(["variant", "ms per step", "vs no EMA"], rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "params": params, "ms_per_step": times, "machine": machine_line()}, f,
                      indent=1)


if __name__ == "__main__":
    main()
