"""One resolver for any path a user gives for a model: what it holds, which weights, and the model.

Every command that takes a model (``tldist eval``, ``predict``, ``export``, ``compress``, ``adapt``,
``pseudo-label``, ``study``'s source, ``distill.teacher=``, ``model.checkpoint=``) goes through
:func:`resolve`, so they all read the same weights that ``tldist export`` would write and name them
the same way (``weights: ema, step 30``). A path is one of:

- an **export directory** (``model.json`` + ``model.safetensors``): one set of weights, as recorded;
- a **checkpoint directory** (``checkpoints/step_*``) or a **run directory** (its best checkpoint,
  else its latest): raw weights or their EMA (``--weights raw|ema``; default: the ones the run's
  ``checkpoint.best_metric`` judged, recorded in the checkpoint's model record);
- a **weights file** (``.safetensors``/``.pt``/``.pth``, or a directory holding only
  ``model.safetensors``): weights without a record (no architecture, classes or preprocessing).

The model record (:func:`tldist.artifacts.export.model_record`) carries everything a rebuild needs:
architecture name and constructor arguments, class list, preprocessing, task heads and the layer
widths of a structurally pruned model. Checkpoints written before the record existed are read from
their ``trainer.json`` and ``config.yaml`` instead.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from tldist.artifacts import dcp as safe_dcp
from tldist.artifacts import layout
from tldist.artifacts.checkpoint import best_checkpoint, is_sharded, latest_checkpoint
from tldist.artifacts.export import INT8_FILE, check_record, refuse_multitask
from tldist.config import ModelConfig
from tldist.data.transforms import eval_preprocess
from tldist.errors import ConfigError, UserError
from tldist.models.checkpoint_io import (PRUNED_KEY, WeightsSource, apply_pruned_shapes, check_pruned_shapes,
                                         read_safetensors, read_weights_file)
from tldist.models.factory import build_model
from tldist.models.info import ModelInfo
from tldist.models.transfer import apply_head_classes
from tldist.safeload import read_json, read_yaml

log = logging.getLogger("tldist")

WEIGHT_CHOICES = ("raw", "ema")
"""``--weights`` / ``model.checkpoint_weights`` values: the trained weights or their EMA."""
_WEIGHTS_OPTION = {"model.checkpoint": "model.checkpoint_weights", "distill.teacher": "distill.teacher_weights"}
"""The option that chooses the weights of a path given as a config key (else ``--weights``)."""


@dataclass
class Artifact:
    """What a path given for a model holds (see :func:`resolve`)."""

    kind: str
    """``export``, ``checkpoint`` or ``weights`` (a plain weights file)."""
    path: Path
    """The export directory, the ``step_*`` directory or the weights file."""
    weights: Optional[str]
    """``raw`` or ``ema`` (None for a plain weights file)."""
    weights_file: Path
    """The file that holds those weights; for a sharded checkpoint, its directory (read with
    :func:`read_weights`)."""
    record: dict[str, Any] = field(default_factory=dict)
    """The model record (``model.json``), {} for a plain weights file; ``weights`` set to the choice."""
    legacy: bool = False
    """The record was rebuilt from an older checkpoint's ``trainer.json`` and ``config.yaml``:
    ``preprocess`` is filled in once the model is built (:func:`load_model`)."""
    flag: str = "--checkpoint"
    """How messages name the input (``--model``, ``distill.teacher``...)."""

    @property
    def model_name(self) -> Optional[str]:
        return self.record.get("model")

    @property
    def classes(self) -> list[str]:
        return list(self.record.get("classes") or [])

    @property
    def tasks(self) -> Optional[list[dict[str, Any]]]:
        return self.record.get("tasks")

    @property
    def image_size(self) -> int:
        pre = self.record.get("preprocess") or {}
        return int(pre.get("image_size") or self.record.get("image_size") or 0)

    @property
    def preprocess(self) -> Optional[dict[str, Any]]:
        return self.record.get("preprocess") or None

    @property
    def step(self) -> Optional[int]:
        return self.record.get("step")

    @property
    def pruned(self) -> Optional[dict[str, Any]]:
        """The structured-pruning record, or None."""
        return self.record.get(PRUNED_KEY)

    def describe(self) -> str:
        """``weights: ema, step 30`` (``weights: file``) for the log line of every command."""
        if self.kind == "weights":
            return f"weights: file {self.path}"
        step = f", step {self.step}" if self.step is not None else ""
        return f"weights: {self.weights}{step} ({self.kind} {self.path})"

    @property
    def where(self) -> str:
        return f"{self.flag} '{self.path}'"


def checkpoint_dir(path: str | Path) -> Path:
    """A ``step_*`` dir, or a run's ``checkpoints`` dir / output dir (-> its best, else latest)."""
    p = Path(path)
    if (p / layout.TRAINER).is_file():
        return p
    for root in (p, p / layout.CHECKPOINTS):
        if (root / layout.BEST).is_file() or any(root.glob("step_*")):
            found = best_checkpoint(root) or latest_checkpoint(root)
            if found is not None:
                return found
    raise UserError(f"'{path}' is not a tldist checkpoint (no {layout.TRAINER}), nor a run directory holding one")


def resolve(path: str | os.PathLike, *, weights: Optional[str] = None, flag: str = "--checkpoint") -> Artifact:
    """What ``path`` holds and which weights to use (see the module docstring).

    ``weights``: ``raw``, ``ema`` or None (a checkpoint: the ones its run judged best; an export: the
    ones it holds). Raises :class:`UserError` naming ``flag`` and the path when it does not exist, is
    none of the kinds above, holds no EMA for ``weights=ema``, or its record is unreadable.
    """
    if weights not in (None, *WEIGHT_CHOICES):
        raise UserError(f"{flag.split('=')[0]} weights '{weights}' is not a choice: use 'raw' (trained weights) "
                        "or 'ema' (their EMA)")
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{flag} '{path}' does not exist: give a checkpoint dir (step_*), a run dir, an export dir "
                        "or a weights file")
    record_file, weights_only = p / layout.MODEL_RECORD, p / layout.WEIGHTS
    if p.is_file() or (weights_only.is_file() and not record_file.is_file() and not (p / layout.TRAINER).is_file()):
        if weights == "ema":
            raise UserError(f"{flag} '{path}' is a plain weights file: it holds one set of weights, not an EMA; "
                            "drop the ema choice")
        return Artifact("weights", p, None, p if p.is_file() else weights_only, flag=flag)
    if record_file.is_file() and not (p / layout.TRAINER).is_file():  # an export
        record = _read_record(record_file)
        if record.get("format") == "torchscript-int8" or (p / INT8_FILE).is_file():
            raise UserError(f"{flag} '{path}' holds an int8 model (TorchScript) from 'tldist compress quantize': give "
                            "the fp32 export, checkpoint or run it was made from")
        held = str(record.get("weights") or "raw")
        if weights is not None and weights != held:
            raise UserError(f"{flag} '{path}' is an export of the {held} weights; for the {weights} weights export "
                            f"the checkpoint again ('tldist export RUN OUT --weights {weights}') or give the "
                            "checkpoint or run directory")
        return Artifact("export", p, held, weights_only, {**record, "weights": held}, flag=flag)
    try:
        ckpt = checkpoint_dir(p)
    except UserError:
        raise UserError(f"{flag} '{path}' is neither a tldist export (no {layout.MODEL_RECORD}) nor a checkpoint or "
                        f"run directory (no {layout.TRAINER} / {layout.CHECKPOINTS}/step_*): point it at one of "
                        "those") from None
    record_file = ckpt / layout.MODEL_RECORD
    legacy = not record_file.is_file()
    record = _legacy_record(ckpt) if legacy else _read_record(record_file)
    choice = _checkpoint_weights(ckpt, weights, record, flag)
    file = ckpt / (layout.EMA_WEIGHTS if choice == "ema" else layout.WEIGHTS)
    if is_sharded(ckpt) and not file.is_file():
        file = ckpt
    return Artifact("checkpoint", ckpt, choice, file, {**record, "weights": choice}, legacy=legacy, flag=flag)


def _read_record(f: Path) -> dict[str, Any]:
    d = read_json(f, what="model metadata")
    if not isinstance(d, dict):
        raise UserError(f"model metadata '{f}' is not a JSON object: re-create it ('tldist export' or a new checkpoint)")
    return d


def _checkpoint_weights(ckpt: Path, weights: Optional[str], record: dict[str, Any], flag: str) -> str:
    """Which weights of checkpoint ``ckpt`` to use: ``weights`` when given, else the record's default."""
    has_ema = (ckpt / layout.EMA_WEIGHTS).is_file() or (is_sharded(ckpt) and bool(safe_dcp.saved_keys(ckpt, "ema")))
    if weights is None:
        weights = str(record.get("weights") or "raw")
        if weights == "ema" and not has_ema:
            weights = "raw"
    if weights == "ema" and not has_ema:
        option = _WEIGHTS_OPTION.get(flag, "--weights")
        raise UserError(f"{option} ema: {flag} '{ckpt}' holds no EMA of the weights ({layout.EMA_WEIGHTS} or 'ema' "
                        f"state: trained with train.ema_decay=0); use {option} raw")
    return weights


def _legacy_record(ckpt: Path) -> dict[str, Any]:
    """The model record of a checkpoint written before ``model.json`` existed (``preprocess`` missing)."""
    trainer = read_json(ckpt / layout.TRAINER, what="checkpoint record")
    if not isinstance(trainer, dict):
        raise UserError(f"checkpoint record '{ckpt / layout.TRAINER}' is not a JSON object")
    cfg = (read_yaml(ckpt / layout.CONFIG, what="checkpoint config") or {}) if (ckpt / layout.CONFIG).is_file() else {}
    model_cfg = cfg.get("model") or {}
    best = str((cfg.get("checkpoint") or {}).get("best_metric") or "eval/top1")
    classes = list(trainer.get("classes") or [])
    record: dict[str, Any] = {
        "model": model_cfg.get("name"), "classes": classes, "num_classes": len(classes) or model_cfg.get("num_classes"),
        "image_size": int(trainer.get("image_size") or (cfg.get("data") or {}).get("image_size") or 0),
        "weights": "ema" if best.startswith("eval_ema/") else "raw", "step": trainer.get("step"),
    }
    if "model_kwargs" in trainer:
        record["model_kwargs"] = trainer["model_kwargs"]
    elif model_cfg:  # before model_kwargs were recorded: the pretrained architecture iff it loaded pretrained weights
        record["pretrained_arch"] = bool(model_cfg.get("pretrained", True)) and not model_cfg.get("checkpoint")
    if trainer.get("tasks"):
        record["tasks"] = [{"name": t["name"], "classes": t["classes"], "offset": t["offset"]} for t in trainer["tasks"]]
    return record


def _arch(record: dict[str, Any], where: str, depth: int = 0) -> dict[str, Any] | bool | None:
    """The constructor arguments a record gives (see :class:`~tldist.models.checkpoint_io.WeightsSource`)."""
    if "model_kwargs" in record:
        kw = record["model_kwargs"]
        if not isinstance(kw, dict):
            raise UserError(f"'model_kwargs' in '{where}' has bad value {kw!r}: must be an object of constructor "
                            "arguments")
        return kw
    if "pretrained_arch" in record:
        return bool(record["pretrained_arch"])
    source = record.get("source_checkpoint")  # exported before model_kwargs were recorded: ask its checkpoint
    if isinstance(source, str) and depth < 3 and (Path(source) / layout.TRAINER).is_file():
        src = Path(source)
        inner = _read_record(src / layout.MODEL_RECORD) if (src / layout.MODEL_RECORD).is_file() else _legacy_record(src)
        return _arch(inner, str(src), depth + 1)
    return None


def weights_source(art: Artifact, model_name: str) -> WeightsSource:
    """The weights ``art`` resolves to, for building ``model_name``: state dict, recorded architecture
    and pruned shapes. Raises :class:`UserError` when the record names another architecture."""
    if art.kind == "weights":
        source = read_weights_file(art.weights_file, model_name)
        source.where = art.where
        return source
    saved = art.model_name
    if saved and saved != model_name:
        raise UserError(f"{art.where} holds a '{saved}' model but model.name is '{model_name}': set model.name={saved}")
    pruned = art.pruned
    modules = check_pruned_shapes(pruned.get("modules") if isinstance(pruned, dict) else pruned,
                                  str(art.path / layout.MODEL_RECORD)) if pruned is not None else None
    state = read_weights(art)
    return WeightsSource(state, art.weights_file, _arch(art.record, str(art.path / layout.MODEL_RECORD)),
                         pruned=modules, where=art.where)


def read_weights(art: Artifact) -> dict[str, torch.Tensor]:
    """The chosen weights of ``art`` as a full CPU state dict: a ``.safetensors`` file, or the ``model``/``ema``
    state of a sharded checkpoint, gathered from its shards in this process (no process group)."""
    if art.weights_file.is_dir():
        return safe_dcp.read_full(art.weights_file, "ema" if art.weights == "ema" else "model")
    return read_safetensors(art.weights_file, art.flag)


def saved_shapes(art: Artifact) -> dict[str, torch.Tensor]:
    """Empty (meta-device) tensors with the shapes of ``art``'s weights: for a sharded checkpoint from its
    index alone (nothing of the weights is read), else from the weights file."""
    if art.weights_file.is_dir():
        prefix = "ema" if art.weights == "ema" else "model"
        return {k[len(prefix) + 1:]: torch.empty(tuple(v.size), dtype=v.properties.dtype, device="meta")
                for k, v in safe_dcp.saved_keys(art.weights_file, prefix).items() if hasattr(v, "size")}
    return read_weights(art)


def weights_bytes(art: Artifact) -> bytes:
    """The chosen weights of ``art`` as ``.safetensors`` bytes (its file as it is; a sharded checkpoint's state
    serialized): what compress reports compare sizes with."""
    if art.weights_file.is_dir():
        from safetensors.torch import save

        return save({k: v.contiguous() for k, v in read_weights(art).items()})
    return art.weights_file.read_bytes()


@dataclasses.dataclass
class LoadedModel:
    """A model rebuilt from a path (:func:`load_model`), with its record."""

    model: torch.nn.Module
    """The ``nn.Module`` in eval mode, on the CPU."""
    meta: dict[str, Any]
    """The model record: ``model``, ``num_classes``, ``classes``, ``preprocess``, ``weights``..."""
    artifact: Artifact
    info: ModelInfo

    @property
    def path(self) -> str:
        """The resolved export or checkpoint directory."""
        return str(self.artifact.path.resolve())

    @property
    def kind(self) -> str:
        return self.artifact.kind


def load_model(path: str | os.PathLike, *, weights: Optional[str] = None, flag: str = "--model",
               image_size: int = 0, single_head: Optional[str] = None) -> LoadedModel:
    """Rebuild the model at ``path`` (an export, checkpoint or run directory; see :func:`resolve`), on the
    CPU in eval mode, with the head its record requires. ``image_size`` (0: the recorded one) changes
    the input size (ViTs resize their position embeddings); ``single_head`` names a command that works on
    one head (a multi-task model is refused). Raises :class:`UserError` for a plain weights file (it
    records no architecture or classes) and for records a rebuild cannot use."""
    art = resolve(path, weights=weights, flag=flag)
    if single_head:
        refuse_multitask(art.record, art.where, single_head)
    if art.kind == "export":
        check_record(art.record, art.path / layout.MODEL_RECORD)
    if art.kind == "weights":
        raise UserError(f"{flag} '{path}' is a plain weights file: it records no architecture, classes or "
                        "preprocessing; give a tldist export, checkpoint or run directory")
    record = art.record
    if not record.get("model"):
        raise UserError(f"{art.where}: its record names no model architecture ('model'); re-create it")
    num_classes = int(record.get("num_classes") or len(art.classes) or 0)
    if num_classes < 1:
        raise UserError(f"{art.where} records no class list and no class count: export it with 'tldist export' "
                        "from a run that knows its classes")
    size = image_size or art.image_size
    model, info = build_model(ModelConfig(name=record["model"], pretrained=True), num_classes, image_size=size,
                              source=weights_source(art, record["model"]), require_head=True)
    meta = {**record, "num_classes": num_classes}
    if art.legacy or image_size or not meta.get("preprocess"):
        meta["preprocess"] = eval_preprocess(info, size or info.input_size)
        meta["model_kwargs"] = dict(info.model_kwargs)
        meta.pop("pretrained_arch", None)
        meta.pop("image_size", None)
    return LoadedModel(model.eval(), meta, art, info)


def build_configured_model(cfg: ModelConfig, num_classes: int, *, image_size: int = 0, require_head: bool = False,
                           weights: Optional[str] = None) -> tuple[torch.nn.Module, ModelInfo, Optional[Artifact]]:
    """Build ``cfg`` (``model.*``) with ``num_classes`` outputs, its ``model.checkpoint`` resolved like every
    other model path (an export, checkpoint or run dir, or a weights file; ``weights`` chooses raw/EMA);
    returns ``(model, info, artifact or None)``. See :func:`tldist.models.factory.build_model`."""
    if not cfg.checkpoint:
        model, info = build_model(cfg, num_classes, image_size=image_size, require_head=require_head)
        return model, info, None
    art = resolve(cfg.checkpoint, weights=weights, flag="model.checkpoint")
    model, info = build_model(cfg, num_classes, image_size=image_size, source=weights_source(art, cfg.name),
                              require_head=require_head)
    return model, info, art


def match_head_classes(model: torch.nn.Module, info: ModelInfo, art: Artifact, classes: list[str]) -> None:
    """When ``model.checkpoint`` records its classes, give every class of this run the head row trained
    for its name (:func:`~tldist.models.transfer.apply_head_classes`), never the row at the same position."""
    if art.kind == "weights" or not art.classes or art.classes == classes:
        return
    state = read_weights(art)
    carried = apply_head_classes(model, info, saved_classes=art.classes, classes=classes, saved_state=state)
    log.info("model.checkpoint %s: head rows matched by class name (%d of %d classes carried over, the others "
             "freshly initialised)", art.path, carried, len(classes))


def build_run_model(cfg: ModelConfig, num_classes: int, classes: list[str], resume_from: Optional[Path], *,
                    image_size: int = 0, has_tasks: bool = False
                    ) -> tuple[torch.nn.Module, ModelInfo, Optional[Artifact]]:
    """The model a training run starts from, with its new head (``num_classes`` outputs).

    From ``model.checkpoint`` (head rows matched by class name unless ``has_tasks``) or the pretrained
    weights; a resumed run (``resume_from``, a checkpoint dir) whose checkpoint records a structurally pruned
    architecture is rebuilt with that checkpoint's layer widths (its state loads afterwards). Returns
    ``(model, info, artifact the weights came from or None)``. Raises :class:`ConfigError` when the
    checkpoint holds another architecture than ``model.name``.
    """
    if resume_from is not None:
        saved = resolve(resume_from, weights="raw", flag="checkpoint.resume")
        if saved.model_name and saved.model_name != cfg.name:
            raise ConfigError(f"checkpoint.resume: '{resume_from}' holds a '{saved.model_name}' model but model.name "
                              f"is '{cfg.name}': set model.name={saved.model_name} to continue that run, or "
                              "checkpoint.resume=none (or another output_dir) to start a new one")
        if saved.pruned:  # the layer widths are the checkpoint's: shapes from its index
            model, info = build_model(cfg, num_classes, image_size=image_size)
            apply_pruned_shapes(model, check_pruned_shapes(saved.pruned.get("modules"), str(saved.path)),
                                saved_shapes(saved), saved.where)
            return model, info, saved
    model, info, origin = build_configured_model(cfg, num_classes, image_size=image_size,
                                                 weights=cfg.checkpoint_weights)
    if origin is not None:
        log.info("model.checkpoint: %s", origin.describe())
        if not has_tasks:
            match_head_classes(model, info, origin, classes)
    return model, info, origin


def require_model_record(art: Artifact, what: str) -> None:
    """Raise :class:`ConfigError` naming ``what`` when ``art`` is a plain weights file (no record)."""
    if art.kind == "weights":
        raise ConfigError(f"config key '{what}' has bad value '{art.path}': a plain weights file records no "
                          "architecture or classes; give a tldist export dir, checkpoint dir or run dir")
