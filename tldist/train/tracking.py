"""Experiment tracking behind a small interface; W&B on the main process, nothing elsewhere.

The W&B run id is kept in ``<output_dir>/tracker.json`` as soon as the run starts and in every
checkpoint, so a resumed or requeued job logs into the same run (``resume="allow"``).
Offline runs land in ``<output_dir>/wandb/offline-run-*``; upload them later with
``wandb sync <dir>`` (segments of a requeued offline run: ``wandb sync --append``).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Optional

from tldist.config import TrackerConfig

MAX_CONFUSION_CLASSES = 100
"""Confusion-matrix plots are skipped above this many classes (the per-class accuracies are still logged)."""


class Tracker:
    """No-op tracker: used on non-main ranks and with ``tracker.backend=none``."""

    run_id: Optional[str] = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Log scalars (and media) at optimizer step ``step``."""

    def summary(self, values: dict[str, Any]) -> None:
        """Set run summary values (final metrics)."""

    def log_eval_details(self, prefix: str, per_class_acc: list[float], confusion: list[list[int]],
                         class_names: list[str], samples: list[dict], step: int) -> None:
        """Per-class accuracy, the confusion matrix and a few sample predictions (images) of one eval."""

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
        self.run_id = run_id or uuid.uuid4().hex[:12]
        output_dir.mkdir(parents=True, exist_ok=True)
        tmp = id_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"run_id": self.run_id}))
        os.replace(tmp, id_file)
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

    def log_eval_details(self, prefix: str, per_class_acc: list[float], confusion: list[list[int]],
                         class_names: list[str], samples: list[dict], step: int) -> None:
        wandb = self._wandb
        names = class_names or [str(i) for i in range(len(per_class_acc))]
        data: dict[str, Any] = {f"{prefix}/per_class_acc/{n}": a for n, a in zip(names, per_class_acc)}
        if len(names) <= MAX_CONFUSION_CLASSES:
            # wandb's confusion-matrix plot takes per-sample lists; expand the exact integer counts.
            y_true = [t for t, row in enumerate(confusion) for p, c in enumerate(row) for _ in range(c)]
            preds = [p for t, row in enumerate(confusion) for p, c in enumerate(row) for _ in range(c)]
            data[f"{prefix}/confusion_matrix"] = wandb.plot.confusion_matrix(
                y_true=y_true, preds=preds, class_names=names, title=f"{prefix} confusion matrix")
        if samples:
            table = wandb.Table(columns=["image", "key", "label", "prediction", "confidence"])
            for s in samples:
                table.add_data(wandb.Image(s["image"]), s["key"], s["label"], s["pred"], s["confidence"])
            data[f"{prefix}/predictions"] = table
        self.log(data, step=step)

    def mark_preempting(self) -> None:
        self.run.mark_preempting()

    def finish(self) -> None:
        self.run.finish()


def run_metadata() -> dict[str, Any]:
    """Where and what ran: git commit, host, and the SLURM job/array/node list when under SLURM."""
    import socket
    import subprocess

    meta: dict[str, Any] = {"host": socket.gethostname()}
    try:
        root = Path(__file__).resolve().parents[2]
        meta["git_commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                            text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        meta["git_commit"] = None
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NODELIST",
                "SLURM_NNODES", "SLURM_RESTART_COUNT"):
        if var in os.environ:
            meta[var.lower()] = os.environ[var]
    return meta


def build_tracker(cfg: TrackerConfig, *, is_main: bool, run_name: str, output_dir: str | Path,
                  config: dict[str, Any], run_id: Optional[str] = None) -> Tracker:
    """The main process gets the configured backend; every other rank a no-op tracker."""
    if not is_main or cfg.backend == "none" or os.environ.get("WANDB_MODE", cfg.mode) == "disabled":
        return Tracker()
    if cfg.group is None and "SLURM_ARRAY_JOB_ID" in os.environ:  # one W&B group per job array
        import dataclasses

        cfg = dataclasses.replace(cfg, group=f"array-{os.environ['SLURM_ARRAY_JOB_ID']}")
    return WandbTracker(cfg, run_name=run_name, output_dir=Path(output_dir), config=config, run_id=run_id)
