"""Reading model weights for :func:`tldist.models.factory.build_model` (``model.checkpoint``).

A checkpoint is a weights file (``.safetensors``, or ``.pt``/``.pth`` read pickle-free with
:func:`tldist.safeload.load_pickle_free`, including torchvision's and timm's ``train.py``
checkpoints), or a tldist checkpoint/export directory. Besides the weights it may record the
constructor arguments its model was built with (:attr:`ModelInfo.model_kwargs`), which the factory
uses so that a rebuilt model computes what the saved one computed.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tldist.errors import UserError
from tldist.models.factory import _IGNORED_EXTRA_KEYS, ModelInfo, _timm_arch_kwargs, _under
from tldist.safeload import TRAINER_GLOBALS, load_pickle_free

log = logging.getLogger("tldist.models.factory")


@dataclass
class _Checkpoint:
    """A checkpoint read by :func:`_read_checkpoint`."""

    state: dict[str, torch.Tensor]
    path: Path
    """The weights file it came from."""
    arch: dict[str, Any] | bool | None
    """The saved model's constructor kwargs (:attr:`ModelInfo.model_kwargs`) when recorded; a bool when
    only whether it had the pretrained architecture is known (an older tldist checkpoint's config, another
    trainer's args); None when nothing says (a plain state dict)."""


def load_checkpoint(model: nn.Module, info: ModelInfo, path: str | os.PathLike, *, require_head: bool = False) -> None:
    """Initialise ``model`` from a local checkpoint (see ``model.checkpoint``), in place.

    Head tensors whose shape differs from the new head are dropped (the new head keeps
    its init), unless ``require_head``, where that raises :class:`UserError` like any other
    missing, unexpected or mis-shaped key. Only the weights are loaded: ``model`` must already be
    built with the checkpoint's constructor arguments, as :func:`build_model` does.
    """
    ck = _read_checkpoint(Path(path).expanduser(), info.name)
    _load_state(model, info, ck.state, ck.path, require_head=require_head)


def _load_state(model: nn.Module, info: ModelInfo, state: dict[str, torch.Tensor], src: Path, *,
                require_head: bool) -> None:
    if src.name == "model.safetensors" and (src.parent / "model.json").is_file():
        # a structurally pruned export (tldist compress prune --structured): resize the fresh model first
        from tldist.compress.structured import apply_pruned_shapes, recorded_shapes

        pruned = recorded_shapes(src.parent / "model.json")
        if pruned:
            apply_pruned_shapes(model, pruned, state, f"model.checkpoint '{src.parent}'")
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


def _read_checkpoint(path: Path, name: str) -> _Checkpoint:
    """Read ``model.checkpoint`` (a weights file, or a tldist checkpoint/export directory) for model ``name``.

    ``.pt``/``.pth`` files are loaded pickle-free (:func:`~tldist.safeload.load_pickle_free`); besides
    tensors and plain data they may hold the ``argparse.Namespace`` that torchvision's and timm's
    reference ``train.py`` store as ``args``. The weights are the dict under ``state_dict`` (timm), else
    ``model`` (torchvision), else the file itself; EMA copies (``state_dict_ema``, ``model_ema``) are
    not used (as timm's ``validate.py`` without ``--use-ema``).
    """
    if not path.exists():
        raise UserError(f"model.checkpoint '{path}' does not exist: give a .safetensors/.pt file or a checkpoint directory")
    arch: dict[str, Any] | bool | None = None
    if path.is_dir():
        arch = _recorded_arch(path, name)
        if not (path / "model.safetensors").is_file():
            raise UserError(
                f"model.checkpoint directory '{path}' has no model.safetensors: point it at a tldist "
                "checkpoint or export directory, or at a .safetensors/.pt/.pth file"
            )
        path = path / "model.safetensors"
    if path.suffix not in (".safetensors", ".pt", ".pth", ".bin", ".ckpt"):
        raise UserError(f"model.checkpoint '{path}': unknown file type; use .safetensors, .pt or .pth")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except Exception as e:  # safetensors raises SafetensorError (an Exception) too
            first = " ".join(str(e).split())[:200]
            raise UserError(f"model.checkpoint '{path}' could not be read ({type(e).__name__}: {first})") from None
    else:
        obj = load_pickle_free(path, what="model.checkpoint", allow=TRAINER_GLOBALS)
        arch = _trainer_arch(obj, name)
    top = obj
    while isinstance(obj, dict) and any(isinstance(obj.get(k), dict) for k in ("state_dict", "model")):
        obj = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"model.checkpoint '{path}' is not a state dict (name -> tensor), nor a dict with one under "
                        "'state_dict' or 'model'")
    ema = [k for k in ("state_dict_ema", "model_ema") if isinstance(top, dict) and isinstance(top.get(k), dict)]
    if ema:
        log.info("model.checkpoint %s also holds EMA weights under '%s'; the trained (non-EMA) weights are loaded. "
                 "To start from the EMA weights, save them alone: torch.save(ck['%s'], 'ema.pt')", path, ema[0], ema[0])
    return _Checkpoint({_strip(k): v for k, v in obj.items()}, path, arch)


def _recorded_arch(path: Path, name: str, depth: int = 0) -> dict[str, Any] | bool | None:
    """What a tldist export or checkpoint directory records about its architecture (see :func:`build_model`);
    raises :class:`UserError` when it records a model other than ``name``."""

    def read_json(f: Path) -> dict[str, Any]:
        from tldist.safeload import read_json as read

        d = read(f, what="model.checkpoint metadata")
        if not isinstance(d, dict):
            raise UserError(f"model.checkpoint metadata '{f}' is not a JSON object")
        return d

    def kwargs(d: dict[str, Any], f: Path) -> dict[str, Any]:
        kw = d["model_kwargs"]
        if not isinstance(kw, dict):
            raise UserError(f"'model_kwargs' in '{f}' has bad value {kw!r}: must be an object of constructor arguments")
        return kw

    meta_file, trainer_file, config_file = path / "model.json", path / "trainer.json", path / "config.yaml"
    if meta_file.is_file():  # an export
        meta = read_json(meta_file)
        saved = meta.get("model")
        if saved and saved != name:
            raise UserError(f"model.checkpoint '{path}' holds a '{saved}' model ({meta_file}) but model.name is "
                            f"'{name}': set model.name={saved}")
        if "model_kwargs" in meta:
            return kwargs(meta, meta_file)
        source = meta.get("source_checkpoint")  # exported before model_kwargs were recorded: ask its checkpoint
        if isinstance(source, str) and depth < 3 and (Path(source) / "trainer.json").is_file():
            return _recorded_arch(Path(source), name, depth + 1)
        return None
    arch: dict[str, Any] | bool | None = None
    if config_file.is_file():  # a step_* checkpoint: the run's resolved config
        import yaml

        try:
            model_cfg = (yaml.safe_load(config_file.read_text()) or {}).get("model") or {}
        except (OSError, yaml.YAMLError, AttributeError) as e:
            raise UserError(f"model.checkpoint config '{config_file}' could not be read ({type(e).__name__})") from None
        saved = model_cfg.get("name")
        if saved and saved != name:
            raise UserError(f"model.checkpoint '{path}' holds a '{saved}' model ({config_file}) but model.name is "
                            f"'{name}': set model.name={saved}")
        # Before model_kwargs were recorded, a run had the pretrained architecture iff it loaded pretrained weights.
        arch = bool(model_cfg.get("pretrained", True)) and not model_cfg.get("checkpoint")
    if trainer_file.is_file():
        trainer = read_json(trainer_file)
        if "model_kwargs" in trainer:
            return kwargs(trainer, trainer_file)
    return arch


def _trainer_arch(obj: Any, name: str) -> dict[str, Any] | bool | None:
    """The architecture another trainer's checkpoint records in its ``args`` (see :func:`build_model`).

    torchvision's ``references/classification/train.py`` builds ``get_model(args.model, weights=args.weights)``;
    timm's ``train.py`` ``create_model(args.model, pretrained=args.pretrained, bn_eps=args.bn_eps,
    global_pool=args.gp, **args.model_kwargs)`` (drop rates only act in training mode).
    """
    args = obj.get("args") if isinstance(obj, dict) else None
    a = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else None
    if not a:
        return None
    if name.startswith("timm:"):
        if "pretrained" not in a:
            return None
        kw = _timm_arch_kwargs(name[len("timm:"):], pretrained=bool(a["pretrained"]))
        kw.update({"bn_eps": a["bn_eps"]} if a.get("bn_eps") is not None else {})
        kw.update({"global_pool": a["gp"]} if a.get("gp") is not None else {})
        kw.update(a["model_kwargs"] if isinstance(a.get("model_kwargs"), dict) else {})
        return kw
    if "weights" in a:
        return bool(a["weights"])
    return None


def _strip(key: str) -> str:
    key = key.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")
    while key.startswith("module."):
        key = key[len("module."):]
    return key
