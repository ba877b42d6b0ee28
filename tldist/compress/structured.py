"""Structured channel pruning that *removes* channels, with torch-pruning's dependency graph.

:func:`apply_channel_pruning` runs ``torch_pruning.pruner.MetaPruner`` (Fang et al. 2023,
"DepGraph: Towards Any Structural Pruning", the ``torch-pruning`` library) with L1/L2 magnitude
importance (``tp.importance.MagnitudeImportance(p)``): in every prunable group of coupled layers
(a conv, its BatchNorm, the convs that read its output, the residual additions that tie several
convs together) the ``ratio`` fraction of channels with the smallest norm is cut out, and every
tensor of the group shrinks with it. The result is an ordinary dense model with fewer channels:
smaller tensors, a smaller file, fewer multiply-adds. The classification head keeps its outputs.

Saving and loading. torch-pruning's own ``tp.state_dict`` pickles whole module ``__dict__``\\ s,
which tldist never loads (:mod:`tldist.safeload`). Instead the export's ``model.json`` records, under
``structured_pruning.modules``, the shape attributes that pruning changed per module
(``{"layer1.0.conv1": {"out_channels": 40}, "layer1.0.bn1": {"num_features": 40}, ...}``), and
``model.safetensors`` holds the pruned tensors. The record travels on with the model: a run fine-tuned
from a pruned export (``model.checkpoint=``) writes it into every ``step_*`` checkpoint, and its
exports keep it. :func:`tldist.models.checkpoint_io.apply_pruned_shapes` sets those attributes on a
freshly built model before its weights are loaded (:mod:`tldist.artifacts.resolve` does this for
every checkpoint and export that records them), so ``predict``, ``eval``, ``compress``,
``distill.teacher=`` and ``model.checkpoint=`` accept a pruned model and its descendants.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tldist.errors import UserError
from tldist.models.checkpoint_io import PRUNED_KEY, shape_attrs

def count_params(model: nn.Module) -> int:
    """Number of parameters (elements) of ``model``."""
    return sum(p.numel() for p in model.parameters())


def apply_channel_pruning(model: nn.Module, head: list[str], example: torch.Tensor, *, ratio: float,
                          norm: int = 2, round_to: int = 8, name: str = "model") -> dict[str, Any]:
    """Remove the ``ratio`` fraction of channels of every prunable layer group of ``model``, in place.

    ``head``: module names of the classification head (kept whole); ``example``: an input batch
    ``[B, 3, H, W]`` for tracing the dependency graph; ``norm``: 1 or 2 (L1/L2 magnitude importance);
    ``round_to``: channel counts are kept multiples of it (SIMD-friendly, torch-pruning's ``round_to``).
    Returns ``{"modules": changed shape attributes per module (see :data:`META_KEY`), "params_before",
    "params_after", "macs_before", "macs_after"}`` (MACs per image from ``tp.utils.count_ops_and_params``).
    Raises :class:`UserError` naming ``name`` when ``ratio`` is outside (0, 1) or torch-pruning
    cannot handle the architecture (tracing fails or the pruned model no longer runs).
    """
    if not 0.0 < ratio < 1.0:
        raise UserError(f"pruning ratio {ratio} is out of range: give the fraction of channels to remove, 0 < ratio < 1")
    if norm not in (1, 2):
        raise UserError(f"--norm has bad value {norm}: use 1 (L1) or 2 (L2)")
    if round_to < 1:
        raise UserError(f"--round-to has bad value {round_to}: must be >= 1")
    import torch_pruning as tp

    ignored = [model.get_submodule(h) for h in head]
    before = shape_attrs(model)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():  # the dependency graph is traced through autograd
            macs0, params0 = tp.utils.count_ops_and_params(model, example)
            pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=norm),
                                          pruning_ratio=float(ratio), ignored_layers=ignored, round_to=round_to)
            pruner.step()
            macs1, params1 = tp.utils.count_ops_and_params(model, example)
            model(example)  # the pruned model must still run
    except Exception as e:  # noqa: BLE001 - torch-pruning's tracing/pruning errors vary by architecture
        first = " ".join(str(e).split())[:160]
        raise UserError(f"model '{name}' cannot be pruned structurally by torch-pruning ({type(e).__name__}: "
                        f"{first}): use unstructured pruning (without --structured) or another architecture") from None
    finally:
        model.train(was_training)
    after = shape_attrs(model)
    changed = {n: {a: v for a, v in attrs.items() if before.get(n, {}).get(a) != v} for n, attrs in after.items()}
    changed = {n: attrs for n, attrs in changed.items() if attrs}
    if params1 >= params0:
        raise UserError(f"model '{name}' has no channels torch-pruning could remove at ratio {ratio} "
                        f"(round_to {round_to}): raise the ratio or lower --round-to")
    return {"modules": changed, "params_before": int(params0), "params_after": int(params1),
            "macs_before": int(macs0), "macs_after": int(macs1)}


def pruning_record(stats: dict[str, Any], *, ratio: float, norm: int, round_to: int) -> dict[str, Any]:
    """The model record's entry (:data:`~tldist.models.checkpoint_io.PRUNED_KEY`) of a structurally pruned model."""
    return {"library": "torch-pruning", "pruner": "MetaPruner", "importance": f"magnitude-l{norm}", "ratio": ratio,
            "round_to": round_to, "modules": stats["modules"]}


def describe(stats: dict[str, Any]) -> str:
    """One line: parameters and MACs before -> after."""
    return (f"params {stats['params_before'] / 1e6:.2f}M -> {stats['params_after'] / 1e6:.2f}M, MACs/image "
            f"{stats['macs_before'] / 1e6:.1f}M -> {stats['macs_after'] / 1e6:.1f}M")


__all__ = ["PRUNED_KEY", "apply_channel_pruning", "pruning_record", "count_params", "describe"]
