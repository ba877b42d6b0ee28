"""A plain DDP image-classification script in the style of torchvision's reference recipe.

This is the "standard script" tldist is compared with in ``bench/versus.py``. It follows the
documented settings of torchvision's ``references/classification`` recipe, written from those
settings (not copied): ``ImageFolder`` + ``DistributedSampler`` + ``DataLoader`` (workers emit
float32, normalized tensors), RandomResizedCrop + RandomHorizontalFlip for training,
Resize(crop/0.875) + CenterCrop for evaluation, SGD with momentum 0.9 and weight decay 1e-4 on
all parameters, an epoch-wise LR schedule (cosine or step) with optional linear warmup,
``DistributedDataParallel`` over NCCL (GPU) or gloo (CPU), evaluation after every epoch, a
checkpoint after every epoch (when ``--output-dir`` is given), and a fresh DataLoader iterator
(non-persistent workers) per epoch.

Deviations, all flags of this script: ``--crop-scale-min`` (RandomResizedCrop's lower area
bound; the recipe uses 0.08, too aggressive for 32 px digits) and ``--seed``. The LR is used as
given (the recipe's 0.1 is for a global batch of 256; scale it yourself).

Launch (CPU, 2 processes)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 bench/reference_train.py \\
        --data-path DIR --model resnet18 --batch-size 32 --epochs 5 --lr 0.025 --json result.json

``DIR`` holds ``train/<class>/*`` and ``val/<class>/*``. Rank 0 prints one line per epoch and
writes ``--json`` (final top-1, images seen, train seconds excluding evaluation).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-path", required=True, help="ImageFolder root with train/ and val/")
    p.add_argument("--model", default="resnet18", help="torchvision model name (random init)")
    p.add_argument("--batch-size", type=int, default=32, help="images per process")
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--workers", type=int, default=16, help="DataLoader workers per process")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=1e-4)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--lr-scheduler", default="steplr", choices=["steplr", "cosineannealinglr"])
    p.add_argument("--lr-step-size", type=int, default=30)
    p.add_argument("--lr-gamma", type=float, default=0.1)
    p.add_argument("--lr-warmup-epochs", type=int, default=0)
    p.add_argument("--lr-warmup-decay", type=float, default=0.01)
    p.add_argument("--train-crop-size", type=int, default=224)
    p.add_argument("--val-crop-size", type=int, default=224)
    p.add_argument("--val-resize-size", type=int, default=0, help="0: val crop / 0.875")
    p.add_argument("--crop-scale-min", type=float, default=0.08)
    p.add_argument("--hflip-prob", type=float, default=0.5)
    p.add_argument("--print-freq", type=int, default=10)
    p.add_argument("--output-dir", default="", help="save a checkpoint here after every epoch")
    p.add_argument("--json", default="", help="rank 0 writes the final metrics here")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def init_distributed() -> tuple[int, int, torch.device]:
    """Process group from torchrun's environment; (rank, world_size, device)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def build_data(args, world: int, rank: int):
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler
    from torchvision import datasets, transforms

    norm = [transforms.PILToTensor(), transforms.ConvertImageDtype(torch.float), transforms.Normalize(MEAN, STD)]
    train_tf = transforms.Compose([
        transforms.RandomResizedCrop(args.train_crop_size, scale=(args.crop_scale_min, 1.0),
                                     interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
        transforms.RandomHorizontalFlip(args.hflip_prob), *norm])
    resize = args.val_resize_size or int(math.floor(args.val_crop_size / 0.875))
    val_tf = transforms.Compose([transforms.Resize(resize, antialias=True), transforms.CenterCrop(args.val_crop_size),
                                 *norm])
    train_ds = datasets.ImageFolder(os.path.join(args.data_path, "train"), train_tf)
    val_ds = datasets.ImageFolder(os.path.join(args.data_path, "val"), val_tf)
    train_sampler = DistributedSampler(train_ds, world, rank, shuffle=True, seed=args.seed)
    val_sampler = DistributedSampler(val_ds, world, rank, shuffle=False)
    train_loader = DataLoader(train_ds, batch_size=args.batch_size, sampler=train_sampler, num_workers=args.workers,
                              pin_memory=torch.cuda.is_available())
    val_loader = DataLoader(val_ds, batch_size=args.batch_size, sampler=val_sampler, num_workers=args.workers,
                            pin_memory=torch.cuda.is_available())
    return train_ds, train_loader, train_sampler, val_loader


def build_scheduler(args, optimizer):
    main_epochs = args.epochs - args.lr_warmup_epochs
    if args.lr_scheduler == "steplr":
        main = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step_size, gamma=args.lr_gamma)
    else:
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(main_epochs, 1))
    if args.lr_warmup_epochs <= 0:
        return main
    warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=args.lr_warmup_decay,
                                             total_iters=args.lr_warmup_epochs)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, main], milestones=[args.lr_warmup_epochs])


def train_one_epoch(model, criterion, optimizer, loader, device, epoch: int, args, rank: int) -> tuple[int, float]:
    """One pass over this rank's share; returns (images this rank trained on, seconds)."""
    model.train()
    images_done, t_start, t_last = 0, time.perf_counter(), time.perf_counter()
    for i, (images, target) in enumerate(loader):
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        loss = criterion(model(images), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        images_done += images.shape[0]
        if rank == 0 and args.print_freq and (i + 1) % args.print_freq == 0:
            now = time.perf_counter()
            print(f"epoch [{epoch}] [{i + 1}/{len(loader)}] loss {loss.item():.4f} "
                  f"lr {optimizer.param_groups[0]['lr']:.4g} "
                  f"{args.print_freq * images.shape[0] / (now - t_last):.1f} img/s/rank", flush=True)
            t_last = now
    return images_done, time.perf_counter() - t_start


@torch.no_grad()
def evaluate(model, criterion, loader, device, world: int) -> tuple[float, float, int]:
    """(top-1 %, mean loss, samples) summed over ranks."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # correct, loss sum, count
    for images, target in loader:
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        out = model(images)
        sums[0] += (out.argmax(1) == target).sum().item()
        sums[1] += criterion(out, target).item() * images.shape[0]
        sums[2] += images.shape[0]
    if world > 1:
        sums = sums.to(device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    correct, loss_sum, count = sums.tolist()
    return 100.0 * correct / max(count, 1), loss_sum / max(count, 1), int(count)


def main(argv=None) -> dict:
    import torchvision

    args = get_args(argv)
    t_job = time.perf_counter()
    rank, world, device = init_distributed()
    torch.manual_seed(args.seed)
    train_ds, train_loader, train_sampler, val_loader = build_data(args, world, rank)
    model = torchvision.models.get_model(args.model, weights=None, num_classes=len(train_ds.classes)).to(device)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = build_scheduler(args, optimizer)
    if args.output_dir and rank == 0:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    train_images, train_seconds, history = 0, 0.0, []
    top1 = loss = 0.0
    for epoch in range(args.epochs):
        train_sampler.set_epoch(epoch)
        n, secs = train_one_epoch(model, criterion, optimizer, train_loader, device, epoch, args, rank)
        scheduler.step()
        counts = torch.tensor([float(n), secs], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(counts)  # images summed; seconds summed -> mean below
        train_images += int(counts[0])
        train_seconds += float(counts[1]) / world
        top1, loss, count = evaluate(model, criterion, val_loader, device, world)
        history.append({"epoch": epoch, "top1": top1, "loss": loss})
        if rank == 0:
            print(f"epoch {epoch}: val top1 {top1:.2f}% loss {loss:.4f} ({count} samples); "
                  f"train {counts[0] / (counts[1] / world):.1f} img/s", flush=True)
            if args.output_dir:
                raw = model.module if hasattr(model, "module") else model
                ckpt = {"model": raw.state_dict(), "optimizer": optimizer.state_dict(),
                        "lr_scheduler": scheduler.state_dict(), "epoch": epoch, "args": vars(args)}
                torch.save(ckpt, os.path.join(args.output_dir, f"model_{epoch}.pth"))
                torch.save(ckpt, os.path.join(args.output_dir, "checkpoint.pth"))
    result = {"top1": top1, "loss": loss, "epochs": args.epochs, "world_size": world,
              "train_images": train_images, "train_seconds": train_seconds,
              "train_images_per_s": train_images / max(train_seconds, 1e-9),
              "job_seconds_in_script": time.perf_counter() - t_job, "history": history}
    if rank == 0 and args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, args.json)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
