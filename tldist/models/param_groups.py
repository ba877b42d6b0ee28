"""Optimizer parameter groups: weight-decay exclusions and layer-wise LR decay.

Stage ``i`` of ``n`` gets ``lr_scale = layer_decay ** (n - i)``; the head gets ``head_lr_mult``.
The optimizer builder sets each group's ``lr = base_lr * lr_scale``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tldist.models.info import ModelInfo
from tldist.models.transfer import param_stages

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
_NO_DECAY_NAMES = (
    "pos_embed", "pos_embedding", "cls_token", "class_token", "reg_token", "dist_token",
    "relative_position_bias_table", "absolute_pos_embed",
)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameters exempt from weight decay: norm layers, biases and other 1-d tensors, position
    embeddings and class tokens (plus whatever a timm model's ``no_weight_decay()`` lists)."""
    skip: set[str] = set()
    for mod_name, module in model.named_modules():
        norm = isinstance(module, _NORM_TYPES)
        for p_name, p in module.named_parameters(prefix=mod_name, recurse=False):
            leaf = p_name.rsplit(".", 1)[-1]
            if norm or p.ndim <= 1 or any(k in leaf for k in _NO_DECAY_NAMES):
                skip.add(p_name)
    extra = getattr(model, "no_weight_decay", None)
    if callable(extra):
        skip |= {n for n, _ in model.named_parameters() if n in set(extra())}
    return skip


def build_param_groups(
    model: nn.Module, info: ModelInfo, *, weight_decay: float, layer_decay: float = 1.0, head_lr_mult: float = 1.0,
    split_no_decay: bool = False,
) -> list[dict[str, Any]]:
    """Groups of trainable parameters with ``params``, ``weight_decay``, ``lr_scale`` and ``name``.

    Parameters sharing (weight_decay, lr_scale) are merged into one group; groups come in
    stem-to-head order so every rank builds the same list. ``split_no_decay`` keeps norms and
    biases (``.../no_decay``) apart from the other weights (``.../decay``) even when
    ``weight_decay`` is 0, for optimizers that treat the two kinds differently (LARS/LAMB's
    trust ratio, see :func:`tldist.train.main.build_optimizer`).
    """
    n = len(info.stages)
    stage_of = param_stages(model, info)
    skip = no_weight_decay_names(model)
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        stage = stage_of[name]
        wd = 0.0 if name in skip else float(weight_decay)
        scale = float(head_lr_mult) if stage == n else float(layer_decay) ** (n - stage)
        kind = name not in skip if split_no_decay else bool(wd)
        group = groups.setdefault((kind, wd, scale), {"params": [], "weight_decay": wd, "lr_scale": scale,
                                                      "stages": []})
        group["params"].append(p)
        if stage not in group["stages"]:
            group["stages"].append(stage)
    out = []
    for (kind, _, _), g in groups.items():
        stages = g.pop("stages")
        out.append({"name": f"{_span(stages, n)}/{'decay' if kind else 'no_decay'}", **g})
    return out


def _span(stages: list[int], n: int) -> str:
    """Readable stage range of a group: ``stage3``, ``stage0-4``, ``stage0-4+head``, ``head``."""
    body = sorted(s for s in stages if s < n)
    text = "" if not body else f"stage{body[0]}" + (f"-{body[-1]}" if body[-1] != body[0] else "")
    return "+".join(t for t in (text, "head" if n in stages else "") if t)
