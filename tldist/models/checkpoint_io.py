"""Reading model weights for :func:`tldist.models.factory.build_model`.

A :class:`WeightsSource` is a state dict plus what is known about the architecture that produced it:
the constructor arguments (:attr:`ModelInfo.model_kwargs`) and, for a structurally pruned model, the
module shapes pruning changed. :func:`read_weights_file` makes one from a weights file
(``.safetensors``, or ``.pt``/``.pth`` read pickle-free with :func:`tldist.safeload.load_pickle_free`,
including torchvision's and timm's ``train.py`` checkpoints, whose saved ``args`` tell the
architecture); tldist's own checkpoint and export directories are read by
:mod:`tldist.artifacts.resolve`, which knows their layout and fills in the recorded architecture.
:func:`load_state` loads a source into a freshly built model, so that the rebuilt model computes
what the saved one computed.

Structured pruning (``tldist compress prune --structured``, :mod:`tldist.compress.structured`)
changes layer widths. Such a model records, under :data:`PRUNED_KEY`, the shape attributes that
pruning changed per module (``{"layer1.0.conv1": {"out_channels": 40}, ...}``);
:func:`apply_pruned_shapes` gives a freshly built model those shapes before its weights are loaded.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from tldist.errors import UserError
from tldist.models.info import IGNORED_EXTRA_KEYS, ModelInfo, timm_arch_kwargs, under
from tldist.safeload import TRAINER_GLOBALS, load_pickle_free

log = logging.getLogger("tldist.models.factory")

PRUNED_KEY = "structured_pruning"
"""Key of a model record (``model.json``) holding a structurally pruned model's module shapes under ``modules``."""

SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
               "normalized_shape", "num_channels", "embed_dim", "num_heads", "head_dim", "kdim", "vdim")
"""Module attributes that describe tensor shapes (torch.nn and timm names) and that torch-pruning updates."""


@dataclass
class WeightsSource:
    """Weights to load into a model, with what is known about the architecture that made them."""

    state: dict[str, torch.Tensor]
    """The state dict (wrapper prefixes such as ``module.`` and ``_orig_mod.`` stripped)."""
    path: Path
    """The weights file it came from."""
    arch: dict[str, Any] | bool | None
    """The saved model's constructor kwargs (:attr:`ModelInfo.model_kwargs`) when recorded; a bool when
    only whether it had the pretrained architecture is known (an older tldist checkpoint's config, another
    trainer's args); None when nothing says (a plain state dict)."""
    pruned: Optional[dict[str, dict[str, Any]]] = None
    """Module name -> shape attributes changed by structured pruning (see :data:`PRUNED_KEY`); None: not pruned."""
    where: str = ""
    """How messages name it, e.g. ``model.checkpoint 'runs/r50/checkpoints/step_00000120'``; empty: the file."""

    @property
    def label(self) -> str:
        return self.where or f"model.checkpoint '{self.path}'"


def load_weights_file(model: nn.Module, info: ModelInfo, path: str | os.PathLike, *, require_head: bool = False) -> None:
    """Load the weights file ``path`` (``.safetensors``/``.pt``/``.pth``) into ``model``, in place (see
    :func:`load_state`). ``model`` must already be built with the architecture the weights came from."""
    load_state(model, info, read_weights_file(Path(path).expanduser(), info.name), require_head=require_head)


def load_state(model: nn.Module, info: ModelInfo, source: WeightsSource, *, require_head: bool) -> None:
    """Load ``source`` into a freshly built ``model``, in place.

    A structurally pruned source first gives ``model`` its pruned shapes (:func:`apply_pruned_shapes`).
    ViT position embeddings of another resolution are interpolated. Head tensors whose shape differs
    from the new head are dropped (the new head keeps its init), unless ``require_head`` (scoring or
    exporting a trained model), where that raises :class:`UserError` like any other missing,
    unexpected or mis-shaped key; the message tells a class-count mismatch from a width mismatch of
    the layers feeding the head (a pruned model read without its record).
    """
    state, src = source.state, source.label
    if source.pruned:
        apply_pruned_shapes(model, source.pruned, state, src)
    own = model.state_dict()
    pos = "encoder.pos_embedding"
    if pos in state and pos in own and state[pos].shape != own[pos].shape and hasattr(model, "patch_size"):
        from torchvision.models.vision_transformer import interpolate_embeddings

        state = dict(interpolate_embeddings(info.input_size, model.patch_size, state))
    dropped = [k for k, v in state.items() if k in own and under(k, info.head) and v.shape != own[k].shape]
    if require_head:
        absent = [k for k in own if under(k, info.head) and k not in state]
        if absent:
            raise UserError(f"{src} holds no classification head ({', '.join(absent[:2])} missing): "
                            "a fresh head would make the result meaningless; give a fine-tuned checkpoint or export")
        if dropped:
            shapes = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in dropped[:2])
            outputs = {k: state[k].shape[0] for k in dropped if state[k].dim() >= 1}
            if all(n == own[k].shape[0] for k, n in outputs.items()):
                raise UserError(
                    f"{src}: the layers feeding the classification head have other widths than model "
                    f"'{info.name}' builds ({shapes}): the weights come from a structurally pruned model whose "
                    "pruned shapes are not recorded with them; load it from the tldist checkpoint or export that "
                    "records them (model.json 'structured_pruning')")
            raise UserError(
                f"{src} has a head that does not fit the {info.num_classes} classes expected here "
                f"({shapes}; a model.heads=separate checkpoint has one output per class of all its tasks): a fresh "
                "head would make the result meaningless; use data whose classes match the checkpoint's")
    for k in dropped:
        del state[k]
    missing = [k for k in own if k not in state and not under(k, info.head) and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not k.startswith(IGNORED_EXTRA_KEYS)]
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in state if k in own and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {what} (e.g. {', '.join(v[:3])})" for what, v in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if v]
        hint = ("Set model.name to the architecture the checkpoint was saved from" if not shapes or unexpected
                or missing else "The weights have other layer widths: a structurally pruned model must be loaded "
                "from the tldist checkpoint or export that records its shapes")
        raise UserError(f"{src} does not fit model '{info.name}': {'; '.join(parts)}. {hint}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    if dropped:
        log.info("%s: dropped head tensors %s (new head for %d classes)", src, dropped, info.num_classes)


def read_weights_file(path: Path, name: str) -> WeightsSource:
    """Read a weights file for model ``name``: ``.safetensors``, or ``.pt``/``.pth``/``.bin``/``.ckpt``.

    ``.pt`` files are loaded pickle-free (:func:`~tldist.safeload.load_pickle_free`); besides tensors
    and plain data they may hold the ``argparse.Namespace`` that torchvision's and timm's reference
    ``train.py`` store as ``args`` (their architecture, see :func:`_trainer_arch`). The weights are the
    dict under ``state_dict`` (timm), else ``model`` (torchvision), else the file itself; EMA copies
    (``state_dict_ema``, ``model_ema``) are not used (as timm's ``validate.py`` without ``--use-ema``).
    Raises :class:`UserError` naming the file when it is missing, unreadable, unsafe or not a state dict.
    """
    if not path.exists():
        raise UserError(f"model.checkpoint '{path}' does not exist: give a .safetensors/.pt file or a checkpoint directory")
    if path.is_dir():
        raise UserError(f"model.checkpoint '{path}' is a directory without a tldist model record: point it at a "
                        "tldist checkpoint (step_*), run or export directory, or at a .safetensors/.pt/.pth file")
    arch: dict[str, Any] | bool | None = None
    if path.suffix not in (".safetensors", ".pt", ".pth", ".bin", ".ckpt"):
        raise UserError(f"model.checkpoint '{path}': unknown file type; use .safetensors, .pt or .pth")
    if path.suffix == ".safetensors":
        obj: Any = read_safetensors(path, "model.checkpoint")
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
    return WeightsSource({strip_wrapper_prefixes(k): v for k, v in obj.items()}, path, arch)


def read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file as a CPU state dict; :class:`UserError` naming ``what`` and the file if unreadable."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises SafetensorError (an Exception) too
        first = " ".join(str(e).split())[:200]
        raise UserError(f"{what} '{path}' could not be read ({type(e).__name__}: {first})") from None


def check_pruned_shapes(modules: Any, where: str) -> dict[str, dict[str, Any]]:
    """``modules`` (a record's ``structured_pruning.modules``) checked: module name -> {shape attribute: size}
    with attributes among :data:`SHAPE_ATTRS`; :class:`UserError` naming ``where`` when malformed."""
    if not isinstance(modules, dict) or not all(
            isinstance(a, dict) and all(k in SHAPE_ATTRS for k in a) for a in modules.values()):
        raise UserError(f"'{where}' has a malformed '{PRUNED_KEY}.modules' record (module name -> "
                        f"{{attribute: size}} with attributes among {', '.join(SHAPE_ATTRS)}): re-create it "
                        "with 'tldist compress prune --structured'")
    return modules


def apply_pruned_shapes(model: nn.Module, modules: dict[str, dict[str, Any]], state: dict[str, torch.Tensor],
                        where: str) -> None:
    """Give a freshly built ``model`` the pruned shapes recorded in ``modules``, in place.

    Sets each module's shape attributes and replaces its own parameters/buffers that ``state``
    (the saved weights) holds with uninitialised tensors of the saved shapes, ready for
    ``load_state_dict``. ``where`` names the source in the :class:`UserError` raised for a module
    the model does not have.
    """
    for name, attrs in modules.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{where} records a pruned module '{name}' that the model does not have: "
                            "set model.name to the architecture the model was pruned from") from None
        for attr, value in attrs.items():
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
        prefix = f"{name}." if name else ""
        for pname, p in list(module.named_parameters(recurse=False)):
            saved = state.get(prefix + pname)
            if saved is not None and saved.shape != p.shape:
                setattr(module, pname, nn.Parameter(torch.empty(saved.shape, dtype=p.dtype), requires_grad=p.requires_grad))
        for bname, b in list(module.named_buffers(recurse=False)):
            saved = state.get(prefix + bname)
            if b is not None and saved is not None and saved.shape != b.shape:
                module.register_buffer(bname, torch.empty(saved.shape, dtype=b.dtype),
                                       persistent=bname not in module._non_persistent_buffers_set)


def shape_attrs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every module's shape attributes (:data:`SHAPE_ATTRS`) as JSON values: compare before and after
    pruning to get what a record must hold."""
    out: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        attrs = {a: getattr(m, a) for a in SHAPE_ATTRS if isinstance(getattr(m, a, None), (int, tuple, list))}
        if attrs:
            out[name] = {a: list(v) if isinstance(v, tuple) else v for a, v in attrs.items()}
    return out


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
        kw = timm_arch_kwargs(name[len("timm:"):], pretrained=bool(a["pretrained"]))
        kw.update({"bn_eps": a["bn_eps"]} if a.get("bn_eps") is not None else {})
        kw.update({"global_pool": a["gp"]} if a.get("gp") is not None else {})
        kw.update(a["model_kwargs"] if isinstance(a.get("model_kwargs"), dict) else {})
        return kw
    if "weights" in a:
        return bool(a["weights"])
    return None


def strip_wrapper_prefixes(key: str) -> str:
    """A state-dict key without DDP (``module.``), compile (``_orig_mod.``) and checkpoint-wrapper prefixes."""
    key = key.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")
    while key.startswith("module."):
        key = key[len("module."):]
    return key
