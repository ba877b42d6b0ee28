"""W&B runs of the jobs that use a trained model: ``tldist eval``, ``export``, ``compress``, ``adapt``,
``pseudo-label`` (and ``study``'s summary run, :mod:`tldist.study.report`).

Each such command opens a run with ``job_type`` ``eval``/``export``/``compress``/``adapt``/``pseudo-label``
in the group of the training run that made its model, found from the model's record or its run
directory's ``tracker.json`` (:func:`tldist.train.wandb_artifacts.training_link`), in the same project. The
model it used is linked: online, ``run.use_artifact("model-<run id>:step-<N>")`` when the training run
logged that checkpoint (``tracker.log_model``); otherwise (offline, or not logged) a reference artifact of
the model's directory with the same name (the same URI gives the same digest, so W&B keeps one version),
and the run's config records the path, the weights and the step (``config.model``). Outputs are logged as
artifacts too: a model directory as type ``model`` in collection ``export-<run id>``, ``compress-<run id>``
or ``adapt-<run id>`` (:func:`~tldist.train.wandb_artifacts.model_collection`), a shard set as ``dataset``.

A run is opened on the main process only (``RANK`` 0), when W&B is on (``WANDB_MODE`` / ``tracker.mode``
not ``disabled``, ``tracker.backend=wandb`` for commands with a config) and there is a training run to join
or a config asking for tracking (``tldist eval``). Its files go to ``<training run dir>/jobs/wandb/`` when the
run directory is known (``wandb sync <run>/jobs/wandb/offline-run-*`` uploads them), else to W&B's default.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Optional

from tldist.artifacts import layout
from tldist.artifacts.resolve import Artifact, resolve
from tldist.config import TrackerConfig
from tldist.errors import UserError
from tldist.safeload import read_json
from tldist.train.tracking import eval_details_row
from tldist.train.wandb_artifacts import (LINK_KEY, MODEL, dataset_artifact, model_artifact, model_artifact_name,
                                          model_collection, training_link, training_run_dir, use_artifact)
from tldist.world import World

log = logging.getLogger("tldist")

JOBS_DIR = "jobs"
"""Folder of a training run directory that holds the W&B files of the jobs that used its model."""


class JobRun:
    """A job's W&B run; this base class does nothing (not the main process, W&B off, nothing to join)."""

    run: Any = None

    def log_eval(self, metrics: dict[str, Any]) -> None:
        """Log ``tldist eval``'s metrics (:func:`tldist.evaluate.evaluate_checkpoint`): ``eval/top1``...,
        ``eval/<set>/...`` for further sets, the details of the first set; set them as the summary."""

    def summary(self, values: dict[str, Any]) -> None:
        """Set summary values (a command's report: nested dicts are flattened with ``/``)."""

    def log_output_model(self, path: str | Path, *, metadata: Optional[dict[str, Any]] = None) -> None:
        """Log the export directory ``path`` the job wrote as a ``model`` artifact (reference)."""

    def log_output_dataset(self, location: str) -> None:
        """Log the shard set the job wrote as a ``dataset`` artifact (reference to its manifest)."""


class WandbJobRun(JobRun):
    def __init__(self, run: Any, wandb: Any, link: Optional[dict[str, Any]]):
        self.run, self._wandb, self._link = run, wandb, link

    def log_eval(self, metrics: dict[str, Any]) -> None:
        if not metrics.get("is_main", True):
            return
        row: dict[str, Any] = {}
        for name, m in metrics.get("sets", {}).items():
            prefix = "eval" if name == "val" or len(metrics["sets"]) == 1 else f"eval/{name}"
            row.update({f"{prefix}/{k}": v for k, v in m.items()})
        row.update(eval_details_row(self._wandb, "eval", metrics, metrics.get("classes") or []))
        self.run.log(row)
        self.summary({k: v for k, v in row.items() if isinstance(v, (int, float))})

    def summary(self, values: dict[str, Any]) -> None:
        for k, v in _flat(values).items():
            self.run.summary[k] = v

    def log_output_model(self, path: str | Path, *, metadata: Optional[dict[str, Any]] = None) -> None:
        record = _record(path)
        step = record.get("step")
        meta = {"path": str(Path(path).resolve()), "step": step, "weights": record.get("weights"), **(metadata or {})}
        aliases = ["latest", *([f"step-{step}"] if isinstance(step, int) else [])]
        name = model_artifact_name(self._link or record.get(LINK_KEY), path, model_collection("export", record))
        self.run.log_artifact(model_artifact(self._wandb, path, name, metadata=meta), aliases=aliases)

    def log_output_dataset(self, location: str) -> None:
        self.run.log_artifact(dataset_artifact(self._wandb, str(location), role="output"))


def _record(path: str | Path) -> dict[str, Any]:
    """The model record of an output directory, {} when it has none or it cannot be read."""
    f = Path(path) / layout.MODEL_RECORD
    try:
        record = read_json(f, what="model record") if f.is_file() else {}
    except UserError:
        return {}
    return record if isinstance(record, dict) else {}


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "/"))
        elif isinstance(v, (bool, int, float, str)) or v is None:
            out[key] = v
    return out


def _wandb_mode(tracker: Optional[TrackerConfig]) -> str:
    return os.environ.get("WANDB_MODE", tracker.mode if tracker is not None else "offline")


@contextlib.contextmanager
def job_run(job_type: str, model: Optional[str | os.PathLike], tracker: Optional[TrackerConfig] = None, *,
            config: Optional[dict[str, Any]] = None, weights: Optional[str] = None,
            group: Optional[str] = None) -> Iterator[JobRun]:
    """Open the W&B run of a job that uses the model at ``model`` (see the module docstring) around the job;
    yields a :class:`JobRun` (a no-op one when no run is opened). The run is finished when the block ends, with
    exit code 1 when it raised. ``tracker``: the command's ``tracker`` config section, if it has a config
    (otherwise the training run's project and W&B's mode decide); ``weights``: the ``--weights`` choice;
    ``group``: a group of its own (else the training run's). A model path that does not resolve opens no
    run: the job itself then reports it.
    """
    if not World.from_env().is_main or _wandb_mode(tracker) == "disabled" or \
            (tracker is not None and tracker.backend == "none"):
        yield JobRun()
        return
    art: Optional[Artifact] = None
    if model is not None:
        try:
            art = resolve(model, weights=weights, flag="model")
        except UserError:  # the job reports it in one line; no run for a command that cannot start
            yield JobRun()
            return
    link = training_link(art) if art is not None else None
    if link is None and tracker is None:
        yield JobRun()  # nothing to join, and no config asking for a run
        return
    import wandb  # W&B is imported by the commands that track only (start-up time)

    run_dir = training_run_dir(art) if art is not None else None
    if run_dir is not None:
        (run_dir / JOBS_DIR).mkdir(parents=True, exist_ok=True)
    reference = _model_reference(art, link)
    project = (link or {}).get("project") or (tracker.project if tracker is not None else "tldist")
    entity = (link or {}).get("entity") or (tracker.entity if tracker is not None else None)
    run = wandb.init(project=project, entity=entity, job_type=job_type,
                     group=group or (link or {}).get("group") or (tracker.group if tracker is not None else None),
                     name=f"{job_type}-{Path(str(model)).name}" if model is not None else job_type,
                     mode=_wandb_mode(tracker), dir=str(run_dir / JOBS_DIR) if run_dir is not None else None,
                     config={**(config or {}), **({"model": reference} if reference else {})},
                     tags=list(tracker.tags) or None if tracker is not None else None,
                     settings=wandb.Settings(quiet=True, console="off"))
    try:
        if art is not None:
            _link_model(wandb, run, art, link, reference)
        yield WandbJobRun(run, wandb, link)
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()


def link_model(run: Any, model: str | os.PathLike, weights: Optional[str] = None) -> Optional[dict[str, Any]]:
    """Link the model at ``model`` to an open W&B ``run`` as :func:`job_run` does (for a run opened elsewhere:
    ``tldist study``'s summary run); returns what was recorded of it, None when the path does not resolve."""
    import wandb

    try:
        art = resolve(model, weights=weights, flag="model")
    except UserError:
        return None
    link = training_link(art)
    reference = _model_reference(art, link)
    _link_model(wandb, run, art, link, reference)
    return reference


def _model_reference(art: Optional[Artifact], link: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """What the run's config says of the model it used."""
    if art is None:
        return None
    name = model_artifact_name(link, art.path, model_collection(art.kind, art.record))
    return {"path": str(art.path.resolve()), "kind": art.kind, "weights": art.weights, "step": art.step,
            "train_run": (link or {}).get("run_id"),
            "artifact": f"{name}:step-{art.step}" if art.step is not None else name}


def _link_model(wandb: Any, run: Any, art: Artifact, link: Optional[dict[str, Any]], reference: dict[str, Any]) -> None:
    """Mark the model as the run's input: the logged checkpoint artifact when the server has it, else a reference."""
    if not run.offline and link is not None and art.kind == "checkpoint" and art.step is not None:
        path = f"{link.get('entity') or run.entity}/{link.get('project') or run.project}/{reference['artifact']}"
        try:
            run.use_artifact(path, type=MODEL)
            return
        except Exception as e:  # noqa: BLE001 - wandb raises CommError/ValueError... for a version it lacks
            log.info("W&B: %s is not logged (%s); linking the model by reference", path, type(e).__name__)
    name = model_artifact_name(link, art.path, model_collection(art.kind, art.record))
    use_artifact(run, model_artifact(wandb, art.path, name,
                                     metadata={k: v for k, v in reference.items() if k != "artifact"}))
