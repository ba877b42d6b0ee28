"""Label-budget probe for the demo's source: fine-tune vs scratch on k digits per class, in one process.

A quick stand-in for ``tldist study`` used to choose the demo's pretraining source: the same
data generators (:mod:`tldist.data.demo`), torchvision's resnet18 at 32 px, AdamW, the demo
configs' learning rates, equal steps per arm; images are decoded once into tensors (no shards,
no launcher), so one cell takes seconds. Arms are interleaved per seed (A/B/A/B) because the
machine is shared. Example (numbers in BENCHMARKS.md / the demo report):

    python bench/demo_budget.py --source-per-class 300 --source-epochs 3 --ks 1,5,10,0 --seeds 0,1,2 \
        --steps 150 --json bench/results/demo_budget.json
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def tensors(source) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for s in source:
        xs.append(np.asarray(Image.open(io.BytesIO(s.data)).convert("RGB")))
        ys.append(s.label)
    return torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous(), torch.tensor(ys)


def prep(x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    x = x.float() / 255.0
    if gen is not None:  # random translation by up to 3 px (a light stand-in for RandomResizedCrop)
        dx, dy = torch.randint(-3, 4, (2,), generator=gen).tolist()
        x = torch.roll(x, (dy, dx), (2, 3))
    return (x - MEAN) / STD


def model(num_classes: int) -> torch.nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=num_classes)


def train(net, x, y, *, steps: int, lr: float, batch: int, seed: int, head_lr_mult: float = 1.0, warmup: float = 0.1):
    gen = torch.Generator().manual_seed(seed)
    head = [p for n, p in net.named_parameters() if n.startswith("fc.")]
    body = [p for n, p in net.named_parameters() if not n.startswith("fc.")]
    opt = torch.optim.AdamW([{"params": body, "lr": lr}, {"params": head, "lr": lr * head_lr_mult}], weight_decay=0.05)
    base = [g["lr"] for g in opt.param_groups]
    net.train()
    for step in range(steps):
        w = min(1.0, (step + 1) / max(1, warmup * steps))
        cos = 0.5 * (1 + np.cos(np.pi * step / steps))
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * w * cos
        idx = torch.randint(0, len(y), (batch,), generator=gen)
        loss = F.cross_entropy(net(prep(x[idx], gen)), y[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net


@torch.no_grad()
def top1(net, x, y) -> float:
    net.eval()
    pred = torch.cat([net(prep(x[i:i + 256], None)).argmax(1) for i in range(0, len(y), 256)])
    return float((pred == y).float().mean()) * 100


def subset(y: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    if k <= 0:
        return torch.arange(len(y))
    rng = np.random.default_rng([seed, 11])
    return torch.tensor(np.concatenate([rng.choice(np.flatnonzero(y.numpy() == c), k, replace=False)
                                        for c in range(10)]))


def main() -> None:
    from tldist.data.demo import digits_samples, glyphs_samples

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source-per-class", type=int, default=300)
    ap.add_argument("--source-epochs", type=float, default=3)
    ap.add_argument("--source-chars", default="digits", help="digits or digits+letters")
    ap.add_argument("--ks", default="1,5,10,0", help="labels per class; 0 = all")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--arms", default="finetune,scratch")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (more hurt on a shared 2-core machine)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    classes, src = glyphs_samples(args.source_per_class, chars=args.source_chars, seed=0)
    xs, ys = tensors(src)
    x_tr, y_tr = tensors(digits_samples("train")[1])
    x_va, y_va = tensors(digits_samples("val")[1])
    print(f"data {time.time() - t0:.1f} s: source {len(ys)}, target train {len(y_tr)}, val {len(y_va)}", flush=True)
    torch.manual_seed(0)
    t1 = time.time()
    src_steps = int(args.source_epochs * len(ys) / 64)
    pre = train(model(len(classes)), xs, ys, steps=src_steps, lr=4e-3 * 64 / 256, batch=64, seed=0, warmup=0.1)
    print(f"source: {src_steps} steps in {time.time() - t1:.0f} s", flush=True)
    state = {k: v for k, v in pre.state_dict().items() if not k.startswith("fc.")}
    rows = []
    for k in [int(v) for v in args.ks.split(",")]:
        for seed in [int(v) for v in args.seeds.split(",")]:
            idx = subset(y_tr, k, seed)
            for arm in args.arms.split(","):
                torch.manual_seed(seed)
                net = model(10)
                if arm == "finetune":
                    net.load_state_dict(state, strict=False)
                    if classes[:10] == [str(i) for i in range(10)]:  # head rows matched by class name
                        net.fc.weight.data.copy_(pre.fc.weight.data[:10]); net.fc.bias.data.copy_(pre.fc.bias.data[:10])
                    lr, mult = 2e-3 * 32 / 256, 2.0
                else:
                    lr, mult = 4e-3 * 32 / 256, 1.0
                t = time.time()
                train(net, x_tr[idx], y_tr[idx], steps=args.steps, lr=lr, batch=32, seed=seed, head_lr_mult=mult)
                acc = top1(net, x_va, y_va)
                rows.append({"arm": arm, "k": k, "seed": seed, "top1": acc, "seconds": round(time.time() - t, 1)})
                print(json.dumps(rows[-1]), flush=True)
    for k in sorted({r["k"] for r in rows}):
        line = [f"k={k or 'all'}"]
        for arm in args.arms.split(","):
            v = [r["top1"] for r in rows if r["k"] == k and r["arm"] == arm]
            line.append(f"{arm} {np.mean(v):.1f} [{min(v):.1f}, {max(v):.1f}]")
        print("  ".join(line))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "seconds": round(time.time() - t0, 1)}, f, indent=1)


if __name__ == "__main__":
    main()
