"""The optimizer side of training: the optimizer over the param groups, LR scaling, and the schedule.

Param groups (layer-wise LR decay, head LR multiplier, no weight decay on norms and biases) come from
:func:`tldist.models.param_groups.build_param_groups` with an ``lr_scale`` each; here they get their
LR (:func:`scaled_lr` x ``lr_scale``), the optimizer (:func:`build_optimizer`) and a linear warm-up
then cosine decay, stepped once per optimizer step (:func:`build_scheduler`). The layout follows timm's
``timm/optim`` and MAE's ``util/lr_decay.py`` + ``util/lr_sched.py``.
"""

from __future__ import annotations

import math

import torch

from tldist.config import TrainConfig
from tldist.errors import ConfigError


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                    min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying :func:`lr_factor` to every param group's own LR (so LLRD scales survive)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_ratio))


def lr_scaling_rule(cfg) -> str:
    """``linear``, ``sqrt`` or ``absolute``: how ``optim.lr`` (``cfg``) follows the global batch. ``auto`` is
    timm train.py's rule for an empty ``--lr-base-scale``: ``sqrt`` when the optimizer name contains ``ada`` or
    ``lamb`` (here ``adamw``, ``lamb``), else ``linear``."""
    if cfg.lr_ref_batch == 0:
        return "absolute"
    if cfg.lr_scaling == "auto":
        return "sqrt" if any(k in cfg.name.lower() for k in ("ada", "lamb")) else "linear"
    return cfg.lr_scaling


def scaled_lr(cfg, global_batch: int) -> float:
    """The peak LR of ``optim.*`` (``cfg``) at ``global_batch`` images per optimizer step (all ranks, all
    accumulated micro-batches): ``optim.lr x (global_batch / optim.lr_ref_batch) ** p`` with p = 1 for
    ``linear`` (Goyal et al. 2017, "Accurate, Large Minibatch SGD") and 0.5 for ``sqrt`` (Krizhevsky 2014,
    "One weird trick"), exactly timm train.py's ``--lr-base``/``--lr-base-size``/``--lr-base-scale``;
    ``optim.lr`` itself when ``optim.lr_ref_batch`` is 0 (timm's ``--lr``)."""
    rule = lr_scaling_rule(cfg)
    if rule == "absolute":
        return float(cfg.lr)
    ratio = global_batch / cfg.lr_ref_batch
    return float(cfg.lr * (ratio ** 0.5 if rule == "sqrt" else ratio))


def describe_lr(cfg, global_batch: int) -> str:
    """One line stating the peak LR and the rule that produced it, with timm train.py's equivalent flags, e.g.
    ``peak LR 0.2 = optim.lr 0.1 x 512/256 (linear scaling by global batch; timm: --lr-base 0.1 --lr-base-size 256
    --lr-base-scale linear)``."""
    lr, rule = scaled_lr(cfg, global_batch), lr_scaling_rule(cfg)
    if rule == "absolute":
        return (f"peak LR {lr:.6g} = optim.lr, unscaled (optim.lr_ref_batch=0; global batch {global_batch}; "
                f"timm: --lr {cfg.lr:.6g})")
    factor = f"{global_batch}/{cfg.lr_ref_batch}" if rule == "linear" else f"sqrt({global_batch}/{cfg.lr_ref_batch})"
    auto = " (optim.lr_scaling=auto)" if cfg.lr_scaling == "auto" else ""
    return (f"peak LR {lr:.6g} = optim.lr {cfg.lr:.6g} x {factor} ({rule} scaling by global batch{auto}; "
            f"timm: --lr-base {cfg.lr:.6g} --lr-base-size {cfg.lr_ref_batch} --lr-base-scale {rule}; "
            f"for an absolute LR set optim.lr_ref_batch=0)")


def build_optimizer(cfg, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """SGD (Nesterov), AdamW, or timm's LAMB / LARS over param groups carrying ``lr_scale`` (each group's
    ``weight_decay`` kept). LAMB/LARS apply their layer-wise trust ratio to the weights (``.../decay``
    groups, ``always_adapt=True``, even at ``optim.weight_decay=0`` as in MAE's linear probe) and not
    to norms and biases (``.../no_decay``: plain steps), as MAE's LARS and BERT's LAMB do; timm's own
    default would skip every group whose weight decay is 0. LAMB's global gradient clipping is off
    (``max_grad_norm=None``): ``train.clip_grad_norm`` does that."""
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        if cfg.name in ("lamb", "lars"):
            g["always_adapt"] = g.get("name", "").endswith("/decay")
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    if cfg.name == "lamb":
        from timm.optim import Lamb

        return Lamb(groups, lr=lr, betas=tuple(cfg.betas), max_grad_norm=None)
    if cfg.name == "lars":
        from timm.optim import Lars

        return Lars(groups, lr=lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), fused=_fused_on_cpu(groups) or None)


def _fused_on_cpu(groups: list[dict]) -> bool:
    """Whether AdamW may use torch's fused kernel because every parameter is a plain CPU tensor. On CPU
    torch's default is the per-tensor loop, about 4x slower for a resnet18 (the demo's step: ~30% of
    it); the fused kernel computes the same update. Sharded (DTensor) and GPU parameters keep torch's
    default (foreach on GPU)."""
    from torch.distributed.tensor import DTensor

    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.device.type == "cpu" and not isinstance(p, DTensor) and p.is_floating_point()
                                for p in params)


def apply_global_batch(cfg: TrainConfig, batch_size: int, world_size: int) -> None:
    """``train.global_batch_size`` -> ``train.grad_accum`` for this world size, in place (no-op when it is 0).

    Raises :class:`ConfigError` naming the keys when ``global_batch_size`` is not a multiple of ``world_size x
    batch_size`` (``data.batch_size``), or when ``train.grad_accum`` is set to another value.
    """
    if not cfg.global_batch_size:
        return
    per_step = world_size * batch_size
    accum, rest = divmod(cfg.global_batch_size, per_step)
    if rest or accum < 1:
        raise ConfigError(f"train.global_batch_size={cfg.global_batch_size} is not a multiple of {world_size} ranks "
                          f"x data.batch_size {batch_size} = {per_step}: choose a data.batch_size that divides it on "
                          "every world size the job may run on, or set train.global_batch_size=0")
    if cfg.grad_accum is not None and cfg.grad_accum != accum:
        raise ConfigError(f"train.grad_accum={cfg.grad_accum} contradicts train.global_batch_size="
                          f"{cfg.global_batch_size} on {world_size} ranks x data.batch_size {batch_size} (it needs "
                          f"{accum}): set only one of them")
    cfg.grad_accum = accum

