"""The model record and the export-directory format.

**The model record** (``model.json``) says how to rebuild a model, whatever chain of fine-tuning,
pruning, distillation and export made it. It is written into every ``step_*`` checkpoint and every
export, and read back by one resolver (:mod:`tldist.artifacts.resolve`)::

    {"model": "resnet50", "num_classes": 10, "classes": [...],
     "preprocess": {"image_size": 224, "resize": 232, "crop_pct": 0.9655..., "mean": [...], "std": [...],
                    "interpolation": "bilinear"},
     "model_kwargs": {...}, "weights": "raw", "step": 120, "tasks": [...] (multi-task heads only),
     "structured_pruning": {"modules": {...}, ...} (pruned models only), "tldist_version": "..."}

- ``preprocess`` is :func:`tldist.data.transforms.eval_preprocess`: resize the shorter side to
  ``resize`` (``floor(image_size / crop_pct)``, ``crop_pct`` and ``interpolation`` from the weights'
  metadata), center-crop ``image_size``: exactly what training's own eval did;
- ``model_kwargs`` are the constructor arguments to build the architecture with (e.g.
  ``{"transform_input": true}`` for a pretrained googlenet; :attr:`tldist.models.info.ModelInfo.model_kwargs`);
- ``weights`` says which weights the directory's ``model.safetensors`` (an export) or the checkpoint
  holds by default: ``raw`` (the trained weights) or ``ema`` (their moving average, ``train.ema_decay``);
- ``structured_pruning.modules`` holds the layer widths structured pruning changed
  (:data:`tldist.models.checkpoint_io.PRUNED_KEY`).

**An export directory** holds ``model.safetensors`` (a plain state dict) and ``model.json``, so that
``tldist predict`` (or any script with torchvision + safetensors) can rebuild the model and its
preprocessing without the training config; compress jobs add their reports (``report.json``) and an
int8 directory holds ``model_int8.pt`` (TorchScript) instead. Directories are written atomically
(:func:`atomic_dir`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

import tldist
from tldist.artifacts import layout
from tldist.data.manifest import load_manifest
from tldist.data.transforms import eval_preprocess
from tldist.errors import ConfigError, DataError, UserError
from tldist.models.checkpoint_io import PRUNED_KEY
from tldist.models.info import ModelInfo
from tldist.paths import check_output_dir, make_output_dir
from tldist.safeload import read_json

INT8_FILE = "model_int8.pt"
"""TorchScript file of a quantized model inside a ``tldist compress quantize`` output directory."""


def model_record(info: ModelInfo, *, classes: list[str], image_size: int, weights: str = "raw",
                 tasks: Optional[list[dict[str, Any]]] = None, pruned: Optional[dict[str, Any]] = None,
                 step: Optional[int] = None, **extra: Any) -> dict[str, Any]:
    """The model record (``model.json``) of a model built as ``info`` describes.

    ``classes``: class names in output order; ``image_size``: the input size (px) it is scored at;
    ``weights``: ``raw`` or ``ema``; ``tasks``: multi-task heads (``name``, ``classes``, ``offset``,
    ``loss_weight``), or None; ``pruned``: the structured-pruning record (``{"modules": ...}``) the model's widths come
    from, or None; ``extra``: further keys (provenance: ``source_checkpoint``, ``compression``...).
    """
    record: dict[str, Any] = {
        "model": info.name, "num_classes": info.num_classes, "classes": list(classes),
        "preprocess": eval_preprocess(info, image_size), "model_kwargs": dict(info.model_kwargs),
        "weights": weights, "tldist_version": tldist.__version__,
    }
    if step is not None:
        record["step"] = step
    if tasks:
        record["tasks"] = [dict(t) for t in tasks]
    if pruned:
        record[PRUNED_KEY] = pruned
    record.update(extra)
    return record


def write_export(model: Any, meta: dict[str, Any], out_dir: str | os.PathLike,
                 extra: Optional[dict[str, Any]] = None, texts: Optional[dict[str, str]] = None) -> Path:
    """Write an export directory atomically: ``model.safetensors``, ``model.json`` (``meta``), one
    JSON file per entry of ``extra`` (reports, timm's ``config.json``) and one text file per entry of
    ``texts`` (``README.md``). An older directory at ``out_dir`` is replaced."""
    from safetensors.torch import save_file

    with atomic_dir(out_dir) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(tmp / layout.WEIGHTS))
        for name, content in {layout.MODEL_RECORD: meta, **(extra or {})}.items():
            (tmp / name).write_text(json.dumps(content, indent=1))
        for name, text in (texts or {}).items():
            (tmp / name).write_text(text)
    return Path(out_dir)


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out_dir``; when the block ends without an error,
    it replaces ``out_dir`` (an older directory there is removed), else it is deleted. Readers see
    the old directory or the complete new one, never a partial one. Raises :class:`UserError` when
    ``out_dir`` or one of its parents is an existing file."""
    out = Path(out_dir)
    check_output_dir(out, "output")
    make_output_dir(out.parent, "output")
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        yield tmp
        if out.exists():
            if not out.is_dir():
                raise UserError(f"output '{out}' exists and is not a directory: choose another path")
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (temporary file + ``os.replace``)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, p)


def check_out_dir(out: str | os.PathLike, inputs: dict[str, str], flag: str = "--out") -> None:
    """Refuse an output directory that is (or holds) one of the inputs, as writing it would destroy
    them, or that cannot be created because it or a parent is a file (:class:`ConfigError`/:class:`UserError`)."""
    o = Path(out).resolve()
    for name, value in inputs.items():
        i = Path(value).resolve()
        if o == i or o in i.parents:
            raise ConfigError(f"{flag} '{out}' would overwrite {name} '{value}': choose a new directory")
    check_output_dir(out, flag)


def refuse_multitask(meta: dict[str, Any], where: str, command: str) -> None:
    """Raise :class:`UserError` if ``meta`` (a model record) describes a multi-task model: ``command``
    works on one head. ``where`` names the input, e.g. "--model 'x'"."""
    if meta.get("tasks"):
        raise UserError(f"{where} is a multi-task model (model.heads=separate, {len(meta['tasks'])} heads); "
                        f"{command} works on one head: give a single-task model")


def output_spans(meta: dict[str, Any]) -> list[tuple[Optional[str], int, int, list[str]]]:
    """``(task name, first output, end, class names)`` per head of a model record: one unnamed span for a
    single head, one per task for ``model.heads=separate`` (scored with its own softmax)."""
    if meta.get("tasks"):
        return [(t["name"], t["offset"], t["offset"] + len(t["classes"]), list(t["classes"])) for t in meta["tasks"]]
    n = int(meta["num_classes"])
    return [(None, 0, n, list(meta["classes"]) or [str(i) for i in range(n)])]


def model_classes(meta: dict[str, Any]) -> list[str]:
    """Class names of a model record (``"0".."N-1"`` when it records none)."""
    return list(meta.get("classes") or [str(i) for i in range(int(meta["num_classes"]))])


def check_shards(location: str, meta: dict[str, Any], model_dir: str, role: str, *, same_order: bool = False) -> None:
    """Raise :class:`DataError` unless the shard set's classes fit the model of record ``meta``.

    Val sets may hold a subset of the model's classes (labels are remapped by name); with
    ``same_order`` (training) the set's classes must be the model's, in the same order.
    """
    classes = load_manifest(location).classes
    mine = model_classes(meta)
    if not meta.get("classes"):  # no names recorded: only the count can be compared
        ok = len(classes) == len(mine)
    elif same_order:
        ok = list(classes) == mine[:len(classes)]
    else:
        ok = all(c in mine for c in classes)
    if not ok:
        raise DataError(
            f"{role} shards '{location}' have {len(classes)} classes ({_short(classes)}) but the model in "
            f"'{model_dir}' was exported with {len(mine)} ({_short(mine)}): use shards of the dataset the model "
            "was trained on")


def _short(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def read_export_meta(path: str | os.PathLike) -> dict[str, Any]:
    """``model.json`` of an fp32 export directory (what ``tldist compress`` reads), raising a one-line
    :class:`UserError` for anything else: a file, a checkpoint or run directory, an int8 directory, a
    record without the keys a rebuild needs, a missing ``model.safetensors`` or a multi-task model."""
    p = Path(path)
    hint = "give a directory written by 'tldist export CHECKPOINT OUT'"
    if not p.exists():
        raise UserError(f"export directory '{p}' does not exist: {hint}")
    if p.is_file():
        if p.name in (layout.MODEL_RECORD, layout.WEIGHTS):
            raise UserError(f"'{p}' is a file: pass its directory '{p.parent}' instead")
        raise UserError(f"'{p}' is a file, not an export directory: {hint}")
    if (p / layout.TRAINER).is_file() or (p / layout.CHECKPOINTS).is_dir():
        raise UserError(f"'{p}' is a training checkpoint/run, not an export directory: "
                        f"run 'tldist export {p} EXPORT_DIR' first and compress EXPORT_DIR")
    meta_file = p / layout.MODEL_RECORD
    if not meta_file.is_file():
        raise UserError(f"'{p}' is not a tldist export directory (no {layout.MODEL_RECORD}): {hint}")
    meta = read_json(meta_file, what="export metadata")
    if not isinstance(meta, dict):
        raise UserError(f"model metadata '{meta_file}' is not a JSON object: re-create it with 'tldist export'")
    if meta.get("format") == "torchscript-int8" or (p / INT8_FILE).is_file():
        raise UserError(f"'{p}' holds an int8 model from 'tldist compress quantize': compress the fp32 export "
                        "directory it was made from instead")
    check_record(meta, meta_file)
    if not (p / layout.WEIGHTS).is_file():
        raise UserError(f"export directory '{p}' has no {layout.WEIGHTS}: re-create it with 'tldist export'")
    refuse_multitask(meta, f"export directory '{p}'", "tldist compress")
    return meta


def check_record(meta: dict[str, Any], where: str | os.PathLike) -> None:
    """Raise :class:`UserError` naming ``where`` when a model record lacks a key a rebuild needs."""
    for key in ("model", "num_classes", "preprocess"):
        if key not in meta:
            raise UserError(f"'{where}' lacks the key '{key}': re-create the export with 'tldist export'")
    if not isinstance(meta["preprocess"], dict):
        raise UserError(f"'{where}' has a malformed 'preprocess' entry: re-create the export with 'tldist export'")
    for key in ("image_size", "mean", "std"):
        if key not in meta["preprocess"]:
            raise UserError(f"'{where}' lacks the key 'preprocess.{key}': re-create the export with 'tldist export'")


def state_to_cpu(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict as contiguous CPU tensors (what an export stores)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
