"""The on-disk layout of a training run, a checkpoint and an export: every file name tldist writes.

A run directory (``output_dir``)::

    config.yaml        the resolved job config (written at start)
    run.lock           held by the running job (:mod:`tldist.artifacts.lock`)
    tracker.json       the W&B run id (a requeued job continues the same run)
    result.json        the final metrics (written at the end)
    checkpoints/       step_00000120/ ... and best.json (:mod:`tldist.artifacts.checkpoint`)
    trace/ profile/    sample-key traces and profiler traces, when asked for

A checkpoint directory (``checkpoints/step_*``) and an export directory share the model record
``model.json`` (:mod:`tldist.artifacts.export`), which says how to rebuild the model; the
checkpoint also holds the training state, ``trainer.json`` and ``config.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG = "config.yaml"
"""The resolved job config, in a run directory and in every checkpoint."""
RESULT = "result.json"
"""A finished run's final metrics."""
TRACKER = "tracker.json"
"""``{"run_id": ...}``: the W&B run a resumed or requeued job continues."""
LOCK = "run.lock"
"""The run lock inside ``output_dir``."""
CHECKPOINTS = "checkpoints"
"""The folder of a run's ``step_*`` checkpoints."""
BEST = "best.json"
"""``{"dir", "step", "metric"}`` of the best checkpoint, inside ``checkpoints/``."""
TRAINER = "trainer.json"
"""A checkpoint's loop state: step, best metric, tracker id, world size (human-readable)."""
MARKER = "complete.json"
"""Written last into a checkpoint: every other member's name and size."""
MODEL_RECORD = "model.json"
"""How to rebuild the model: architecture, constructor arguments, classes, preprocessing, which weights."""
WEIGHTS = "model.safetensors"
"""The model's weights as a plain state dict (an export; a checkpoint with ``checkpoint.full_weights``)."""
EMA_WEIGHTS = "ema.safetensors"
"""The EMA of the weights as a plain state dict (older checkpoints)."""
RUN_LOG = "train.log"
"""A run's own log when it runs as a forked cell of ``tldist study --jobs N`` (its output and tracebacks)."""
TRACE_DIR = "trace"
PROFILE_DIR = "profile"


@dataclass(frozen=True)
class RunDir:
    """The files of one run directory (``output_dir``); nothing is created by looking."""

    path: Path

    @classmethod
    def of(cls, path: str | Path) -> "RunDir":
        return cls(Path(path))

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def result(self) -> Path:
        return self.path / RESULT

    @property
    def tracker(self) -> Path:
        return self.path / TRACKER

    @property
    def lock(self) -> Path:
        return self.path / LOCK

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def trace(self) -> Path:
        return self.path / TRACE_DIR

    @property
    def profile(self) -> Path:
        return self.path / PROFILE_DIR

    def finished(self) -> bool:
        """Whether the run wrote its final ``result.json``."""
        return self.result.is_file()
