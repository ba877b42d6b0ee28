"""Experiment tracking behind a small interface; W&B on the main process, nothing elsewhere.

The W&B run id is kept in ``<output_dir>/tracker.json`` as soon as the run starts and in every
checkpoint, so a resumed or requeued job logs into the same run (``resume="allow"``).
Offline runs land in ``<output_dir>/wandb/offline-run-*``; upload them later with
``wandb sync <dir>`` (segments of a requeued offline run: ``wandb sync --append``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from tldist.config import TrackerConfig


class Tracker:
    """No-op tracker: used on non-main ranks and with ``tracker.backend=none``."""

    run_id: Optional[str] = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Log scalars (and media) at optimizer step ``step``."""

    def summary(self, values: dict[str, Any]) -> None:
        """Set run summary values (final metrics)."""

    def mark_preempting(self) -> None:
        """Tell the backend the job is being preempted and will resume."""

    def finish(self) -> None:
        """Flush and close; call in a ``finally``."""

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}


class WandbTracker(Tracker):
    def __init__(self, cfg: TrackerConfig, *, run_name: str, output_dir: Path, config: dict[str, Any],
                 run_id: Optional[str]):
        try:
            import wandb
        except ImportError:  # pragma: no cover - wandb is a core dependency
            raise ImportError("tracker.backend=wandb needs wandb: pip install wandb") from None
        self._wandb = wandb
        id_file = output_dir / "tracker.json"
        if run_id is None and id_file.is_file():
            run_id = json.loads(id_file.read_text()).get("run_id")
        self.run_id = run_id or wandb.util.generate_id()
        output_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(json.dumps({"run_id": self.run_id}))
        mode = os.environ.get("WANDB_MODE", cfg.mode)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group, tags=list(cfg.tags) or None,
                              name=run_name, id=self.run_id, resume="allow", mode=mode, dir=str(output_dir),
                              config=config, settings=wandb.Settings(quiet=True, console="off"))
        self._last_step = -1

    def log(self, metrics: dict[str, Any], step: int) -> None:
        # W&B drops re-logged steps (wandb#4482); after a resume we never go backwards anyway.
        self.run.log(metrics, step=max(step, self._last_step))
        self._last_step = max(step, self._last_step)

    def summary(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            self.run.summary[k] = v

    def mark_preempting(self) -> None:
        self.run.mark_preempting()

    def finish(self) -> None:
        self.run.finish()


def build_tracker(cfg: TrackerConfig, *, is_main: bool, run_name: str, output_dir: str | Path,
                  config: dict[str, Any], run_id: Optional[str] = None) -> Tracker:
    """The main process gets the configured backend; every other rank a no-op tracker."""
    if not is_main or cfg.backend == "none" or os.environ.get("WANDB_MODE", cfg.mode) == "disabled":
        return Tracker()
    return WandbTracker(cfg, run_name=run_name, output_dir=Path(output_dir), config=config, run_id=run_id)
