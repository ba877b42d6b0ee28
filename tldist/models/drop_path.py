"""Stochastic depth ("drop path", Huang et al. 2016, "Deep Networks with Stochastic Depth") from
``model.drop_path_rate`` for the backbones of :func:`tldist.models.factory.build_model`.

- timm: the rate goes to ``timm.create_model(..., drop_path_rate=rate)``; a model whose constructor
  does not take it is refused with a :class:`ConfigError`.
- torchvision builders that take ``stochastic_depth_prob`` (convnext, efficientnet, efficientnet_v2) get
  it as a constructor argument. swin / swin_v2 and maxvit_t have stochastic depth but their builders
  fix it (0.2 to 0.5): their per-block probabilities, a linear ramp from 0 to that value, are rescaled
  to end at ``rate`` (:func:`apply_drop_path_rate`), which is what their model classes would build.
- Other torchvision models (ResNets, ViTs, MobileNets...) have none: a rate > 0 is refused with the
  timm model to use instead (torchvision's ``vit_b_16`` -> ``timm:vit_base_patch16_224``).

``None`` keeps every architecture's own default. The rate is not recorded in ``model_kwargs``: drop
path is the identity in eval mode, so rebuilt models (eval, export) compute the same forward either way.
Masks draw from the torch RNG, which is ``train.seed + rank`` after the model is built: ranks differ.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from tldist.errors import ConfigError

TV_KWARG_FAMILIES = ("convnext_", "efficientnet_")
"""torchvision builders (name prefixes) that pass ``stochastic_depth_prob`` to their model class."""
TV_FIXED_FAMILIES = ("swin_", "maxvit_")
"""torchvision builders that set ``stochastic_depth_prob`` themselves (a second value is a TypeError)."""
_TIMM_FOR_TV = {"vit_b_16": "vit_base_patch16_224", "vit_b_32": "vit_base_patch32_224",
                "vit_l_16": "vit_large_patch16_224", "vit_l_32": "vit_large_patch32_224",
                "vit_h_14": "vit_huge_patch14_224"}


def torchvision_drop_path_kwargs(name: str, rate: Optional[float]) -> dict[str, Any]:
    """Constructor arguments for torchvision model ``name`` at drop-path ``rate`` (``{}`` for None).

    Raises :class:`ConfigError` naming ``model.drop_path_rate`` when ``rate > 0`` and ``name`` has no
    stochastic depth."""
    if rate is None or name.startswith(TV_FIXED_FAMILIES):
        return {}
    if name.startswith(TV_KWARG_FAMILIES):
        return {"stochastic_depth_prob": float(rate)}
    if rate > 0:
        alt = _TIMM_FOR_TV.get(name) or _timm_same_name(name)
        instead = f"use timm's version (model.name=timm:{alt})" if alt else "use a timm model (model.name=timm:<name>)"
        raise ConfigError(f"config key 'model.drop_path_rate' has bad value {rate!r}: torchvision's {name} has no "
                          f"stochastic depth; {instead}, a torchvision convnext/efficientnet/swin/maxvit, "
                          "or leave model.drop_path_rate unset")
    return {}


def apply_drop_path_rate(model: nn.Module, name: str, rate: Optional[float]) -> None:
    """For torchvision swin/maxvit (builders that fix the rate): rescale every
    ``torchvision.ops.StochasticDepth`` probability so that the deepest block's is ``rate`` (in place)."""
    if rate is None or not name.startswith(TV_FIXED_FAMILIES):
        return
    from torchvision.ops import StochasticDepth

    layers = [m for m in model.modules() if isinstance(m, StochasticDepth)]
    top = max((m.p for m in layers), default=0.0)
    for m in layers:
        m.p = m.p / top * float(rate) if top > 0 else 0.0


def timm_drop_path_kwargs(rate: Optional[float]) -> dict[str, Any]:
    """``timm.create_model`` arguments for ``rate`` (``{}`` for None)."""
    return {} if rate is None else {"drop_path_rate": float(rate)}


def refuse_timm_drop_path(name: str, rate: float, error: Exception) -> None:
    """Raise a :class:`ConfigError` when ``error`` (from ``timm.create_model``) rejects ``drop_path_rate``."""
    if isinstance(error, TypeError) and "drop_path_rate" in str(error):
        raise ConfigError(f"config key 'model.drop_path_rate' has bad value {rate!r}: model {name!r} does not take a "
                          "drop_path_rate; leave model.drop_path_rate unset or pick another model") from None


def _timm_same_name(name: str) -> Optional[str]:
    try:
        import timm
    except ImportError:
        return None
    return name if timm.is_model(name) else None
