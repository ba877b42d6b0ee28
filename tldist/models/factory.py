"""Build a backbone with a new classification head, and describe it with :class:`ModelInfo`.

Weights come from, in priority order: ``model.checkpoint`` (a local file or directory),
the torchvision weights enum / timm's pretrained weights (``model.pretrained=true``), or a
random init. Pretrained torchvision weights are read from the torch hub cache and only
downloaded when absent; offline machines get a :class:`UserError` naming the file to put there.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import pickle
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from tldist.config import ModelConfig
from tldist.errors import ConfigError, UserError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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
_IGNORED_EXTRA_KEYS = ("AuxLogits.", "aux1.", "aux2.")  # inception/googlenet auxiliary heads


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
    """Eval center-crop fraction (resize to ``input_size / crop_pct``, then crop ``input_size``)."""
    head: list[str] = field(default_factory=list)
    """Parameter-name prefixes of the new classification head (e.g. ``["fc"]``)."""
    stages: list[str] = field(default_factory=list)
    """Module names from stem to last stage; parameters outside them belong to the preceding stage."""
    block_class_names: list[str] = field(default_factory=list)
    """Block classes present in the model, suggested as FSDP wrap units (may be empty)."""


def build_model(cfg: ModelConfig, num_classes: int, *, image_size: int = 0,
                require_head: bool = False) -> tuple[nn.Module, ModelInfo]:
    """Build ``cfg.name`` with a fresh ``num_classes`` head; returns the model (CPU, fp32) and its info.

    ``image_size`` (0: the weights' own size) sets the input resolution; it matters for
    ViTs, whose position embeddings are built for (and, when pretrained, resized to) it.
    ``cfg.checkpoint``, when set, is loaded instead of the pretrained weights; with
    ``require_head`` (scoring or exporting a trained model) its head must fit ``num_classes``.
    """
    if num_classes < 1:
        raise ConfigError(f"config key 'model.num_classes' has bad value {num_classes!r}: must be >= 1")
    if cfg.name.startswith("timm:"):
        model, info = _build_timm(cfg, num_classes, image_size)
    else:
        model, info = _build_torchvision(cfg, num_classes, image_size)
    info.block_class_names = _block_names(model)
    if cfg.checkpoint:
        load_checkpoint(model, info, cfg.checkpoint, require_head=require_head)
    return model, info


# ---------------------------------------------------------------- torchvision


def _build_torchvision(cfg: ModelConfig, num_classes: int, image_size: int) -> tuple[nn.Module, ModelInfo]:
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
    aux = cfg.name in ("googlenet", "inception_v3")  # built without auxiliary heads
    if cfg.pretrained and not cfg.checkpoint:
        cache = _ensure_cached(cfg.name, weights)
        try:
            model = tvm.get_model(cfg.name, weights=weights)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
            raise UserError(
                f"cached weights file '{cache}' for model '{cfg.name}' could not be loaded ({e}): "
                "delete it and run again, or set model.checkpoint=PATH or model.pretrained=false"
            ) from None
        if is_vit and size != native:
            state = interpolate_embeddings(size, model.patch_size, model.state_dict())
            model = tvm.get_model(cfg.name, image_size=size)
            model.load_state_dict(state)
        if aux:
            model.aux_logits, model.AuxLogits, model.aux1, model.aux2 = False, None, None, None
    else:
        kwargs: dict[str, Any] = {"image_size": size} if is_vit else {}
        kwargs.update({"aux_logits": False, "init_weights": True} if aux else {})
        model = tvm.get_model(cfg.name, **kwargs)
    head = _torchvision_head(model)
    _replace_head(model, head, num_classes)
    resize = _first(getattr(t, "resize_size", None) or native)
    return model, ModelInfo(
        name=cfg.name, num_classes=num_classes, input_size=size,
        mean=tuple(getattr(t, "mean", IMAGENET_MEAN)), std=tuple(getattr(t, "std", IMAGENET_STD)),
        interpolation=getattr(getattr(t, "interpolation", None), "value", "bilinear"),
        crop_pct=round(_first(getattr(t, "crop_size", native)) / resize, 4), head=[head],
        stages=_find_stages(model, [head]),
    )


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


def _build_timm(cfg: ModelConfig, num_classes: int, image_size: int) -> tuple[nn.Module, ModelInfo]:
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
    kwargs = {"img_size": image_size} if image_size and pcfg is not None and pcfg.fixed_input_size else {}
    load = cfg.pretrained and not cfg.checkpoint
    try:
        model = timm.create_model(name, pretrained=load, **kwargs)
    except Exception as e:
        if not load:
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
        crop_pct=float(pc.get("crop_pct", 0.875)), head=head, stages=_find_stages(model, head),
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
            if next(child.parameters(), None) is None or _under(full, head) or above_head or isinstance(child, _NORMS):
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
    return [c for c, names in found.items() if not any(_under(n, found[o]) for o in found if o != c for n in names)]


# ---------------------------------------------------------------- checkpoints


def load_checkpoint(model: nn.Module, info: ModelInfo, path: str | os.PathLike, *, require_head: bool = False) -> None:
    """Initialise ``model`` from a local checkpoint (see ``model.checkpoint``), in place.

    Head tensors whose shape differs from the new head are dropped (the new head keeps
    its init), unless ``require_head``, where that raises :class:`UserError` like any other
    missing, unexpected or mis-shaped key.
    """
    state, src = _read_state(Path(path).expanduser(), info)
    own = model.state_dict()
    pos = "encoder.pos_embedding"
    if pos in state and pos in own and state[pos].shape != own[pos].shape and hasattr(model, "patch_size"):
        from torchvision.models.vision_transformer import interpolate_embeddings

        state = dict(interpolate_embeddings(info.input_size, model.patch_size, state))
    dropped = [k for k, v in state.items() if k in own and _under(k, info.head) and v.shape != own[k].shape]
    if require_head:
        absent = [k for k in own if _under(k, info.head) and k not in state]
        if absent:
            raise UserError(f"model.checkpoint '{src}' holds no classification head ({', '.join(absent[:2])} missing): "
                            "a fresh head would make the result meaningless; give a fine-tuned checkpoint or export")
        if dropped:
            shapes = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in dropped[:2])
            raise UserError(
                f"model.checkpoint '{src}' has a head that does not fit the {info.num_classes} classes expected here "
                f"({shapes}; a model.heads=separate checkpoint has one output per class of all its tasks): a fresh "
                "head would make the result meaningless; use data whose classes match the checkpoint's")
    for k in dropped:
        del state[k]
    missing = [k for k in own if k not in state and not _under(k, info.head) and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not k.startswith(_IGNORED_EXTRA_KEYS)]
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in state if k in own and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {what} (e.g. {', '.join(v[:3])})" for what, v in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if v]
        raise UserError(
            f"model.checkpoint '{src}' does not fit model '{info.name}': {'; '.join(parts)}. "
            "Set model.name to the architecture the checkpoint was saved from"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    if dropped:
        log.info("checkpoint %s: dropped head tensors %s (new head for %d classes)", src, dropped, info.num_classes)


def _read_state(path: Path, info: ModelInfo) -> tuple[dict[str, torch.Tensor], Path]:
    if not path.exists():
        raise UserError(f"model.checkpoint '{path}' does not exist: give a .safetensors/.pt file or a checkpoint directory")
    if path.is_dir():
        meta = path / "model.json"
        if meta.is_file():
            saved = json.loads(meta.read_text()).get("model")
            if saved and saved != info.name:
                raise UserError(f"model.checkpoint '{path}' holds a '{saved}' model ({meta}) but model.name is "
                                f"'{info.name}': set model.name={saved}")
        if not (path / "model.safetensors").is_file():
            raise UserError(
                f"model.checkpoint directory '{path}' has no model.safetensors: point it at a tldist "
                "checkpoint or export directory, or at a .safetensors/.pt/.pth file"
            )
        path = path / "model.safetensors"
    if path.suffix not in (".safetensors", ".pt", ".pth", ".bin", ".ckpt"):
        raise UserError(f"model.checkpoint '{path}': unknown file type; use .safetensors, .pt or .pth")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(
            f"model.checkpoint '{path}' holds objects other than tensors ({str(e).splitlines()[0]}); "
            "re-save only its state dict (torch.save(sd, 'clean.pt')) and point model.checkpoint at that"
        ) from None
    except Exception as e:
        raise UserError(f"model.checkpoint '{path}' could not be read: {type(e).__name__}: {e}") from None
    while isinstance(obj, dict) and any(isinstance(obj.get(k), dict) for k in ("state_dict", "model")):
        obj = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"model.checkpoint '{path}' is not a state dict (name -> tensor), nor a dict with one under "
                        "'state_dict' or 'model'")
    return {_strip(k): v for k, v in obj.items()}, path


def _strip(key: str) -> str:
    key = key.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")
    while key.startswith("module."):
        key = key[len("module."):]
    return key


# ---------------------------------------------------------------- helpers


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _as_list(v: Any) -> list[str]:
    return [v] if isinstance(v, str) else list(v or [])


def _first(v: Any) -> int:
    return int(v[0] if isinstance(v, (list, tuple)) else v)


def _close(name: str, names: list[str], prefix: str = "") -> str:
    near = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    return f" (close matches: {', '.join(prefix + n for n in near)})" if near else ""
