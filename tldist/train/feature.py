"""The one small interface through which optional training behaviour plugs into the loop.

A :class:`TrainFeature` is built from the config at build time (Mixup/CutMix, the EMA of the
weights, knowledge distillation) and handed to the :class:`~tldist.train.loop.Trainer` in a list;
the loop calls every feature's hooks at fixed points of each step and has no branch of its own for
any of them (Composer's ``Callback``, light). A feature with a ``name`` is also a checkpoint state:
the :class:`~tldist.artifacts.checkpoint.CheckpointManager` saves and restores it under that name.

Hooks, in loop order (every rank calls them at the same points):

1. :meth:`TrainFeature.batch` ``(images, labels, step=, micro=) -> (images, labels)``: on the device
   batch before the forward (Mixup/CutMix turn labels into soft targets);
2. :meth:`TrainFeature.loss` ``(loss, logits, images) -> loss``: inside the forward's autocast, per
   micro-batch (distillation adds the teacher's soft-target term);
3. :meth:`TrainFeature.after_step` ``(step)``: after each optimizer step (the EMA update);
4. :meth:`TrainFeature.log_metrics` ``() -> dict``: at log steps; may run a collective;
5. :meth:`TrainFeature.evaluate` ``(trainer) -> dict``: after the model's own evaluation (the EMA's);
6. ``state_dict()`` / ``load_state_dict(state)``: saved with every checkpoint when ``name`` is set;
7. :meth:`TrainFeature.record` ``() -> dict``: entries of the model record (``model.json``) of every
   checkpoint, the model's lineage (what it was distilled from...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class TrainFeature:
    """Base class of optional training behaviour: every hook is a no-op here (see the module docstring)."""

    name: str = ""
    """Checkpoint state name (``ema``, ``distill``...); empty: nothing to save."""

    def batch(self, images: torch.Tensor, labels: torch.Tensor, *, step: int,
              micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The device batch ``[B, 3, H, W]`` and its labels, changed before the forward of optimizer step
        ``step`` (0-based), micro-batch ``micro``."""
        return images, labels

    def loss(self, loss: torch.Tensor, logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """The micro-batch loss (scalar) given the student's ``logits`` ``[B, C]`` and ``images``."""
        return loss

    def after_step(self, step: int) -> None:
        """Called after optimizer step ``step`` (1-based) on every rank."""

    def log_metrics(self) -> dict[str, float]:
        """Scalars to log at a log step (call on every rank: may reduce across ranks)."""
        return {}

    def evaluate(self, trainer: Any) -> dict[str, Any]:
        """Metrics evaluated after ``trainer.evaluate()`` (call on every rank)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (from a checkpoint)."""

    def missing_from_checkpoint(self, path: Path) -> None:
        """Called at resume when checkpoint ``path`` holds no state of this feature (it was off then)."""

    def record(self) -> dict[str, Any]:
        """Entries this feature adds to the model record of every checkpoint (JSON values)."""
        return {}
