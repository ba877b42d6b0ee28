"""Backbones with a new head (:func:`build_model`), their weights, transfer strategies and optimizer param groups.

Modules: :mod:`~tldist.models.info` (:class:`ModelInfo`), :mod:`~tldist.models.factory` (torchvision and
timm backbones), :mod:`~tldist.models.checkpoint_io` (weights files, pruned shapes),
:mod:`~tldist.models.transfer` (freezing, head rows by class name), :mod:`~tldist.models.param_groups`
(layer-wise LR decay, no decay on norms and biases), :mod:`~tldist.models.drop_path` (stochastic depth).
"""

from tldist.models.checkpoint_io import WeightsSource, load_weights_file, read_weights_file
from tldist.models.factory import build_model
from tldist.models.info import ModelInfo
from tldist.models.param_groups import build_param_groups, no_weight_decay_names
from tldist.models.transfer import (
    apply_head_classes,
    apply_transfer,
    format_transfer_summary,
    freeze_batchnorm,
    param_stages,
    transfer_summary,
)

__all__ = [
    "ModelInfo",
    "WeightsSource",
    "apply_head_classes",
    "apply_transfer",
    "build_model",
    "build_param_groups",
    "format_transfer_summary",
    "freeze_batchnorm",
    "load_weights_file",
    "no_weight_decay_names",
    "param_stages",
    "read_weights_file",
    "transfer_summary",
]
