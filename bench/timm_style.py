"""A DDP fine-tuning script written the way a timm user writes one: the baseline of ``bench/versus_timm.py``.

It follows the structure and flag names of timm's ``train.py`` (written from timm's public API and
documented flags, not copied), condensed to what a recipe such as DeiT's or MAE's fine-tune needs:

* model: ``timm.create_model(name, pretrained=False, num_classes=..., drop_path_rate=...)``;
* data: torchvision ``ImageFolder`` + ``DistributedSampler`` + ``DataLoader`` (``drop_last`` for
  training, as timm's ``create_loader`` does), transforms from ``timm.data.create_transform``
  (RandomResizedCrop + flip + ``auto_augment`` policy string + color jitter + random erasing for
  training; resize to ``img_size / crop_pct`` + centre crop for evaluation) with the size, crop_pct,
  interpolation and mean/std of ``timm.data.resolve_data_config(args, model=model)``; workers emit
  float32, normalized tensors;
* ``timm.data.Mixup`` (mixup/cutmix, label smoothing folded into the soft targets) with
  ``SoftTargetCrossEntropy``; ``LabelSmoothingCrossEntropy`` when mixup is off;
* ``timm.optim.create_optimizer_v2`` (no weight decay on norms and biases, optional layer decay);
* ``timm.scheduler.create_scheduler_v2`` cosine with warmup, stepped per update
  (timm's ``--sched-on-updates``);
* ``timm.utils.ModelEmaV3`` updated after every optimizer step (``step=num_updates``);
* ``timm.utils.distribute_bn(reduce)`` before each evaluation (timm's default ``--dist-bn reduce``),
  for the model and its EMA; evaluation of both after every epoch; a checkpoint (model, EMA,
  optimizer, scheduler) after every epoch;
* DDP over gloo on CPU (NCCL on GPUs), launched by ``torchrun``; seeds ``seed + rank`` as timm does.

Launch (CPU, 2 processes)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 bench/timm_style.py --data-dir DIR \\
        --model resnet18 --img-size 32 -b 32 --epochs 10 --opt adamw --lr 1e-3 --aa rand-m9-mstd0.5-inc1 \\
        --reprob 0.25 --mixup 0.8 --cutmix 1.0 --smoothing 0.1 --model-ema --json result.json

``DIR`` holds ``train/<class>/*`` and ``val/<class>/*``. Rank 0 writes ``--json``: final top-1 of
the model and of its EMA, images trained and training seconds (evaluation excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from reference_train import evaluate, init_distributed  # same process-group setup and eval as the plain baseline


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="ImageFolder root with train/ and val/")
    p.add_argument("--model", default="resnet18", help="timm model name (random init)")
    p.add_argument("--img-size", type=int, default=None, help="default: the model's pretrained_cfg input size")
    p.add_argument("--crop-pct", type=float, default=None, help="default: the model's pretrained_cfg")
    p.add_argument("--interpolation", default=None, help="default: the model's pretrained_cfg")
    p.add_argument("--mean", type=float, nargs=3, default=None)
    p.add_argument("--std", type=float, nargs=3, default=None)
    p.add_argument("-b", "--batch-size", type=int, default=128, help="images per process")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("-j", "--workers", type=int, default=4, help="DataLoader workers per process")
    p.add_argument("--opt", default="adamw")
    p.add_argument("--lr", type=float, default=5e-4, help="used as given (scale to the global batch yourself)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--layer-decay", type=float, default=None)
    p.add_argument("--sched", default="cosine")
    p.add_argument("--warmup-epochs", type=int, default=0)
    p.add_argument("--warmup-lr", type=float, default=1e-5)
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--warmup-prefix", action="store_true", help="cosine starts after the warm-up (timm's flag)")
    p.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0))
    p.add_argument("--hflip", type=float, default=0.5)
    p.add_argument("--color-jitter", type=float, default=0.4)
    p.add_argument("--aa", default=None, help="auto-augment policy string, e.g. rand-m9-mstd0.5-inc1")
    p.add_argument("--reprob", type=float, default=0.0)
    p.add_argument("--remode", default="pixel")
    p.add_argument("--recount", type=int, default=1)
    p.add_argument("--mixup", type=float, default=0.0)
    p.add_argument("--cutmix", type=float, default=0.0)
    p.add_argument("--mixup-prob", type=float, default=1.0)
    p.add_argument("--mixup-switch-prob", type=float, default=0.5)
    p.add_argument("--mixup-mode", default="batch")
    p.add_argument("--smoothing", type=float, default=0.1)
    p.add_argument("--drop-path", type=float, default=None)
    p.add_argument("--model-ema", action="store_true")
    p.add_argument("--model-ema-decay", type=float, default=0.9998)
    p.add_argument("--model-ema-warmup", action="store_true")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output", default="", help="save a checkpoint here after every epoch")
    p.add_argument("--json", default="", help="rank 0 writes the final metrics here")
    return p.parse_args(argv)


def build_loaders(args, data_config: dict, world: int, rank: int):
    from timm.data import create_transform
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler
    from torchvision.datasets import ImageFolder

    common = dict(input_size=data_config["input_size"], interpolation=data_config["interpolation"],
                  mean=data_config["mean"], std=data_config["std"])
    train_tf = create_transform(is_training=True, scale=tuple(args.scale), hflip=args.hflip,
                                color_jitter=args.color_jitter, auto_augment=args.aa, re_prob=args.reprob,
                                re_mode=args.remode, re_count=args.recount, **common)
    eval_tf = create_transform(is_training=False, crop_pct=data_config["crop_pct"], **common)
    train_ds = ImageFolder(os.path.join(args.data_dir, "train"), train_tf)
    val_ds = ImageFolder(os.path.join(args.data_dir, "val"), eval_tf)
    if rank == 0:
        print(f"data config {data_config}\ntrain {train_tf}\neval {eval_tf}", flush=True)
    train_sampler = DistributedSampler(train_ds, world, rank, shuffle=True, seed=args.seed)
    val_sampler = DistributedSampler(val_ds, world, rank, shuffle=False)
    pin = torch.cuda.is_available()
    train_loader = DataLoader(train_ds, batch_size=args.batch_size, sampler=train_sampler, num_workers=args.workers,
                              pin_memory=pin, drop_last=True, persistent_workers=args.workers > 0)
    val_loader = DataLoader(val_ds, batch_size=args.batch_size, sampler=val_sampler, num_workers=args.workers,
                            pin_memory=pin)
    return train_ds, train_loader, train_sampler, val_loader


def main(argv=None) -> dict:
    import timm
    from timm.data import Mixup, resolve_data_config
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3, distribute_bn
    from torchvision.datasets import ImageFolder

    args = get_args(argv)
    t_job = time.perf_counter()
    rank, world, device = init_distributed()
    num_classes = len(ImageFolder(os.path.join(args.data_dir, "train")).classes)
    kw = {} if args.drop_path is None else {"drop_path_rate": args.drop_path}
    torch.manual_seed(args.seed)  # same initial weights (and EMA copy) on every rank
    model = timm.create_model(args.model, pretrained=False, num_classes=num_classes, **kw).to(device)
    data_config = resolve_data_config(vars(args), model=model)  # size, crop_pct, interpolation, mean/std
    train_ds, train_loader, train_sampler, val_loader = build_loaders(args, data_config, world, rank)
    seed = args.seed + rank  # then timm's random_seed(seed, rank): per-rank augmentation, mixup, drop path
    torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, layer_decay=args.layer_decay)
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) \
        if args.model_ema else None
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    updates_per_epoch = len(train_loader)
    scheduler, _ = create_scheduler_v2(optimizer, sched=args.sched, num_epochs=args.epochs,
                                       warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr, min_lr=args.min_lr,
                                       warmup_prefix=args.warmup_prefix,
                                       step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    mixup_active = args.mixup > 0 or args.cutmix > 0
    mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                     switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
                     num_classes=num_classes) if mixup_active else None
    if mixup_active:
        train_loss_fn = SoftTargetCrossEntropy()
    elif args.smoothing:
        train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss_fn = nn.CrossEntropyLoss()
    val_loss_fn = nn.CrossEntropyLoss()
    if args.output and rank == 0:
        Path(args.output).mkdir(parents=True, exist_ok=True)

    num_updates, train_images, train_seconds, history = 0, 0, 0.0, []
    top1 = ema_top1 = float("nan")
    for epoch in range(args.epochs):
        train_sampler.set_epoch(epoch)
        model.train()
        t0, seen = time.perf_counter(), 0
        for images, target in train_loader:
            images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
            if mixup_fn is not None:
                images, target = mixup_fn(images, target)
            loss = train_loss_fn(model(images), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            num_updates += 1
            if model_ema is not None:
                model_ema.update(model, step=num_updates)
            scheduler.step_update(num_updates=num_updates)
            seen += images.shape[0]
        counts = torch.tensor([float(seen), time.perf_counter() - t0], dtype=torch.float64)
        if world > 1:
            distribute_bn(model, world, reduce=True)
            torch.distributed.all_reduce(counts)
        train_images += int(counts[0])
        train_seconds += float(counts[1]) / world
        top1, loss_val, n_val = evaluate(model, val_loss_fn, val_loader, device, world)
        if model_ema is not None:
            if world > 1:
                distribute_bn(model_ema, world, reduce=True)
            ema_top1, _, _ = evaluate(model_ema.module, val_loss_fn, val_loader, device, world)
        scheduler.step(epoch + 1)
        history.append({"epoch": epoch, "top1": top1, "ema_top1": ema_top1, "loss": loss_val})
        if rank == 0:
            print(f"epoch {epoch}: val top1 {top1:.2f}% ema {ema_top1:.2f}% loss {loss_val:.4f} ({n_val} samples); "
                  f"train {counts[0] / (counts[1] / world):.1f} img/s", flush=True)
            if args.output:
                raw = model.module if hasattr(model, "module") else model
                ckpt = {"epoch": epoch, "arch": args.model, "state_dict": raw.state_dict(),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "state_dict_ema": model_ema.module.state_dict() if model_ema is not None else None,
                        "args": vars(args)}
                torch.save(ckpt, os.path.join(args.output, "last.pth.tar"))
    result = {"top1": top1, "ema_top1": ema_top1, "epochs": args.epochs, "world_size": world,
              "train_images": train_images, "train_seconds": train_seconds,
              "train_images_per_s": train_images / max(train_seconds, 1e-9), "updates": num_updates,
              "job_seconds_in_script": time.perf_counter() - t_job, "history": history}
    if rank == 0 and args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, args.json)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
