"""``tldist export`` and ``tldist predict``: a fine-tuned model as one standalone directory, and using it.

:func:`export_model` rebuilds the model a checkpoint or run holds (the weights its run judged best,
or ``weights=raw|ema``; :mod:`tldist.artifacts.resolve`) and writes it as an export directory:
``model.safetensors`` + ``model.json``, the model record (:mod:`tldist.artifacts.export`), which
keeps the architecture's constructor arguments, the class list, the preprocessing, the task heads
and a pruned model's layer widths. Every export also gets a model card (``README.md``,
:mod:`tldist.artifacts.model_card`); a ``timm:`` backbone gets timm's ``config.json`` too
(:mod:`tldist.models.timm_config`), so ``timm.create_model("local-dir:OUT", pretrained=True)`` rebuilds it.
:func:`push_to_hub` uploads an export directory to the Hugging Face Hub (``tldist export --push-to-hub``).
:func:`predict` classifies image files with any model path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from tldist.artifacts import layout
from tldist.artifacts.export import output_spans, write_export
from tldist.artifacts.model_card import model_card
from tldist.artifacts.resolve import load_model
from tldist.data.transforms import Normalizer, build_eval_transform, decode_error, decode_image, preprocess_crop_pct
from tldist.errors import UserError
from tldist.models.timm_config import TIMM_PREFIX, timm_hub_config
from tldist.world import command_line

README = "README.md"
"""The model card of an export directory."""
TIMM_CONFIG = "config.json"
"""timm's config of a ``timm:`` export (``timm.create_model("local-dir:DIR")`` reads it)."""


def export_model(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, weights: Optional[str] = None, *,
                 command: Optional[str] = None, repo_id: Optional[str] = None) -> Path:
    """Write ``out_dir/model.safetensors`` + ``model.json`` + ``README.md`` (and timm's ``config.json`` for a
    ``timm:`` backbone) from a checkpoint, run or export, atomically; returns ``out_dir``.

    ``weights``: ``raw``, ``ema`` or None (the ones the run's best checkpoint was judged on);
    ``model.json`` records the choice as ``"weights"``, and its step. ``command``: the command line named in
    the model card (default: this process's); ``repo_id``: the Hub repository the card's snippet names.
    """
    loaded = load_model(checkpoint, weights=weights, flag="CHECKPOINT")
    source = loaded.artifact.path.resolve()
    meta = {**loaded.meta, "source_checkpoint": str(source)}
    name = str(meta.get("model", ""))
    timm_name = name[len(TIMM_PREFIX):] if name.startswith(TIMM_PREFIX) and not meta.get("tasks") else None
    extra = {}
    if timm_name is not None:  # a multi-task model's outputs are several heads: timm has no such format
        extra[TIMM_CONFIG] = timm_hub_config(loaded.model, classes=list(meta.get("classes") or []),
                                             preprocess=meta["preprocess"])
    card = model_card(meta, source, export_command=command or command_line(), timm_name=timm_name, repo_id=repo_id)
    return write_export(loaded.model, meta, out_dir, extra=extra, texts={README: card})


def require_hub() -> None:
    """Raise a one-line :class:`UserError` unless huggingface_hub (the optional extra ``hub``) is installed."""
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise UserError("--push-to-hub needs huggingface_hub: pip install 'tldist[hub]'") from None


def hub_operations(out_dir: str | os.PathLike) -> list[Any]:
    """The ``huggingface_hub.CommitOperationAdd`` of every file of the export directory ``out_dir``
    (``model.safetensors``, ``model.json``, ``README.md``, timm's ``config.json``, reports), paths relative
    to it: the one commit :func:`push_to_hub` makes. Raises :class:`UserError` when huggingface_hub is not
    installed or ``out_dir`` is not an export directory."""
    require_hub()
    from huggingface_hub import CommitOperationAdd

    root = Path(out_dir)
    if not (root / layout.MODEL_RECORD).is_file() or not (root / layout.WEIGHTS).is_file():
        raise UserError(f"'{root}' is not an export directory (no {layout.MODEL_RECORD} + {layout.WEIGHTS}): "
                        "write it with 'tldist export' first")
    return [CommitOperationAdd(path_in_repo=p.relative_to(root).as_posix(), path_or_fileobj=str(p))
            for p in sorted(root.rglob("*")) if p.is_file()]


def push_to_hub(out_dir: str | os.PathLike, repo_id: str, *, private: bool = False,
                token: Optional[str] = None, commit_message: Optional[str] = None) -> str:
    """Upload the export directory ``out_dir`` to the Hugging Face Hub model repository ``repo_id``
    (created if missing; ``private`` for a new one) as one commit of :func:`hub_operations`; returns the
    commit URL. The token is huggingface_hub's (``token``, ``HF_TOKEN`` or ``hf auth login``). Any
    failure (no network, ``HF_HUB_OFFLINE=1``, no permission) is a one-line :class:`UserError`."""
    operations = hub_operations(out_dir)
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.create_commit(repo_id, operations, repo_type="model",
                                 commit_message=commit_message or f"tldist export ({len(operations)} files)")
    except Exception as e:  # noqa: BLE001 - network, auth and offline-mode errors of huggingface_hub/httpx
        reason = " ".join(str(e).split())[:300]
        raise UserError(f"--push-to-hub {repo_id}: upload failed ({type(e).__name__}: {reason}); the export "
                        f"is complete in '{out_dir}'") from None
    return str(getattr(info, "commit_url", info))


@torch.no_grad()
def predict(model_path: str | os.PathLike, images: list[str], top_k: int = 3,
            weights: Optional[str] = None) -> list[dict[str, Any]]:
    """Classify image files with a model (an export, checkpoint or run directory; ``weights`` raw/ema):
    the top-k ``(class, probability)`` per image, and per task (``tasks``: name -> top-k, each over its
    own head) for a multi-task model. Images get the model's eval preprocessing and the training
    decoder's rules (EXIF orientation, 16-bit...); an unreadable image is a one-line :class:`UserError`."""
    loaded = load_model(model_path, weights=weights, flag="MODEL")
    model, meta = loaded.model, loaded.meta
    pre = meta["preprocess"]
    transform = build_eval_transform(pre["image_size"], pre.get("interpolation", "bilinear"), preprocess_crop_pct(pre))
    normalize = Normalizer(pre["mean"], pre["std"], device=torch.device("cpu"))  # predict runs on the CPU
    results = []
    for path in images:
        try:
            x = transform(decode_image(Path(path).read_bytes(), "pil"))  # training's rule: EXIF, 16-bit...
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read image '{path}': {decode_error(e)}") from None
        logits = model(normalize(x[None]))[0]
        per_task = {}
        for name, lo, hi, classes in output_spans(meta):
            top = logits[lo:hi].softmax(-1).topk(min(top_k, hi - lo))
            per_task[name] = [(classes[i], float(v)) for v, i in zip(top.values.tolist(), top.indices.tolist())]
        result: dict[str, Any] = {"image": path, "top": next(iter(per_task.values()))}
        if meta.get("tasks"):
            result["tasks"] = per_task
        results.append(result)
    return results
