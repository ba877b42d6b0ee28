"""``tldist compress prune``: magnitude pruning with ``torch.nn.utils.prune``, accuracy before/after.

Two methods over the model's conv/linear weights (the classification head is left dense unless
``include_head``):

* **unstructured** -- :func:`torch.nn.utils.prune.global_unstructured` with L1 magnitude: the
  ``sparsity`` fraction of smallest-magnitude weights across *all* prunable layers is zeroed, so
  layers are pruned unevenly (redundant ones more).
* **structured** -- channels are *removed* (torch-pruning's dependency graph, see
  :mod:`tldist.compress.structured`): a smaller dense model, faster and smaller on disk.

The reported ``sparsity`` is always measured (zeros / total over the prunable weights), not the
target. An optional recovery fine-tune (SGD on train shards, data-parallel, masks kept fixed) follows;
then the pruning is made permanent (:func:`torch.nn.utils.prune.remove`) and the model is written
as an ordinary export directory, loadable with :func:`tldist.export.load_exported`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
import torch.distributed as dist
from torch.nn.utils import prune

from tldist.artifacts.layout import WEIGHTS
from tldist.artifacts.export import check_out_dir, check_shards, write_export, write_json
from tldist.artifacts.resolve import load_model, weights_bytes
from tldist.compress.measure import REPORT_FILE, compressed_mb, file_mb, log
from tldist.compress.structured import PRUNED_KEY, apply_channel_pruning, describe, pruning_record
from tldist.config import DataConfig
from tldist.data.pipeline import build_train_loader
from tldist.errors import UserError
from tldist.evaluate import evaluate_shards, record_normalizer
from tldist.train.distill import distillation_loss
from tldist.world import World, broadcast_module_state, multi_process, start_world, world_of


def prunable_layers(model: nn.Module, head: list[str], *, include_head: bool = False,
                    convs_only: bool = False) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the Conv2d (and Linear, unless ``convs_only``) layers to prune."""
    kinds = (nn.Conv2d,) if convs_only else (nn.Conv2d, nn.Linear)
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, kinds) or getattr(module, "weight", None) is None:
            continue
        if not include_head and any(name == h or name.startswith(h + ".") for h in head):
            continue
        layers.append((name, module))
    return layers


def apply_unstructured(layers: list[tuple[str, nn.Module]], sparsity: float) -> None:
    """Zero the globally smallest ``sparsity`` fraction of the layers' weights (masks stay attached)."""
    prune.global_unstructured([(m, "weight") for _, m in layers], pruning_method=prune.L1Unstructured,
                              amount=float(sparsity))


def make_permanent(layers: list[tuple[str, nn.Module]]) -> None:
    """Fold the masks into the weights (``prune.remove``): plain tensors, ordinary state dict keys."""
    for _, m in layers:
        if prune.is_pruned(m) and hasattr(m, "weight_mask"):
            prune.remove(m, "weight")


@torch.no_grad()
def sparsity_report(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> dict[str, Any]:
    """Measured sparsity: zeros/total over the pruned layers, over all conv/linear weights, and
    all-zero output channels of the convs."""
    zeros = total = ch_zero = ch_total = 0
    for _, m in layers:
        w = m.weight
        zeros += int((w == 0).sum())
        total += w.numel()
        if isinstance(m, nn.Conv2d):
            ch_zero += int((w.flatten(1) == 0).all(1).sum())
            ch_total += w.shape[0]
    all_zeros = all_total = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            all_zeros += int((m.weight == 0).sum())
            all_total += m.weight.numel()
    return {"sparsity": round(zeros / max(total, 1), 6), "prunable_params": total, "zero_params": zeros,
            "model_sparsity": round(all_zeros / max(all_total, 1), 6), "conv_linear_params": all_total,
            "layers": len(layers), "conv_channels_zeroed": ch_zero, "conv_channels": ch_total}


def finetune(model: nn.Module, meta: dict[str, Any], train: str, *, steps: int, lr: float, batch_size: int,
             num_workers: int, device: torch.device | str = "cpu", hflip: bool = False,
             world: World = World(), teacher: Optional[nn.Module] = None, alpha: float = 0.5,
             temperature: float = 4.0) -> dict[str, Any]:
    """Short recovery fine-tune, data-parallel over the job's ranks (call on every rank).

    SGD with Nesterov momentum and a cosine LR, BN in train mode. Each rank reads its own part of
    the train shards; gradients are averaged across ranks every step (one flat all-reduce), so the
    weights stay identical on all ranks (BN running statistics are rank 0's, see ``sync_state``).
    Pruned weights stay zero: the masks are still attached, the effective weight is
    ``weight_orig * mask``. With a ``teacher`` (e.g. the unpruned model, same inputs and classes,
    kept in eval mode) the loss is :func:`tldist.train.distill.distillation_loss` (Hinton et al. 2015:
    ``alpha * T^2 * KL + (1 - alpha) * cross-entropy``, ``T = temperature``). Returns the first and
    last losses on rank 0 (mean of 10 steps).
    """
    if teacher is not None:
        teacher.eval()

    pre = meta["preprocess"]
    cfg = DataConfig(train=[train], batch_size=batch_size, num_workers=num_workers, shuffle_buffer=256, seed=0,
                     train_crop_scale=[0.8, 1.0], hflip=hflip, pin_memory=False)
    loader = build_train_loader(cfg, world, image_size=int(pre["image_size"]),
                                interpolation=pre.get("interpolation", "bilinear"))
    normalize = record_normalizer(meta, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses: list[float] = []
    t0 = time.time()
    model.train()
    try:
        for step in range(steps):
            batch = next(loader)
            x = normalize(batch["image"].to(device))
            logits = model(x)
            loss = F.cross_entropy(logits, batch["label"].to(device))
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(x)
                loss, _ = distillation_loss(logits, teacher_logits, loss, alpha=alpha, temperature=temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(params)
            opt.step()
            sched.step()
            losses.append(loss.detach())  # no per-step host sync: read every 50 steps
            if (step + 1) % 50 == 0 or step + 1 == steps:
                log(world, f"recovery step {step + 1}/{steps}  loss {float(torch.stack(losses[-10:]).mean()):.4f}")
    finally:
        loader.close()
        model.eval()
    head, tail = [float(v) for v in losses[:10]], [float(v) for v in losses[-10:]]
    return {"steps": steps, "lr": lr, "batch_size": batch_size, "world_size": world.world_size,
            "ranks_agree": params_agree(params), "seconds": round(time.time() - t0, 1),
            "first_loss": round(sum(head) / len(head), 5), "last_loss": round(sum(tail) / len(tail), 5),
            "distilled": None if teacher is None else {"alpha": alpha, "temperature": temperature}}


@torch.no_grad()
def params_agree(params: list[nn.Parameter]) -> bool:
    """True when every rank holds the same parameter values (call on every rank)."""
    if not multi_process():
        return True
    digest = torch.stack([p.detach().double().sum() for p in params] + [p.detach().double().abs().sum() for p in params])
    gathered = [torch.zeros_like(digest) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, digest)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def average_gradients(params: list[nn.Parameter]) -> None:
    """Average ``.grad`` over ranks with one flat all-reduce (a no-op for one process; call on every rank)."""
    if not multi_process():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def prune_export(export_dir: str, out: str, *, val: str, sparsity: float, structured: bool = False, norm: int = 1,
                 include_head: bool = False, train: Optional[str] = None, finetune_steps: int = 0, lr: float = 0.01,
                 batch_size: int = 32, num_workers: int = 1, hflip: bool = False, round_to: int = 8,
                 distill: bool = False, alpha: float = 0.5, temperature: float = 4.0,
                 weights: Optional[str] = None) -> dict[str, Any]:
    """Prune an export directory into ``out`` (call on every rank); returns the report (also ``out/report.json``).

    Unstructured: ``sparsity`` is the fraction of weights zeroed (shapes kept). ``structured``: the
    fraction of channels *removed* per layer group with torch-pruning (:mod:`tldist.compress.structured`;
    ``norm`` is the importance's Ln, ``round_to`` the channel multiple); the new shapes are recorded in
    ``model.json``. Accuracy on ``val`` is measured exactly across ranks before pruning, after pruning
    and (with ``finetune_steps``) after recovery; the fine-tune is data-parallel over the ranks, and
    with ``distill`` it learns from the unpruned model's soft targets (``alpha``, ``temperature``).
    ``export_dir`` is any model path (:func:`tldist.artifacts.resolve.load_model`; ``weights``: raw or
    ema of a checkpoint or run). A model pruned before keeps its record and is pruned further.
    """
    if structured and not 0.0 < sparsity < 1.0:
        raise UserError(f"--sparsity has bad value {sparsity}: with --structured give the fraction of channels to "
                        "remove, 0 < s < 1")
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"--sparsity has bad value {sparsity}: give the fraction of weights to zero, 0 <= s < 1")
    if norm not in (1, 2):
        raise UserError(f"--norm has bad value {norm}: use 1 (L1) or 2 (L2)")
    if finetune_steps < 0:
        raise UserError(f"--finetune-steps has bad value {finetune_steps}: must be >= 0")
    if finetune_steps and not train:
        raise UserError("--finetune-steps needs --train SHARDS: the train shard set to fine-tune on")
    if distill and not finetune_steps:
        raise UserError("--distill needs --finetune-steps N > 0 and --train SHARDS: distillation happens in the "
                        "recovery fine-tune")
    if structured and include_head:
        raise UserError("--include-head does not apply to --structured: removing head outputs would drop classes")
    if not 0.0 <= alpha <= 1.0 or temperature <= 0:
        raise UserError(f"--alpha {alpha} / --temperature {temperature}: need 0 <= alpha <= 1 and temperature > 0")
    check_out_dir(out, {"the export directory": export_dir})
    loaded = load_model(export_dir, weights=weights, flag="MODEL", single_head="tldist compress")
    model, meta, head = loaded.model, loaded.meta, list(loaded.info.head)
    check_shards(val, meta, export_dir, "val")
    if finetune_steps:
        check_shards(train, meta, export_dir, "train", same_order=True)
    accelerator = start_world()
    world, device = world_of(accelerator), accelerator.device
    log(world, f"{export_dir}: {loaded.artifact.describe()}")
    model.to(device)
    teacher = None
    if distill:
        import copy

        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    layers = [] if structured else prunable_layers(model, head, include_head=include_head)
    if not structured and not layers:
        raise UserError(f"model '{meta['model']}' in '{export_dir}' has no conv/linear layers to prune"
                        + ("" if include_head else " outside its head (try --include-head)"))

    def ev(m: nn.Module) -> dict[str, Any]:
        return evaluate_shards(m, meta, val, world, device=device, batch_size=2 * batch_size, num_workers=num_workers)

    method = f"structured-l{norm}-channels-removed" if structured else "global-unstructured-l1"
    log(world, f"{meta['model']}: evaluating the unpruned model on {val}")
    baseline = ev(model)
    log(world, f"baseline top-1 {baseline['top1']:.2f}%  ({baseline['count']} samples)")
    pruning = None
    if structured:
        size = int(meta["preprocess"]["image_size"])
        example = torch.randn(1, 3, size, size, device=device)
        pruning = apply_channel_pruning(model, head, example, ratio=sparsity, norm=norm,
                                        round_to=round_to, name=meta["model"])
        stats = {k: v for k, v in pruning.items() if k != "modules"}
        stats["param_ratio"] = round(pruning["params_after"] / pruning["params_before"], 4)
        stats["modules_resized"] = len(pruning["modules"])
    else:
        apply_unstructured(layers, sparsity)
        stats = sparsity_report(model, layers)
    broadcast_module_state(model)
    pruned = ev(model)
    if structured:
        log(world, f"{method} ratio {sparsity:.2f}: {describe(pruning)}; top-1 {pruned['top1']:.2f}%")
    else:
        log(world, f"{method} target {sparsity:.2f}: measured sparsity {stats['sparsity']:.4f} of "
                   f"{stats['prunable_params']} weights; top-1 {pruned['top1']:.2f}%")
    recovered, tune = None, None
    if finetune_steps:
        tune = finetune(model, meta, train, steps=finetune_steps, lr=lr, batch_size=batch_size,
                        num_workers=num_workers, device=device, hflip=hflip, world=world, teacher=teacher,
                        alpha=alpha, temperature=temperature)
        broadcast_module_state(model)
        recovered = ev(model)
        log(world, f"after {finetune_steps} recovery steps{' (distilled)' if distill else ''}: "
                   f"top-1 {recovered['top1']:.2f}%")
    if not structured:
        make_permanent(layers)
        stats = sparsity_report(model, layers)  # unchanged by recovery: masked weights stayed zero
    final = recovered or pruned
    report: dict[str, Any] = {
        "command": "prune", "source": str(Path(export_dir).resolve()), "model": meta["model"], "val": val,
        "method": method, "target_sparsity": sparsity, "include_head": include_head, **stats,
        "baseline": baseline, "pruned": pruned, "recovered": recovered, "finetune": tune,
        "top1_delta": round(final["top1"] - baseline["top1"], 4), "world_size": world.world_size,
    }
    if world.is_main:
        keys = ("method", "target_sparsity", "include_head", "top1_delta") + (() if structured else ("sparsity",))
        new_meta = {**meta, "compression": {k: report[k] for k in keys}, "source_export": report["source"]}
        new_meta.pop("step", None)
        if structured:  # a model pruned before: its widths are the record's, then these changes
            before = (meta.get(PRUNED_KEY) or {}).get("modules") or {}
            record = pruning_record(pruning, ratio=sparsity, norm=norm, round_to=round_to)
            record["modules"] = _merge_shapes(before, record["modules"])
            new_meta[PRUNED_KEY] = record
        write_export(model, new_meta, out, extra={REPORT_FILE: report})
        weights = Path(out) / WEIGHTS
        source = weights_bytes(loaded.artifact)
        report["size_mb"] = {"safetensors": file_mb(weights), "zlib": compressed_mb(weights),
                             "source": file_mb(source), "source_zlib": compressed_mb(source)}
        write_json(Path(out) / REPORT_FILE, report)
        log(world, f"wrote {out} (model.safetensors + model.json + {REPORT_FILE})")
    return report


def _merge_shapes(before: dict[str, dict[str, Any]], changed: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Shape attributes of a model pruned twice: the earlier record, updated by the new changes."""
    merged = {name: dict(attrs) for name, attrs in before.items()}
    for name, attrs in changed.items():
        merged.setdefault(name, {}).update(attrs)
    return merged
