"""Backbones with a new head (:func:`build_model`), transfer strategies and optimizer param groups."""

from tldist.models.checkpoint_io import load_checkpoint
from tldist.models.factory import ModelInfo, build_model
from tldist.models.param_groups import build_param_groups, no_weight_decay_names
from tldist.models.transfer import (
    apply_transfer,
    format_transfer_summary,
    freeze_batchnorm,
    param_stages,
    transfer_summary,
)

__all__ = [
    "ModelInfo",
    "apply_transfer",
    "build_model",
    "build_param_groups",
    "format_transfer_summary",
    "freeze_batchnorm",
    "load_checkpoint",
    "no_weight_decay_names",
    "param_stages",
    "transfer_summary",
]
