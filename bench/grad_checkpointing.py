"""Peak memory and step time of activation checkpointing (``train.grad_checkpointing``), side by side.

Each measurement is a fresh process (peak RSS is a per-process high-water mark): it builds the model with
tldist's factory (``pretrained=false``), places it with :func:`tldist.train.parallelize.parallelize` with
``train.grad_checkpointing`` off or on (timm's ``set_grad_checkpointing`` for ``timm:`` models,
``torch.utils.checkpoint`` on the FSDP2 blocks for torchvision ones), then runs a few training steps
(forward, backward, SGD). It reports the peak RSS during the steps (``VmHWM`` after resetting it with
``/proc/self/clear_refs``) above the RSS before the first step (what the steps add: activations,
gradients, optimizer state), that whole peak, and the median step time after the first;
variants are interleaved A B B A over repeats, on CPU.

    python bench/grad_checkpointing.py --models resnet50 timm:vit_base_patch16_224 --batch 16 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import common  # noqa: F401  (puts the repo on sys.path)
from common import REPO, abba, bench_env, fmt_ms, machine_line, median_spread, table


def rss_mb() -> float:
    """Resident set size now (MiB), from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its RSS now (Linux ``/proc/self/clear_refs`` value 5), so the
    peak read after the steps is the steps' own, not the imports' or the model build's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    """Peak RSS (MiB) since :func:`reset_peak`: VmHWM, else ``ru_maxrss`` (peak since the process started)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(model_name: str, checkpointing: bool, batch: int, size: int, steps: int) -> dict:
    """One measurement in this process (the child): {"base_mb", "peak_mb", "step_s": [...]}."""
    import torch

    from tldist.config import ModelConfig, TrainConfig
    from tldist.models.factory import build_model
    from tldist.train.parallelize import fsdp_block_names, parallelize
    from tldist.world import World

    torch.manual_seed(0)
    cfg = TrainConfig(grad_checkpointing=checkpointing, channels_last=False)
    model, info = build_model(ModelConfig(name=model_name, pretrained=False), 100, image_size=size)
    blocks = fsdp_block_names(cfg, model, info.block_class_names)
    par = parallelize(model, cfg, device=torch.device("cpu"), world=World(), fsdp=False, fsdp_blocks=blocks)
    opt = torch.optim.SGD(par.model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 100, (batch,))
    base = rss_mb()  # model + inputs; the steps add activations, gradients and the momentum buffers
    since_start = not reset_peak()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(par.model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"base_mb": base, "peak_mb": peak_mb(), "step_s": times, "peak_since_start": since_start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet50", "timm:vit_base_patch16_224"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=3, help="training steps per measurement (the first is warm-up)")
    ap.add_argument("--repeats", type=int, default=2, help="fresh processes per variant (interleaved A B B A)")
    ap.add_argument("--threads", type=int, default=2, help="OMP threads of the measuring process")
    ap.add_argument("--json", default=None, help="write the measurements here")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "ON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1] == "on", args.batch, args.size, args.steps)))
        return

    print(machine_line())
    print(f"# batch {args.batch} x {args.size}px, {args.steps} steps per process ({args.threads} threads), "
          f"{args.repeats} processes per variant, SGD + momentum, fp32, CPU")
    results: dict[str, dict[str, list[dict]]] = {}
    for model_name in args.models:
        for _, variant in abba(["off", "on"], args.repeats):
            cmd = [sys.executable, __file__, "--child", model_name, variant, "--batch", str(args.batch),
                   "--size", str(args.size), "--steps", str(args.steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                                  env=bench_env(OMP_NUM_THREADS=str(args.threads)))
            if proc.returncode != 0:
                raise SystemExit(f"{model_name} {variant} failed:\n{proc.stderr[-3000:]}")
            results.setdefault(model_name, {}).setdefault(variant, []).append(json.loads(proc.stdout.splitlines()[-1]))
            print(f"  {model_name:28s} {variant:3s} peak {results[model_name][variant][-1]['peak_mb']:.0f} MiB",
                  flush=True)

    rows = []
    for model_name, by in results.items():
        added = {v: [m["peak_mb"] - m["base_mb"] for m in ms] for v, ms in by.items()}
        peak = {v: [m["peak_mb"] for m in ms] for v, ms in by.items()}
        step = {v: [t for m in ms for t in m["step_s"][1:]] for v, ms in by.items()}
        rows.append([model_name, fmt_ms(added["off"], 0), fmt_ms(added["on"], 0),
                     f"{median_spread(added['on'])[0] / median_spread(added['off'])[0]:.2f}",
                     fmt_ms(peak["off"], 0), fmt_ms(peak["on"], 0),
                     f"{median_spread(peak['on'])[0] / median_spread(peak['off'])[0]:.2f}",
                     fmt_ms(step["off"]), fmt_ms(step["on"]),
                     f"{median_spread(step['on'])[0] / median_spread(step['off'])[0]:.2f}"])
    print(table(["model", "added MiB off", "added MiB on", "ratio", "peak RSS MiB off", "peak RSS MiB on", "ratio",
                 "step s off", "step s on", "ratio"], rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_line(), "args": {k: v for k, v in vars(args).items() if k != "child"},
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
