"""Build a backbone with a new classification head, and describe it with :class:`ModelInfo`.

Weights come from, in priority order: a :class:`~tldist.models.checkpoint_io.WeightsSource` (what
``model.checkpoint`` resolves to),
the torchvision weights enum / timm's pretrained weights (``model.pretrained=true``), or a
random init. Pretrained torchvision weights are read from the torch hub cache and only
downloaded when absent; offline machines get a :class:`UserError` naming the file to put there.
Every ``.pt``/``.pth`` file (checkpoints, the hub cache) is read pickle-free
(:func:`tldist.safeload.load_pickle_free`). The constructor arguments a model was built with
(:attr:`ModelInfo.model_kwargs`) travel with its checkpoints and exports, so a rebuilt model
computes what the saved one computed.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from tldist.config import ModelConfig
from tldist.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from tldist.errors import ConfigError, UserError
from tldist.models import drop_path
from tldist.models.checkpoint_io import WeightsSource, load_state
from tldist.models.info import ModelInfo, timm_arch_kwargs, under
from tldist.safeload import load_pickle_free

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 20.0
"""Seconds to wait for the weights server to answer (also the per-read socket timeout)."""

# Known residual/transformer block classes, suggested as FSDP wrap units when present.
_BLOCK_CLASSES = {
    "BasicBlock", "Bottleneck", "EncoderBlock", "CNBlock", "MBConv", "FusedMBConv", "InvertedResidual",
    "SwinTransformerBlock", "SwinTransformerBlockV2", "ResBottleneckBlock", "_DenseBlock", "MaxVitBlock",
    "Block", "ConvNeXtBlock", "DepthwiseSeparableConv", "EdgeResidual", "ResidualBlock", "_InvertedResidual",
}
# Containers whose children are the stages (torchvision and timm naming).
_EXPAND = {"features", "encoder", "layers", "trunk_output", "blocks", "stages", "network", "levels"}
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def build_model(cfg: ModelConfig, num_classes: int, *, image_size: int = 0, source: Optional[WeightsSource] = None,
                require_head: bool = False) -> tuple[nn.Module, ModelInfo]:
    """Build ``cfg.name`` with a fresh ``num_classes`` head; returns the model (CPU, fp32) and its info.

    ``image_size`` (0: the weights' own size) sets the input resolution; it matters for
    ViTs, whose position embeddings are built for (and, when pretrained, resized to) it.
    ``source`` (weights read by :func:`~tldist.models.checkpoint_io.read_weights_file` or, for a tldist
    checkpoint or export, by :func:`tldist.artifacts.resolve.weights_source`; ``model.checkpoint``) is
    loaded instead of the pretrained weights; with ``require_head`` (scoring or exporting a trained
    model) its head must fit ``num_classes``. ``cfg.checkpoint`` itself is not read here: resolve it
    first (:func:`tldist.artifacts.resolve.build_configured_model`).

    The architecture's constructor arguments (:attr:`ModelInfo.model_kwargs`) come from ``source.arch``
    when it records them (a tldist checkpoint or export records ``model_kwargs``; older tldist
    checkpoints only whether they had the pretrained architecture; torchvision's and timm's ``.pth``
    files their ``args``), else from ``cfg.pretrained``: the architecture of the pretrained weights
    (e.g. googlenet with ``transform_input=True``), whether or not a plain state dict replaces them.
    A structurally pruned source gives the model its pruned layer widths.

    Raises :class:`ConfigError` for a bad name/weights/class count, :class:`UserError` for weights
    that do not fit, and for pretrained weights that are neither cached nor downloadable.
    """
    if num_classes < 1:
        raise ConfigError(f"config key 'model.num_classes' has bad value {num_classes!r}: must be >= 1")
    # The architecture: as the source recorded it, else as model.pretrained says (see WeightsSource.arch).
    arch: dict[str, Any] | bool = cfg.pretrained if source is None or source.arch is None else source.arch
    where = source.label if source is not None else f"model '{cfg.name}'"
    if cfg.name.startswith("timm:"):
        model, info = _build_timm(cfg, num_classes, image_size, arch, where, has_source=source is not None)
    else:
        model, info = _build_torchvision(cfg, num_classes, image_size, arch, where, has_source=source is not None)
    info.block_class_names = _block_names(model)
    if source is not None:
        load_state(model, info, source, require_head=require_head)
    return model, info


# ---------------------------------------------------------------- torchvision


def _build_torchvision(cfg: ModelConfig, num_classes: int, image_size: int, arch: dict[str, Any] | bool,
                       where: str, *, has_source: bool = False) -> tuple[nn.Module, ModelInfo]:
    from torchvision import models as tvm
    from torchvision.models.vision_transformer import interpolate_embeddings

    names = tvm.list_models(module=tvm)
    if cfg.name not in names:
        raise ConfigError(
            f"config key 'model.name' has bad value {cfg.name!r}: not a torchvision classification model"
            f"{_close(cfg.name, names)}; use a name from torchvision.models.list_models() or 'timm:<name>'"
        )
    weights = _weights_member(cfg.name, cfg.weights)
    t = weights.transforms()
    is_vit = cfg.name.startswith("vit_")
    native = weights.meta["min_size"][0] if is_vit else _first(getattr(t, "crop_size", 224))
    size = image_size or native
    if is_vit and size % int(cfg.name.rsplit("_", 1)[-1]):
        raise ConfigError(f"config key 'data.image_size' has bad value {size}: {cfg.name} needs a multiple of its patch size")
    aux = cfg.name in _AUX_HEAD_MODELS  # built without auxiliary heads
    load = cfg.pretrained and not has_source
    kwargs = _tv_arch_kwargs(cfg.name, weights, pretrained=bool(arch)) if isinstance(arch, bool) else dict(arch)
    sd = drop_path.torchvision_drop_path_kwargs(cfg.name, cfg.drop_path_rate)  # train-mode only: not recorded
    if load:
        # torchvision's builder would torch.load the cached file with weights_only=False: build the
        # architecture it would build and load the file pickle-free instead.
        cache = _ensure_cached(cfg.name, weights)
        build = {**_tv_weights_kwargs(cfg.name, weights), **kwargs, **sd, "num_classes": len(weights.meta["categories"])}
        model = _tv_get_model(cfg.name, build, where)
        _load_hub_weights(model, cfg.name, cache)
        if is_vit and size != native:
            state = interpolate_embeddings(size, model.patch_size, model.state_dict())
            model = _tv_get_model(cfg.name, {**kwargs, "image_size": size}, where)
            model.load_state_dict(state)
        if aux:  # as torchvision's builder does without aux_logits=True: the aux heads are not pretrained
            model.aux_logits = False
            for n in ("AuxLogits", "aux1", "aux2"):
                if hasattr(model, n):
                    setattr(model, n, None)
    else:
        build = {"image_size": size} if is_vit else {}
        # init_weights: torchvision's (slow) truncated-normal init, pointless when a checkpoint overwrites it
        build.update({"aux_logits": False, "init_weights": not has_source} if aux else {})
        model = _tv_get_model(cfg.name, {**build, **kwargs, **sd}, where)
    drop_path.apply_drop_path_rate(model, cfg.name, cfg.drop_path_rate)
    head = _torchvision_head(model)
    _replace_head(model, head, num_classes)
    resize = _first(getattr(t, "resize_size", None) or native)
    return model, ModelInfo(
        name=cfg.name, num_classes=num_classes, input_size=size,
        mean=tuple(getattr(t, "mean", IMAGENET_MEAN)), std=tuple(getattr(t, "std", IMAGENET_STD)),
        interpolation=getattr(getattr(t, "interpolation", None), "value", "bilinear"),
        crop_pct=_first(getattr(t, "crop_size", native)) / resize, head=[head],  # unrounded: exact resize back
        stages=_find_stages(model, [head]), model_kwargs=kwargs,
    )


_AUX_HEAD_MODELS = ("googlenet", "inception_v3")


def _tv_weights_kwargs(name: str, weights: Any) -> dict[str, Any]:
    """Constructor arguments torchvision's builder forces when given ``weights`` (its
    ``_ovewrite_named_param`` calls in ``torchvision/models/*.py``), besides ``num_classes``.

    googlenet/inception_v3: ``transform_input=True`` (the weights expect forward() to re-normalise
    ImageNet-normalised input to [-1, 1]), ``aux_logits=True`` (the file holds the auxiliary heads),
    ``init_weights=False``; maxvit: ``input_size`` = the weights' ``min_size``; vit: ``image_size`` =
    ``min_size`` (passed by the caller). tests/unit/models/test_factory.py checks every builder against torchvision's.
    """
    if name in _AUX_HEAD_MODELS:
        return {"transform_input": True, "aux_logits": True, "init_weights": False}
    if name.startswith("maxvit"):
        return {"input_size": tuple(weights.meta["min_size"])}
    if name.startswith("vit_"):
        return {"image_size": weights.meta["min_size"][0]}
    return {}


def _tv_arch_kwargs(name: str, weights: Any, *, pretrained: bool) -> dict[str, Any]:
    """:attr:`ModelInfo.model_kwargs` of a torchvision model built with (``pretrained``) or without
    ``weights``: the forward-relevant subset of :func:`_tv_weights_kwargs` (aux heads are dropped;
    the input size is ``image_size``'s business), as JSON values."""
    if name in _AUX_HEAD_MODELS:
        return {"transform_input": pretrained}
    if name.startswith("maxvit") and pretrained:
        return {"input_size": list(weights.meta["min_size"])}
    return {}


def _tv_get_model(name: str, kwargs: dict[str, Any], where: str) -> nn.Module:
    from torchvision import models as tvm

    try:
        return tvm.get_model(name, **kwargs)
    except (TypeError, ValueError) as e:  # recorded/foreign constructor arguments the builder rejects
        raise UserError(f"{where}: model '{name}' cannot be built with the constructor arguments {kwargs} "
                        f"({type(e).__name__}: {e}); set model.name to the checkpoint's architecture") from None


def _load_hub_weights(model: nn.Module, name: str, cache: Path) -> None:
    """Load torchvision's cached weights file into ``model`` (built by :func:`_tv_weights_kwargs`), pickle-free."""
    fix = "delete it and run again, or set model.checkpoint=PATH or model.pretrained=false"
    try:
        state = load_pickle_free(cache, what=f"cached weights file for model '{name}'")
    except UserError as e:
        raise type(e)(f"{e}; {fix}") from None
    if name.startswith("densenet"):  # as torchvision's densenet builder: old 'norm.1'-style key names
        pattern = re.compile(
            r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
        state = {(m.group(1) + m.group(2) if (m := pattern.match(k)) else k): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except (RuntimeError, AttributeError, TypeError) as e:
        first = " ".join(str(e).split())[:200]
        raise UserError(f"cached weights file '{cache}' for model '{name}' does not fit it ({first}): {fix}") from None


def _weights_member(model_name: str, weights_name: str) -> Any:
    from torchvision.models import get_model_weights

    enum = get_model_weights(model_name)
    key = weights_name.rsplit(".", 1)[-1].upper()  # also accept "ResNet50_Weights.IMAGENET1K_V2"
    if key not in enum.__members__:
        raise ConfigError(f"config key 'model.weights' has bad value {weights_name!r}: {enum.__name__} has "
                          f"{', '.join(enum.__members__)}")
    return enum[key]


def _ensure_cached(model_name: str, weights: Any) -> Path:
    """Path of the weights file in the torch hub cache; downloads it if absent, raising UserError offline."""
    url = weights.url
    fname = os.path.basename(urllib.parse.urlparse(url).path)
    cache = Path(torch.hub.get_dir()) / "checkpoints" / fname
    if cache.is_file():
        return cache
    log.info("downloading %s to %s", url, cache)
    try:
        _probe(url)
        cache.parent.mkdir(parents=True, exist_ok=True)
        match = torch.hub.HASH_REGEX.search(fname)
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            torch.hub.download_url_to_file(url, str(cache), hash_prefix=match.group(1) if match else None, progress=False)
        finally:
            socket.setdefaulttimeout(old)
    except Exception as e:
        raise UserError(
            f"pretrained weights for model '{model_name}' ({weights}) are not cached and could not be "
            f"downloaded from {url} ({type(e).__name__}: {e}). Copy the file '{fname}' to '{cache}' "
            f"($TORCH_HOME/hub/checkpoints/{fname}; TORCH_HOME defaults to ~/.cache/torch), "
            "or set model.checkpoint=PATH to a local checkpoint, or model.pretrained=false for a random init"
        ) from None
    return cache


def _probe(url: str) -> None:
    """Raise quickly when the server can't be reached (DNS lookups ignore socket timeouts, hence a thread)."""
    box: list[Optional[BaseException]] = []

    def ask() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=DOWNLOAD_TIMEOUT_S).close()
            box.append(None)
        except urllib.error.HTTPError:
            box.append(None)  # the server answered; let the real download report what is wrong
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box.append(e)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(DOWNLOAD_TIMEOUT_S + 2)
    if not box or box[0] is not None:
        raise box[0] if box else TimeoutError(f"no answer within {DOWNLOAD_TIMEOUT_S:.0f}s")


def _torchvision_head(model: nn.Module) -> str:
    """Name of the final classifier layer of a torchvision classification model."""
    for name in ("heads.head", "fc", "head", "classifier"):
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            return name
        if isinstance(mod, nn.Sequential):
            idx = [i for i, m in enumerate(mod) if isinstance(m, (nn.Linear, nn.Conv2d))]
            if idx:
                return f"{name}.{idx[-1]}"
    raise UserError(f"could not find the classification head of {type(model).__name__}; use another model.name")


def _replace_head(model: nn.Module, name: str, num_classes: int) -> None:
    old = model.get_submodule(name)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes)
    else:  # squeezenet's 1x1 conv classifier
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    _init_head(new)


def _init_head(module: nn.Module) -> None:
    nn.init.trunc_normal_(module.weight, std=0.01)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


# ---------------------------------------------------------------- timm


def _build_timm(cfg: ModelConfig, num_classes: int, image_size: int, arch: dict[str, Any] | bool,
                where: str, *, has_source: bool = False) -> tuple[nn.Module, ModelInfo]:
    try:
        import timm
    except ImportError:
        raise UserError(f"model.name={cfg.name!r} needs timm: pip install 'tldist[timm]'") from None
    name = cfg.name[len("timm:"):]
    if cfg.weights.upper() != "DEFAULT":
        raise ConfigError(
            f"config key 'model.weights' has bad value {cfg.weights!r}: it applies to torchvision models; "
            "for timm pick weights with a tag in the name (model.name=timm:<arch>.<tag>)"
        )
    if not timm.is_model(name):
        raise ConfigError(f"config key 'model.name' has bad value {cfg.name!r}: unknown timm model"
                          f"{_close(name, timm.list_models(), prefix='timm:')}")
    pcfg = timm.models.get_pretrained_cfg(name)
    size_kw = {"img_size": image_size} if image_size and pcfg is not None and pcfg.fixed_input_size else {}
    load = cfg.pretrained and not has_source
    kwargs = timm_arch_kwargs(name, pretrained=bool(arch)) if isinstance(arch, bool) else dict(arch)
    try:
        model = timm.create_model(name, pretrained=load, **size_kw,
                                  **{**kwargs, **drop_path.timm_drop_path_kwargs(cfg.drop_path_rate)})
    except Exception as e:
        drop_path.refuse_timm_drop_path(cfg.name, cfg.drop_path_rate, e)
        if not load:
            if kwargs and isinstance(e, TypeError):
                raise UserError(f"{where}: model '{cfg.name}' cannot be built with the constructor arguments "
                                f"{kwargs} ({e}); set model.name to the checkpoint's architecture") from None
            raise
        raise UserError(
            f"could not load timm pretrained weights for '{name}' ({type(e).__name__}: {e}). timm reads them "
            "from the Hugging Face cache ($HF_HOME/hub, default ~/.cache/huggingface/hub): fill it on a machine "
            "with internet, or set model.checkpoint=PATH to a local checkpoint, or model.pretrained=false"
        ) from None
    model.reset_classifier(num_classes)
    pc, modules = model.pretrained_cfg, dict(model.named_modules())
    head = [h for h in _as_list(pc.get("classifier")) if h in modules]
    head = head or [n for n, m in modules.items() if m is model.get_classifier()]
    for h in head:
        _init_head(model.get_submodule(h))
    return model, ModelInfo(
        name=cfg.name, num_classes=num_classes, input_size=image_size or int(pc.get("input_size", (3, 224, 224))[-1]),
        mean=tuple(pc.get("mean", IMAGENET_MEAN)), std=tuple(pc.get("std", IMAGENET_STD)),
        interpolation="bicubic" if pc.get("interpolation") == "bicubic" else "bilinear",
        crop_pct=float(pc.get("crop_pct", 0.875)), head=head, stages=_find_stages(model, head), model_kwargs=kwargs,
    )


# ---------------------------------------------------------------- structure


def _find_stages(model: nn.Module, head: list[str]) -> list[str]:
    """Children with parameters, expanding stage containers (``features``, ``encoder.layers``...).

    Norm-only modules and ancestors of the head are skipped: their parameters join the preceding stage.
    """
    stages: list[str] = []

    def visit(module: nn.Module, prefix: str, depth: int) -> None:
        for name, child in module.named_children():
            full = prefix + name
            above_head = any(h.startswith(full + ".") for h in head)
            if next(child.parameters(), None) is None or under(full, head) or above_head or isinstance(child, _NORMS):
                continue
            if name in _EXPAND and depth < 2 and len(child._modules):
                visit(child, full + ".", depth + 1)
            else:
                stages.append(full)

    visit(model, "", 0)
    return stages


def _block_names(model: nn.Module) -> list[str]:
    """Known block classes in the model, minus those nested inside another one (FSDP2 wraps bottom-up)."""
    found: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        if type(m).__name__ in _BLOCK_CLASSES:
            found.setdefault(type(m).__name__, []).append(name)
    return [c for c, names in found.items() if not any(under(n, found[o]) for o in found if o != c for n in names)]


# ---------------------------------------------------------------- helpers


def _as_list(v: Any) -> list[str]:
    return [v] if isinstance(v, str) else list(v or [])


def _first(v: Any) -> int:
    return int(v[0] if isinstance(v, (list, tuple)) else v)


def _close(name: str, names: list[str], prefix: str = "") -> str:
    near = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    return f" (close matches: {', '.join(prefix + n for n in near)})" if near else ""
