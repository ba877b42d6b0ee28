"""The one small interface through which optional training behaviour plugs into the loop.

A :class:`TrainFeature` is built from the config at build time (Mixup/CutMix, the EMA of the
weights, knowledge distillation, the sample trace, the profiler) and handed to the
:class:`~tldist.train.loop.Trainer` in a list; the loop calls every feature's hooks at fixed points of
each step and has no branch of its own for any of them (Composer's ``Callback``, light). A feature with a ``name`` is also a checkpoint state:
the :class:`~tldist.artifacts.checkpoint.CheckpointManager` saves and restores it under that name.

Hooks, in loop order (every rank calls them at the same points):

1. :meth:`TrainFeature.batch` ``(images, labels, step=, micro=) -> (images, labels)``: on the device
   batch before the forward (Mixup/CutMix turn labels into soft targets);
2. :meth:`TrainFeature.loss` ``(loss, logits, images) -> loss``: inside the forward's autocast, per
   micro-batch (distillation adds the teacher's soft-target term);
3. :meth:`TrainFeature.after_step` ``(step, keys)``: after each optimizer step (the EMA update, the
   sample trace, the profiler's schedule);
4. :meth:`TrainFeature.log_metrics` ``() -> dict``: at log steps; may run a collective;
5. :meth:`TrainFeature.evaluate` ``(trainer) -> dict``: after the model's own evaluation (the EMA's);
6. ``state_dict()`` / ``load_state_dict(state)``: saved with every checkpoint when ``name`` is set;
7. :meth:`TrainFeature.record` ``() -> dict``: entries of the model record (``model.json``) of every
   checkpoint, the model's lineage (what it was distilled from...);
8. :meth:`TrainFeature.close` ``()``: once when the step loop ends, also after a failing step (no
   collectives: other ranks may be gone).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tldist.artifacts.layout import PROFILE_DIR, TRACE_DIR


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

    def after_step(self, step: int, keys: list[str]) -> None:
        """Called after optimizer step ``step`` (1-based) on every rank; ``keys``: the sample keys of this
        rank's micro-batches of the step, in order."""

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

    def close(self) -> None:
        """Called once when the step loop ends, on success or after a failing step (no collectives)."""


class SampleTrace(TrainFeature):
    """``train.trace_samples``: each optimizer step's sample keys of this rank, one JSON line per step
    (``{"step": N, "keys": [...]}``) appended to ``<output_dir>/trace/rank<R>.jsonl`` and flushed, so a
    crash leaves every finished step on disk (the elastic and exact-resume tests read them back)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a")

    def after_step(self, step: int, keys: list[str]) -> None:
        self._file.write(json.dumps({"step": step, "keys": keys}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class StepProfiler(TrainFeature):
    """``train.profile``: ``torch.profiler`` over steps 3-5 (schedule wait 1, warm-up 1, active 3), CPU and,
    when present, CUDA activity, written for TensorBoard to ``<output_dir>/profile`` as ``rank<R>``
    traces; started when built, stepped after every optimizer step, stopped at :meth:`close`."""

    def __init__(self, out: Path, rank: int):
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._prof = profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
                             on_trace_ready=tensorboard_trace_handler(str(out), worker_name=f"rank{rank}"))
        self._prof.start()

    def after_step(self, step: int, keys: list[str]) -> None:
        self._prof.step()

    def close(self) -> None:
        self._prof.stop()


def build_observers(cfg: Any, output_dir: Path, rank: int) -> list[TrainFeature]:
    """The features that watch the run without changing it, when on in ``cfg`` (a ``TrainConfig``):
    :class:`SampleTrace` (``train.trace_samples``) and :class:`StepProfiler` (``train.profile``), writing
    under ``output_dir`` as rank ``rank``. Build them last: the profiler starts when built."""
    observers: list[TrainFeature] = []
    if cfg.trace_samples:
        observers.append(SampleTrace(output_dir / TRACE_DIR / f"rank{rank}.jsonl"))
    if cfg.profile:
        observers.append(StepProfiler(output_dir / PROFILE_DIR, rank))
    return observers
