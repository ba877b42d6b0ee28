"""What a built backbone tells the rest of tldist (:class:`ModelInfo`), and the naming rules
shared by the model factory and the checkpoint reader."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tldist.data.transforms import IMAGENET_MEAN, IMAGENET_STD

IGNORED_EXTRA_KEYS = ("AuxLogits.", "aux1.", "aux2.")
"""State-dict prefixes a checkpoint may hold that tldist's models never have (inception/googlenet
auxiliary heads, built without them): ignored when loading."""

# timm model entrypoints that build differently when called with pretrained=True (an `if pretrained:`
# before build_model_with_cfg; audit of timm/models/*.py, timm 1.0): pass the same kwargs explicitly so
# that they are recorded in ModelInfo.model_kwargs and a rebuild without weights matches.
TIMM_PRETRAINED_KWARGS: dict[str, dict[str, Any]] = {
    "fbnetc_100": {"bn_eps": 1e-3},  # "pretrained model trained with non-default BN epsilon"
}


def timm_arch_kwargs(name: str, *, pretrained: bool) -> dict[str, Any]:
    """:attr:`ModelInfo.model_kwargs` of timm model ``name`` (``arch`` or ``arch.tag``) with/without weights."""
    return dict(TIMM_PRETRAINED_KWARGS.get(name.split(".", 1)[0], {})) if pretrained else {}


def under(name: str, prefixes: list[str]) -> bool:
    """Whether parameter/module ``name`` is one of ``prefixes`` or inside one (``fc`` covers ``fc.weight``)."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@dataclass
class ModelInfo:
    """What the data pipeline, transfer strategy, optimizer and FSDP wrapping need to know."""

    name: str = ""
    """``model.name`` as configured (``resnet18``, ``timm:vit_small_patch16_224``...)."""
    num_classes: int = 0
    input_size: int = 224
    """Square input resolution the model expects (the weights' crop size unless overridden)."""
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    """Resize interpolation of the weights' preprocessing: ``bilinear`` or ``bicubic``."""
    crop_pct: float = 0.875
    """Eval center-crop fraction of the weights (torchvision: ``crop_size / resize_size`` of
    ``weights.transforms()``, e.g. 224/232 for ResNet50 V2; timm: ``pretrained_cfg["crop_pct"]``):
    resize to ``floor(size / crop_pct)``, crop ``size`` (:func:`tldist.data.transforms.eval_preprocess`)."""
    head: list[str] = field(default_factory=list)
    """Parameter-name prefixes of the new classification head (e.g. ``["fc"]``)."""
    stages: list[str] = field(default_factory=list)
    """Module names from stem to last stage; parameters outside them belong to the preceding stage."""
    block_class_names: list[str] = field(default_factory=list)
    """Block classes present in the model, suggested as FSDP wrap units (may be empty)."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Constructor keyword arguments (JSON values) that shape the forward pass beyond the input size and
    class count, e.g. ``{"transform_input": true}`` for a pretrained googlenet/inception_v3 (torchvision's
    builder sets it with the weights) or ``{"bn_eps": 0.001}`` for timm's pretrained ``fbnetc_100``.
    Saved as ``model_kwargs`` in ``trainer.json`` and ``model.json``; a model rebuilt from that
    checkpoint or export is constructed with them, so it computes what the saved model computed."""
