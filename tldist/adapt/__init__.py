"""Beyond fine-tuning: pseudo-labelling, AdaBN and LP-FT on top of the existing training stack.

* :mod:`tldist.adapt.pseudo_label` - a teacher labels unlabelled shards; confident predictions
  become a new shard set to mix into the next fine-tuning round (``data.train=[labelled,pseudo]``).
* :mod:`tldist.adapt.adabn` - re-estimate BatchNorm statistics on target-domain shards (no labels).
* :mod:`tldist.adapt.cli` - ``tldist pseudo-label`` and ``tldist adapt {adabn,lpft}``.

This module holds what they share: loading a model from an export *or* a training checkpoint,
and running a step on the main process only while every rank learns how it went.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from tldist.errors import ConfigError, DataError, UserError
from tldist.export import write_export  # noqa: F401  (re-exported for the subcommands)

T = TypeVar("T")


@dataclasses.dataclass
class LoadedModel:
    """A model rebuilt from ``--model``, with export-style metadata (see :mod:`tldist.export`)."""

    model: Any
    """The ``nn.Module`` in eval mode, on the CPU."""
    meta: dict[str, Any]
    """``model.json`` content: ``model``, ``num_classes``, ``classes``, ``preprocess`` ..."""
    path: str
    """The resolved export or checkpoint directory."""
    kind: str
    """``export`` or ``checkpoint``."""


def load_model(path: str | os.PathLike, flag: str = "--model") -> LoadedModel:
    """Rebuild a model from an export dir (``model.json``), a ``step_*`` checkpoint or a run dir.

    A run directory resolves to its best checkpoint (else the latest). Raises :class:`UserError`
    naming ``flag`` and the path when it is none of these, or when it holds a multi-task model.
    """
    from tldist.export import _checkpoint_dir, load_exported, model_from_checkpoint, refuse_multitask

    p = Path(path)
    if not p.exists():
        raise UserError(f"{flag} '{path}' does not exist: give an export directory ('tldist export'), a "
                        "checkpoint directory (step_*) or a training run's output directory")
    if (p / "model.json").is_file():
        model, meta = load_exported(p)
        refuse_multitask(meta, f"{flag} '{p}'", "adaptation")
        return LoadedModel(model.eval(), meta, str(p.resolve()), "export")
    try:
        ckpt = _checkpoint_dir(p)
    except UserError:
        raise UserError(f"{flag} '{path}' is neither a tldist export (no model.json) nor a checkpoint or run "
                        "directory (no trainer.json / checkpoints/step_*): point it at one of those") from None
    model, meta = model_from_checkpoint(ckpt)
    refuse_multitask(meta, f"{flag} '{ckpt}'", "adaptation")
    return LoadedModel(model, meta, str(ckpt.resolve()), "checkpoint")


def check_out_dir(out: str | os.PathLike, inputs: dict[str, str], flag: str = "--out") -> None:
    """Refuse an output directory that is (or holds) one of the inputs: writing it would destroy them."""
    o = Path(out).resolve()
    for name, value in inputs.items():
        i = Path(value).resolve()
        if o == i or o in i.parents:
            raise ConfigError(f"{flag} '{out}' would overwrite {name} '{value}': choose a new directory")


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def on_main(fn: Callable[[], T], *, is_main: bool) -> T:
    """Run ``fn`` on the main process only; every rank returns its result or raises its error.

    Without this a failure on rank 0 (disk full, bad output dir) would leave the other ranks
    waiting in the next collective; here they receive the error and raise it too (call on every rank).
    """
    result: Optional[T] = None
    error: Optional[tuple[str, str]] = None
    original: Optional[BaseException] = None
    if is_main:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - forwarded to the other ranks, re-raised below
            original = e
            error = (type(e).__name__ if isinstance(e, UserError) else "", str(e))
    if _distributed():
        import torch.distributed as dist

        box: list[Any] = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if original is not None:
        raise original
    if error is not None:
        kind = {"ConfigError": ConfigError, "DataError": DataError}.get(error[0], UserError)
        if error[0]:
            raise kind(error[1])
        raise RuntimeError(f"the main process failed: {error[1]}")
    return result  # type: ignore[return-value]


def init_distributed(mixed_precision: str = "no"):
    """The Accelerator of an adapt job (process group under ``accelerate launch``; call on every rank)."""
    from tldist.config import TrainConfig
    from tldist.train.distributed import build_accelerator
    from tldist.train.main import setup_logging

    accelerator = build_accelerator(TrainConfig(mixed_precision=mixed_precision))
    setup_logging(accelerator.is_main_process)
    return accelerator
