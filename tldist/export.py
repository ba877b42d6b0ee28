"""``tldist export`` and ``tldist predict``: a fine-tuned model as one standalone directory.

An export directory holds ``model.safetensors`` (plain state dict) and ``model.json``::

    {"model": "resnet50", "num_classes": 10, "classes": [...],
     "preprocess": {"image_size": 224, "resize": 232, "crop_pct": 0.9655..., "mean": [...], "std": [...],
                    "interpolation": "bilinear"}, "source_checkpoint": "...", "weights": "raw", "tldist_version": "..."}

so that ``tldist predict`` (or any script with torchvision + safetensors) can rebuild the model and
its preprocessing without the training config. ``preprocess`` is
:func:`tldist.data.transforms.eval_preprocess`: resize the shorter side to ``resize`` (``floor(image_size
/ crop_pct)``, ``crop_pct`` and ``interpolation`` from the weights' metadata), center-crop ``image_size``:
exactly what training's own eval did. ``model_kwargs`` are the constructor arguments to build the
architecture with (e.g. ``{"transform_input": true}`` for a pretrained googlenet; see
:attr:`tldist.models.factory.ModelInfo.model_kwargs`). ``weights`` says which weights of the checkpoint
``model.safetensors`` holds: ``raw`` (the trained weights) or ``ema`` (their moving average,
``train.ema_decay``; see :func:`checkpoint_weights`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from tldist.errors import UserError
from tldist.safeload import read_json, read_yaml


def _checkpoint_dir(path: str | Path) -> Path:
    """A ``step_*`` dir, or a run's ``checkpoints`` dir / output dir (-> its best, else latest)."""
    p = Path(path)
    if (p / "trainer.json").is_file():
        return p
    for root in (p, p / "checkpoints"):
        if (root / "best.json").is_file() or any(root.glob("step_*")):
            from tldist.train.checkpoint import CheckpointManager

            mgr = CheckpointManager(root, keep_last=1, is_main=False)
            found = mgr.best() or mgr.latest()
            if found is not None:
                return found
    raise UserError(f"'{path}' is not a tldist checkpoint (no trainer.json), nor a run directory holding one")


def checkpoint_weights(ckpt: Path, weights: Optional[str] = None) -> str:
    """Which weights of checkpoint dir ``ckpt`` to use: ``raw`` (``model.safetensors``) or ``ema``
    (``ema.safetensors``, saved with ``train.ema_decay`` > 0). ``weights`` None picks the ones the run
    judged its best checkpoint on (``checkpoint.best_metric``: ``eval_ema/...`` -> ``ema``). Raises
    :class:`UserError` for ``ema`` when the checkpoint holds no EMA, or an unknown choice."""
    if weights not in (None, "raw", "ema"):
        raise UserError(f"--weights '{weights}' is not a choice: use 'raw' (trained weights) or 'ema' (their EMA)")
    if weights is None:
        cfg = read_yaml(ckpt / "config.yaml", what="checkpoint config") or {}
        best = str((cfg.get("checkpoint") or {}).get("best_metric") or "eval/top1")
        weights = "ema" if best.startswith("eval_ema/") and (ckpt / "ema.safetensors").is_file() else "raw"
    if weights == "ema" and not (ckpt / "ema.safetensors").is_file():
        raise UserError(f"--weights ema: checkpoint '{ckpt}' holds no EMA of the weights (no ema.safetensors: trained "
                        "with train.ema_decay=0); use --weights raw")
    return weights


def model_from_checkpoint(ckpt: Path, weights: Optional[str] = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained model of a checkpoint directory (``step_*``; CPU, eval mode) and the
    ``model.json`` metadata an export of it carries (classes, preprocessing, task heads, which
    ``weights``: see :func:`checkpoint_weights` for ``weights``)."""
    import dataclasses

    from tldist import __version__
    from tldist.config import config_from_dict
    from tldist.data.transforms import eval_preprocess
    from tldist.errors import DataError
    from tldist.models.factory import build_model

    cfg = config_from_dict(read_yaml(ckpt / "config.yaml", what="checkpoint config"))
    trainer = read_json(ckpt / "trainer.json", what="checkpoint record")
    classes = list(trainer.get("classes") or [])
    num_classes = len(classes) or cfg.model.num_classes
    if not num_classes:
        raise DataError(f"checkpoint '{ckpt}' records no class list (trainer.json) and config model.num_classes=0; "
                        "export it with 'tldist export' from a run that knows its classes")
    model_cfg = dataclasses.replace(cfg.model, checkpoint=str(ckpt), pretrained=True)
    image_size = trainer.get("image_size") or cfg.data.image_size
    model, info = build_model(model_cfg, num_classes, image_size=image_size, require_head=True)
    weights = checkpoint_weights(ckpt, weights)
    if weights == "ema":  # same keys as model.safetensors, checked the same way
        from tldist.models.checkpoint_io import load_checkpoint

        load_checkpoint(model, info, ckpt / "ema.safetensors", require_head=True)
    image_size = image_size or info.input_size
    meta: dict[str, Any] = {
        "model": cfg.model.name, "num_classes": num_classes, "classes": classes,
        "preprocess": eval_preprocess(info, image_size),  # what training's eval used (one definition)
        "source_checkpoint": str(ckpt.resolve()), "step": trainer.get("step"), "weights": weights,
        "tldist_version": __version__,
        "model_kwargs": info.model_kwargs,  # constructor arguments a rebuild needs (factory.ModelInfo.model_kwargs)
    }
    if trainer.get("tasks"):  # model.heads=separate: each task owns a slice of the outputs
        meta["tasks"] = [{"name": t["name"], "classes": t["classes"], "offset": t["offset"]} for t in trainer["tasks"]]
    return model.eval(), meta


def describe_checkpoint(path: str | Path) -> dict[str, Any]:
    """What a model file or directory records about its model, without building it.

    ``path``: an export dir (``model.json``), a ``step_*`` checkpoint dir (``trainer.json`` +
    ``config.yaml``), a run dir (-> its best, else latest checkpoint) or a plain weights file / dir
    holding only ``model.safetensors``. Returns ``{"kind": "export" | "checkpoint" | "weights",
    "path": Path (the weights to load), "model": architecture name or None, "classes": class names
    in output order ([] when none are recorded), "tasks": multi-task heads or None, "image_size":
    int (0: unknown), "preprocess": model.json's ``preprocess`` or None}``. Raises
    :class:`UserError` naming the path when it does not exist or its metadata is unreadable.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"checkpoint '{path}' does not exist: give a checkpoint dir (step_*), a run dir, an export "
                        "dir or a weights file")

    def read(f: Path) -> dict[str, Any]:
        d = read_json(f, what="model metadata")
        if not isinstance(d, dict):
            raise UserError(f"model metadata '{f}' is not a JSON object: re-create it ('tldist export' or a new checkpoint)")
        return d

    out: dict[str, Any] = {"kind": "weights", "path": p, "model": None, "classes": [], "tasks": None,
                           "image_size": 0, "preprocess": None}
    if p.is_file() or ((p / "model.safetensors").is_file() and not (p / "model.json").is_file()
                       and not (p / "trainer.json").is_file()):
        return out
    if (p / "model.json").is_file():
        meta = read(p / "model.json")
        pre = meta.get("preprocess") or {}
        return {**out, "kind": "export", "model": meta.get("model"), "classes": list(meta.get("classes") or []),
                "tasks": meta.get("tasks"), "image_size": int(pre.get("image_size") or 0), "preprocess": pre or None}
    ckpt = _checkpoint_dir(p)
    trainer = read(ckpt / "trainer.json")
    model = None
    if (ckpt / "config.yaml").is_file():
        model = ((read_yaml(ckpt / "config.yaml", what="checkpoint config") or {}).get("model") or {}).get("name")
    return {**out, "kind": "checkpoint", "path": ckpt, "model": model, "classes": list(trainer.get("classes") or []),
            "tasks": trainer.get("tasks"), "image_size": int(trainer.get("image_size") or 0)}


def export_model(checkpoint: str | Path, out_dir: str | Path, weights: Optional[str] = None) -> Path:
    """Write ``out_dir/model.safetensors`` + ``model.json`` from a training checkpoint (atomically).

    ``weights``: ``raw``, ``ema`` or None (the ones the best checkpoint was judged on; see
    :func:`checkpoint_weights`); ``model.json`` records the choice as ``"weights"``."""
    model, meta = model_from_checkpoint(_checkpoint_dir(checkpoint), weights)
    return write_export(model, meta, out_dir)


def refuse_multitask(meta: dict[str, Any], where: str, command: str) -> None:
    """Raise :class:`UserError` if ``meta`` (``model.json`` or ``trainer.json``) describes a
    multi-task model: ``command`` works on one head. ``where`` names the input, e.g. "--model 'x'"."""
    if meta.get("tasks"):
        raise UserError(f"{where} is a multi-task model (model.heads=separate, {len(meta['tasks'])} heads); "
                        f"{command} works on one head: give a single-task model")


def output_spans(meta: dict[str, Any]) -> list[tuple[Optional[str], int, int, list[str]]]:
    """``(task name, first output, end, class names)`` per head of an export: one unnamed span for a
    single head, one per task for ``model.heads=separate`` (scored with its own softmax)."""
    if meta.get("tasks"):
        return [(t["name"], t["offset"], t["offset"] + len(t["classes"]), list(t["classes"])) for t in meta["tasks"]]
    n = int(meta["num_classes"])
    return [(None, 0, n, list(meta["classes"]) or [str(i) for i in range(n)])]


def write_export(model: Any, meta: dict[str, Any], out_dir: str | os.PathLike,
                 extra: Optional[dict[str, Any]] = None) -> Path:
    """Write an export directory atomically: ``model.safetensors``, ``model.json`` (``meta``) and one
    JSON file per entry of ``extra`` (reports). An older directory at ``out_dir`` is replaced."""
    from safetensors.torch import save_file

    with atomic_dir(out_dir) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(tmp / "model.safetensors"))
        for name, content in {"model.json": meta, **(extra or {})}.items():
            (tmp / name).write_text(json.dumps(content, indent=1))
    return Path(out_dir)


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out_dir``; when the block ends without an error,
    it replaces ``out_dir`` (an older directory there is removed), else it is deleted. Readers see
    the old directory or the complete new one, never a partial one."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
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


def load_exported(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild an exported model (eval mode) and its ``model.json``."""
    from tldist.config import ModelConfig
    from tldist.models.factory import build_model

    p = Path(path)
    meta_file = p / "model.json"
    if not meta_file.is_file():
        raise UserError(f"'{path}' is not a tldist export (no model.json); create one with 'tldist export'")
    meta = read_json(meta_file, what="export metadata")
    model, _ = build_model(ModelConfig(name=meta["model"], pretrained=True, checkpoint=str(p)), meta["num_classes"],
                           image_size=meta["preprocess"]["image_size"])
    return model.eval(), meta


@torch.no_grad()
def predict(export_dir: str | Path, images: list[str], top_k: int = 3) -> list[dict[str, Any]]:
    """Classify image files with an exported model: the top-k (class, probability) per image, and
    per task (``tasks``: name -> top-k, each over its own head) for a multi-task export."""
    from tldist.data.transforms import Normalizer, build_eval_transform, decode_image, preprocess_crop_pct

    model, meta = load_exported(export_dir)
    pre = meta["preprocess"]
    transform = build_eval_transform(pre["image_size"], pre.get("interpolation", "bilinear"), preprocess_crop_pct(pre))
    normalize = Normalizer(pre["mean"], pre["std"], device=torch.device("cpu"))  # predict runs on the CPU
    results = []
    for path in images:
        try:
            x = transform(decode_image(Path(path).read_bytes(), "pil"))  # training's rule: EXIF, 16-bit...
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read image '{path}': {e}") from None
        logits = model(normalize(x[None]))[0]
        per_task = {}
        for name, lo, hi, classes in output_spans(meta):
            top = logits[lo:hi].softmax(-1).topk(min(top_k, hi - lo))
            per_task[name] = [(classes[i], float(v)) for v, i in zip(top.values.tolist(), top.indices.tolist())]
        result = {"image": path, "top": next(iter(per_task.values()))}
        if meta.get("tasks"):
            result["tasks"] = per_task
        results.append(result)
    return results


def _cmd_export(args: argparse.Namespace) -> int:
    out = export_model(args.checkpoint, args.out, args.weights)
    weights = read_json(Path(out) / "model.json", what="export metadata").get("weights")
    print(f"exported {out} (model.safetensors + model.json, {weights} weights)")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    for r in predict(args.model, args.images, args.top_k):
        for task, top in (r.get("tasks") or {None: r["top"]}).items():
            print(r["image"] + (f"  [{task}]" if task else "") + "  " + "  ".join(f"{c} {p:.3f}" for c, p in top))
    return 0


def add_parsers(sub) -> None:
    """Register ``export`` and ``predict`` on the ``tldist`` command."""
    p = sub.add_parser("export", help="write a fine-tuned model as a standalone directory")
    p.add_argument("checkpoint", help="checkpoint dir (step_*) or run output dir (uses its best checkpoint)")
    p.add_argument("out", help="export directory to create")
    p.add_argument("--weights", choices=("raw", "ema"), default=None,
                   help="the trained weights or their EMA (train.ema_decay > 0); default: the ones "
                        "checkpoint.best_metric judged (eval_ema/top1 -> ema)")
    p.set_defaults(func=_cmd_export)
    p = sub.add_parser("predict", help="classify image files with an exported model")
    p.add_argument("model", help="export directory from 'tldist export'")
    p.add_argument("images", nargs="+")
    p.add_argument("--top-k", type=int, default=3)
    p.set_defaults(func=_cmd_predict)
