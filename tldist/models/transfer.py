"""Transfer strategies: choose which parameters train, and freeze BatchNorm layers.

Every parameter belongs to one stage of :attr:`ModelInfo.stages` (the head is stage ``n``):
parameters under a stage's module belong to it, others to the preceding stage in
registration order (e.g. ResNet's ``bn1`` to the stem, ViT's final ``encoder.ln`` to the last block).
"""

from __future__ import annotations

import torch
from torch import nn

from tldist.config import TransferConfig
from tldist.errors import ConfigError
from tldist.models.info import ModelInfo, under

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class _FrozenBN:
    """Mixin keeping a BatchNorm layer in eval mode: ``train()`` never turns it back on."""

    def train(self, mode: bool = True):  # noqa: D102 - same contract as nn.Module.train
        self.training = False
        return self


class FrozenBatchNorm1d(_FrozenBN, nn.BatchNorm1d):
    """BatchNorm1d whose running statistics never update."""


class FrozenBatchNorm2d(_FrozenBN, nn.BatchNorm2d):
    """BatchNorm2d whose running statistics never update."""


class FrozenBatchNorm3d(_FrozenBN, nn.BatchNorm3d):
    """BatchNorm3d whose running statistics never update."""


class FrozenSyncBatchNorm(_FrozenBN, nn.SyncBatchNorm):
    """SyncBatchNorm whose running statistics never update."""


_FROZEN: dict[type, type] = {
    nn.BatchNorm1d: FrozenBatchNorm1d, nn.BatchNorm2d: FrozenBatchNorm2d,
    nn.BatchNorm3d: FrozenBatchNorm3d, nn.SyncBatchNorm: FrozenSyncBatchNorm,
}


def param_stages(model: nn.Module, info: ModelInfo) -> dict[str, int]:
    """Map each parameter name to its stage index (0 = stem ... ``len(info.stages)`` = head).

    Names may carry DDP/compile prefixes (``module.``, ``_orig_mod.``).
    """
    n = len(info.stages)
    out: dict[str, int] = {}
    current = 0
    for name, _ in model.named_parameters():
        clean = _clean(name)
        if under(clean, info.head):
            out[name] = n
            continue
        for i, stage in enumerate(info.stages):
            if under(clean, [stage]):
                current = i
                break
        out[name] = current
    return out


def apply_transfer(model: nn.Module, cfg: TransferConfig, info: ModelInfo) -> None:
    """Set ``requires_grad`` per ``cfg.strategy`` and freeze BatchNorm layers, in place.

    ``linear_probe`` trains only the head, ``full`` everything, ``last_n`` the last
    ``cfg.last_n`` stages plus the head. BatchNorm layers are frozen (eval mode for good,
    affine parameters fixed) everywhere with ``cfg.freeze_bn`` or ``linear_probe``, and in
    the frozen stages with ``last_n``.
    """
    n = len(info.stages)
    if cfg.strategy == "full":
        first = 0
    elif cfg.strategy == "linear_probe":
        first = n
    elif cfg.strategy == "last_n":
        if not 1 <= cfg.last_n <= n:
            raise ConfigError(
                f"config key 'transfer.last_n' has bad value {cfg.last_n}: model '{info.name}' has {n} stages "
                f"({info.stages[0]} ... {info.stages[-1]}); use 1..{n}, or transfer.strategy=full"
            )
        first = n - cfg.last_n
    else:
        raise ConfigError(
            f"config key 'transfer.strategy' has bad value {cfg.strategy!r}: choose one of linear_probe, full, last_n"
        )
    stage_of = param_stages(model, info)
    for name, p in model.named_parameters():
        p.requires_grad_(stage_of[name] >= first)
    if cfg.freeze_bn or cfg.strategy == "linear_probe":
        freeze_batchnorm(model)
    elif first > 0:
        freeze_batchnorm(model, only_frozen=True)


def freeze_batchnorm(model: nn.Module, *, only_frozen: bool = False) -> int:
    """Put BatchNorm layers in eval mode for good and fix their affine parameters; returns how many.

    With ``only_frozen``, only layers whose parameters are all frozen already are touched.
    Convert to SyncBatchNorm *before* calling this: conversion builds new, unfrozen layers.
    """
    count = 0
    for m in model.modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) or isinstance(m, _FrozenBN):
            continue
        params = list(m.parameters(recurse=False))
        if only_frozen and any(p.requires_grad for p in params):
            continue
        m.__class__ = _frozen_class(type(m))
        m.train(False)
        for p in params:
            p.requires_grad_(False)
        count += 1
    return count


def _frozen_class(cls: type) -> type:
    if cls not in _FROZEN:  # BatchNorm subclasses (e.g. timm's BatchNormAct2d)
        _FROZEN[cls] = type(f"Frozen{cls.__name__}", (_FrozenBN, cls), {"__module__": __name__})
    return _FROZEN[cls]


def transfer_summary(model: nn.Module, info: ModelInfo) -> list[dict[str, object]]:
    """Per-stage parameter counts for logging: ``[{"stage", "trainable", "frozen"}, ...]``, head last."""
    rows = [{"stage": s, "trainable": 0, "frozen": 0} for s in [*info.stages, "head"]]
    stage_of = param_stages(model, info)
    for name, p in model.named_parameters():
        rows[stage_of[name]]["trainable" if p.requires_grad else "frozen"] += p.numel()  # type: ignore[operator]
    return rows


def format_transfer_summary(rows: list[dict[str, object]]) -> str:
    """The summary as a small aligned table (one line per stage plus a total)."""
    width = max(len(str(r["stage"])) for r in rows)
    lines = [f"{'stage':<{width}}  {'trainable':>12}  {'frozen':>12}"]
    lines += [f"{r['stage']!s:<{width}}  {r['trainable']:>12,}  {r['frozen']:>12,}" for r in rows]
    total_t = sum(int(r["trainable"]) for r in rows)  # type: ignore[call-overload]
    total_f = sum(int(r["frozen"]) for r in rows)  # type: ignore[call-overload]
    lines.append(f"{'total':<{width}}  {total_t:>12,}  {total_f:>12,}")
    return "\n".join(lines)


def _clean(name: str) -> str:
    name = name.replace("_orig_mod.", "")
    while name.startswith(_WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def apply_head_classes(model: nn.Module, info: ModelInfo, *, saved_classes: list[str], classes: list[str],
                       saved_state: dict) -> int:
    """Give each class the head row the checkpoint trained for the same class *name*, in place.

    Fine-tuning from a tldist checkpoint or export whose class list differs from this run's (another
    order, some classes new or gone) must not reuse the head by position. Each final head ``Linear``
    (``out_features == len(classes)``, under :attr:`ModelInfo.head`) is re-initialised
    (``reset_parameters``, from the run's seeded RNG), then rows of classes the checkpoint knows are
    copied from ``saved_state`` (the checkpoint's state dict). Returns the number of classes carried
    over; nothing changes when the two lists are equal.
    """
    if list(saved_classes) == list(classes):
        return 0
    rows = [(i, saved_classes.index(c)) for i, c in enumerate(classes) if c in saved_classes]
    carried = 0
    for prefix in info.head:
        for name, mod in model.get_submodule(prefix).named_modules(prefix=prefix):
            if not (isinstance(mod, nn.Linear) and mod.out_features == len(classes)):
                continue
            weight, bias = saved_state.get(f"{name}.weight"), saved_state.get(f"{name}.bias")
            if weight is None or weight.shape != (len(saved_classes), mod.in_features):
                continue
            mod.reset_parameters()
            with torch.no_grad():
                for new, old in rows:
                    mod.weight[new] = weight[old]
                    if mod.bias is not None and bias is not None:
                        mod.bias[new] = bias[old]
            carried = len(rows)
    return carried
