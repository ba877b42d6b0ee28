"""Experiment tracking behind a small interface; W&B on the main process, nothing elsewhere.

The W&B run id is kept in ``<output_dir>/tracker.json`` as soon as the run starts and in every
checkpoint, so a resumed or requeued job logs into the same run (``resume="allow"``).
Offline runs land in ``<output_dir>/wandb/offline-run-*``, one segment per attempt.

A resumed job repeats the steps between its checkpoint and the kill. So that the uploaded run
holds one row per step, :class:`WandbTracker` reads the transaction logs (``run-<id>.wandb``) of
the run's earlier segments when it starts and does not log again a step they already hold
(:func:`last_logged_step`; the resumed job is exact, so the skipped values are the same), and
logs again, from its row journal, the steps up to the checkpoint that a killed attempt had logged
but wandb had not yet written. The segments cover disjoint step ranges; uploaded oldest first
(``WANDB_RESUME=allow wandb sync <output_dir>/wandb/offline-run-*``; README, "Tracking") they
give one value per step.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import uuid
import zlib
from pathlib import Path
from typing import Any, Iterator, Optional

from tldist.artifacts import layout
from tldist.artifacts.checkpoint import is_complete
from tldist.config import DataConfig, TrackerConfig
from tldist.data.manifest import eval_sets
from tldist.paths import make_output_dir
from tldist.safeload import read_json
from tldist.train.wandb_artifacts import dataset_artifact, link_of, model_artifact, model_artifact_name, use_artifact

log = logging.getLogger("tldist")

MAX_CLASS_KEYS = 100
"""Up to this many classes, each eval logs one ``per_class_acc/<class>`` key per class and a confusion-matrix
plot, and the class list goes into ``wandb.config``; above it, per-class accuracy is one table (the lowest
:data:`MAX_TABLE_ROWS` classes first) and one histogram per eval, and the config holds only the count."""
MAX_TABLE_ROWS = 10000
"""Rows of a ``wandb.Table`` logged to the history (``wandb.Table.MAX_ROWS``: W&B truncates longer ones)."""
_MAX_GOALS = ("top1", "top5", "balanced_acc")


def config_classes(classes: list[str]) -> Optional[list[str]]:
    """The class list for ``wandb.config``: itself up to :data:`MAX_CLASS_KEYS` classes, else None (21,841
    names make every config upload heavy; the model record and ``derived.num_classes`` keep them)."""
    return list(classes) if len(classes) <= MAX_CLASS_KEYS else None


def summary_goal(key: str) -> Optional[str]:
    """The W&B summary of a metric (``wandb.define_metric(summary=...)``): ``max`` for eval accuracies
    (``eval/top1``, ``eval_ema/<set>/top5``, ``.../balanced_acc``), ``min`` for eval losses, else None (last)."""
    if not key.startswith("eval"):
        return None
    leaf = key.rsplit("/", 1)[-1]
    return "max" if leaf in _MAX_GOALS else "min" if leaf == "loss" else None


def eval_details_row(wandb: Any, prefix: str, result: dict[str, Any], class_names: list[str],
                     samples: list[dict] = ()) -> dict[str, Any]:
    """The W&B row of one eval's details (:meth:`tldist.evaluate.EvalAccumulator.compute` ``result``):
    per-class accuracy as one key per class (up to :data:`MAX_CLASS_KEYS` classes; a class without val samples,
    NaN, is omitted, never logged as 0) or as ``<prefix>/per_class_acc`` (a table: class, accuracy, samples;
    lowest accuracy first) and ``<prefix>/per_class_acc_hist`` (a histogram); the confusion-matrix plot (up
    to :data:`MAX_CLASS_KEYS` classes, when ``result["confusion"]`` was built); ``<prefix>/top_confused``
    (table: true, predicted, count); ``<prefix>/predictions`` (sample images with their predictions)."""
    per_class = result["per_class_acc"]
    names = class_names or [str(i) for i in range(len(per_class))]
    counts = result.get("per_class_count") or [None] * len(per_class)
    data: dict[str, Any] = {}
    if len(names) <= MAX_CLASS_KEYS:
        data.update({f"{prefix}/per_class_acc/{n}": a for n, a in zip(names, per_class) if a == a})
    else:
        measured = sorted(((a, n, c) for n, a, c in zip(names, per_class, counts) if a == a), key=lambda r: r[0])
        if measured:
            data[f"{prefix}/per_class_acc_hist"] = wandb.Histogram([a for a, _, _ in measured], num_bins=50)
        data[f"{prefix}/per_class_acc"] = wandb.Table(columns=["class", "accuracy", "samples"],
                                                      data=[[n, a, c] for a, n, c in measured[:MAX_TABLE_ROWS]])
    confusion = result.get("confusion")
    if confusion is not None and len(names) <= MAX_CLASS_KEYS:
        # wandb's confusion-matrix plot takes per-sample lists; expand the exact integer counts.
        y_true = [t for t, row in enumerate(confusion) for p, c in enumerate(row) for _ in range(c)]
        preds = [p for t, row in enumerate(confusion) for p, c in enumerate(row) for _ in range(c)]
        data[f"{prefix}/confusion_matrix"] = wandb.plot.confusion_matrix(
            y_true=y_true, preds=preds, class_names=names, title=f"{prefix} confusion matrix")
    if result.get("top_confused"):
        pairs = [[names[t], names[p], n] for t, p, n in result["top_confused"]]
        data[f"{prefix}/top_confused"] = wandb.Table(columns=["true", "predicted", "count"], data=pairs)
    if samples:
        table = wandb.Table(columns=["image", "key", "label", "prediction", "confidence"])
        for s in samples:
            table.add_data(wandb.Image(s["image"]), s["key"], s["label"], s["pred"], s["confidence"])
        data[f"{prefix}/predictions"] = table
    return data


class Tracker:
    """No-op tracker: used on non-main ranks and with ``tracker.backend=none``."""

    run_id: Optional[str] = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Log scalars (and media) at optimizer step ``step``."""

    def summary(self, values: dict[str, Any]) -> None:
        """Set run summary values (final metrics)."""

    def log_eval_details(self, prefix: str, result: dict[str, Any], class_names: list[str], samples: list[dict],
                         step: int) -> None:
        """Per-class accuracy, the confusion matrix or most confused pairs and a few sample predictions (images)
        of one eval (``result``: :meth:`tldist.evaluate.EvalAccumulator.compute`); see :func:`eval_details_row`."""

    def link(self) -> Optional[dict[str, Any]]:
        """The run's link for the model record and ``tracker.json`` (:mod:`tldist.train.wandb_artifacts`)."""
        return None

    def log_datasets(self, data: DataConfig) -> None:
        """Log the manifests of ``data.train`` and the eval sets as ``dataset`` artifacts (references)."""

    def checkpoint_saved(self, path: Path, *, step: int, best: bool) -> None:
        """A checkpoint was written (or, asynchronously, started) at ``path`` (call after every save)."""

    def training_done(self, *, best: Optional[Path], latest: Optional[Path]) -> None:
        """Training ended (not stopped for a requeue) with these complete checkpoints."""

    def mark_preempting(self) -> None:
        """Tell the backend the job is being preempted and will resume."""

    def finish(self) -> None:
        """Flush and close; call in a ``finally``."""

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}


class WandbTracker(Tracker):
    """W&B on the main process; one run per job, continued (same id) by every resumed attempt.

    When a resumed attempt starts, :attr:`logged_through` is the last step that the run's earlier
    segments hold (:func:`last_logged_step` over their transaction logs; online also the server's
    last step) and nothing up to it is logged again. The steps between that and the checkpoint it
    resumes from (``resumed_step``), which the killed attempt had logged but wandb had not yet
    written (offline, wandb writes its log in 32 KiB blocks), are logged again from the row journal
    ``<output_dir>/tracker-rows-<run id>.jsonl``: every row's scalars, written before W&B gets the
    row (images, tables and plots of those steps are not kept). So the segments hold disjoint step
    ranges that together cover every step once.

    The run has ``job_type="train"`` and a group (``tracker.group``, else its own id: the jobs that use its
    model join it, :mod:`tldist.train.job_runs`). Eval accuracies and losses get a ``max``/``min`` summary
    (:func:`summary_goal`; ``best_top1`` and ``best_step`` say which step gave the best). With
    ``tracker.log_model`` checkpoints become ``model`` artifacts (:meth:`checkpoint_saved`, :meth:`training_done`).
    """

    def __init__(self, cfg: TrackerConfig, *, run_name: str, output_dir: Path, config: dict[str, Any],
                 run_id: Optional[str], resumed_step: int = 0, new_run: bool = False):
        try:
            import wandb
        except ImportError:  # pragma: no cover - wandb is a core dependency
            raise ImportError("tracker.backend=wandb needs wandb: pip install wandb") from None
        self._wandb = wandb
        id_file = output_dir / layout.TRACKER
        if run_id is None and not new_run and id_file.is_file():  # killed before its first checkpoint
            recorded = read_json(id_file, what="W&B run record")
            run_id = recorded.get("run_id") if isinstance(recorded, dict) else None
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self._link = link_of(self.run_id, cfg.project, cfg.entity, cfg.group or self.run_id)
        make_output_dir(output_dir, "output_dir")
        tmp = id_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self._link))
        os.replace(tmp, id_file)
        mode = os.environ.get("WANDB_MODE", cfg.mode)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, group=self._link["group"], job_type="train",
                              tags=list(cfg.tags) or None, name=run_name, id=self.run_id, resume="allow", mode=mode,
                              dir=str(output_dir), config=config, settings=wandb.Settings(quiet=True, console="off"))
        self._last_step = -1
        self._goals: dict[str, Optional[str]] = {}  # metric -> its define_metric summary (None: W&B's default, last)
        self.log_model = cfg.log_model
        self._unlogged: list[tuple[Path, int, bool]] = []  # log_model=all: checkpoints not yet complete (async)
        # What the run already holds where it will be uploaded from: offline, the transaction logs
        # of its earlier segments (online ones too: their rows went to the server); online, the
        # server (its next step is `starting_step`) and earlier offline segments.
        own_dir = Path(self.run.settings.sync_dir)
        self.logged_through = max(
            last_logged_step(own_dir.parent, self.run_id, exclude=own_dir, include_online=bool(self.run.offline)),
            int(getattr(self.run, "starting_step", 0) or 0) - 1)
        """Steps up to this one are not logged again (-1: none); see :meth:`log`."""
        # The journal keeps exactly the rows after `logged_through`: those up to `resumed_step` are
        # logged again now, later ones are computed again by this attempt.
        self._journal_path = output_dir / f"tracker-rows-{self.run_id}.jsonl"
        lost = [(s, row) for s, row in read_row_journal(self._journal_path) if self.logged_through < s <= resumed_step]
        tmp = self._journal_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps({"step": s, "row": row}) + "\n" for s, row in lost))
        os.replace(tmp, self._journal_path)
        self._journal = open(self._journal_path, "a")
        for s, row in lost:
            self._define(row)
            self.run.log(row, step=s)
            self._last_step = s
        if self.logged_through >= 0 or lost:
            log.info("W&B run %s: earlier segments hold steps up to %d; %d lost rows (steps %s) logged again "
                     "from the row journal", self.run_id, self.logged_through, len({s for s, _ in lost}),
                     f"{lost[0][0]}-{lost[-1][0]}" if lost else "none")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Log at optimizer step ``step``; every call at one step goes into one row.

        A step at or below :attr:`logged_through` is dropped: a resumed job repeats the steps after
        its checkpoint, and the run's earlier segments already hold them with the same values (the
        resume is exact), so the uploaded run keeps one row per step. A step below the previous one
        is dropped as well (W&B would drop it with a warning, wandb#4482). The row's scalars go to
        the row journal first (flushed to the OS, so they survive a SIGKILL).
        """
        if step <= self.logged_through or step < self._last_step:
            return
        self._define(metrics)
        scalars = {k: v for k, v in ((k, _scalar(v)) for k, v in metrics.items()) if v is not None}
        if scalars:
            self._journal.write(json.dumps({"step": step, "row": scalars}) + "\n")
            self._journal.flush()
        self.run.log(metrics, step=step)
        self._last_step = step

    def _define(self, keys: Any) -> None:
        """``wandb.define_metric`` each new key with its :func:`summary_goal`, before the first row holding it."""
        for key in keys:
            if key not in self._goals:
                self._goals[key] = summary_goal(key)
                if self._goals[key]:
                    self.run.define_metric(key, summary=self._goals[key])

    def summary(self, values: dict[str, Any]) -> None:
        """Set summary values; a metric whose summary W&B aggregates (:func:`summary_goal`: the best
        ``eval/top1``...) keeps that aggregate rather than being overwritten by the final value."""
        for k, v in values.items():
            if not self._goals.get(k):
                self.run.summary[k] = v

    def log_eval_details(self, prefix: str, result: dict[str, Any], class_names: list[str], samples: list[dict],
                         step: int) -> None:
        if step <= self.logged_through:
            return  # the earlier segment holds this eval (see log); skip building its tables and images
        self.log(eval_details_row(self._wandb, prefix, result, class_names, samples), step=step)

    def link(self) -> Optional[dict[str, Any]]:
        return dict(self._link)

    def log_datasets(self, data: DataConfig) -> None:
        """Each shard manifest the run reads (``data.train``, ``data.val``, ``data.val_sets``) as a ``dataset``
        artifact referencing its ``manifest.json`` (:func:`~tldist.train.wandb_artifacts.dataset_artifact`);
        a resumed attempt logs them again, which W&B keeps as the same versions (same digests)."""
        sets = [("train", loc) for loc in data.train] + [("val" if n == "val" else f"val:{n}", loc)
                                                          for n, loc in eval_sets(data)]
        for role, location in sets:
            use_artifact(self.run, dataset_artifact(self._wandb, location, role=role))

    def checkpoint_saved(self, path: Path, *, step: int, best: bool) -> None:
        """With ``log_model=all``, log every checkpoint once it is complete on disk: at once after a synchronous
        save, at the next save (or the end) after an asynchronous one."""
        if self.log_model != "all":
            return
        self._unlogged.append((Path(path), step, best))
        self._log_complete()

    def _log_complete(self) -> None:
        waiting = []
        for path, step, best in self._unlogged:
            if is_complete(path):
                self._log_checkpoint(path, step, ["latest", *(["best"] if best else [])])
            elif path.exists() or path.with_name(f".tmp-{path.name}").exists():
                waiting.append((path, step, best))
        self._unlogged = waiting

    def training_done(self, *, best: Optional[Path], latest: Optional[Path]) -> None:
        """``log_model=true``: log the best and the last checkpoint (one artifact version when they are the
        same); ``all``: log the ones still waiting for their write (aliases ``latest``/``best`` move to them)."""
        if self.log_model == "all":
            self._log_complete()
        if self.log_model != "true":
            return
        same = best is not None and latest is not None and best.resolve() == latest.resolve()
        if best is not None and not same:  # first: W&B moves `latest` to the version logged last
            self._log_checkpoint(best, _step_of(best), ["best"])
        if latest is not None:
            self._log_checkpoint(latest, _step_of(latest), ["latest", *(["best"] if same else [])])

    def _log_checkpoint(self, path: Path, step: int, aliases: list[str]) -> None:
        artifact = model_artifact(self._wandb, path, model_artifact_name(self._link, path, "model"),
                                  metadata={"step": step, "path": str(Path(path).resolve())})
        self.run.log_artifact(artifact, aliases=[*aliases, f"step-{step}"])

    def mark_preempting(self) -> None:
        self.run.mark_preempting()

    def finish(self) -> None:
        self._journal.close()
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
                  config: dict[str, Any], run_id: Optional[str] = None, resumed_step: int = 0,
                  new_run: bool = False) -> Tracker:
    """The main process gets the configured backend; every other rank a no-op tracker.

    ``resumed_step`` is the optimizer step of the checkpoint the job resumed from (0 for a fresh
    start): a resumed W&B run logs again the rows up to it that its killed attempt lost
    (:class:`WandbTracker`). Without ``run_id`` the id recorded in ``tracker.json`` is continued
    (a job killed before its first checkpoint), unless ``new_run`` (``checkpoint.resume=none``: a
    deliberate fresh start gets a new W&B run).
    """
    if not is_main or cfg.backend == "none" or os.environ.get("WANDB_MODE", cfg.mode) == "disabled":
        return Tracker()
    if cfg.group is None and "SLURM_ARRAY_JOB_ID" in os.environ:  # one W&B group per job array (else: the run id)
        import dataclasses

        cfg = dataclasses.replace(cfg, group=f"array-{os.environ['SLURM_ARRAY_JOB_ID']}")
    return WandbTracker(cfg, run_name=run_name, output_dir=Path(output_dir), config=config, run_id=run_id,
                        resumed_step=resumed_step, new_run=new_run)


# ---- what earlier segments of a run already hold ----------------------------------------------
_LOG_HEADER = b":W&B\xe1\xbe\x00"  # identifier, magic 0xBEE1 (little-endian), store version 0
_BLOCK = 32768
_CHUNK_HEADER = 7  # crc32 (4) + length (2) + chunk type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def transaction_log_records(path: str | Path) -> Iterator[bytes]:
    """The serialized ``wandb_internal.Record`` messages of a W&B transaction log (``run-<id>.wandb``),
    in order, up to the first incomplete or corrupt one.

    These are the records ``wandb sync`` uploads: the file is a LevelDB-style log (32 KiB blocks,
    chunks with a 7-byte header: CRC-32 of type and payload, length, type FULL/FIRST/MIDDLE/LAST),
    and wandb-core's reader stops a sync at a record cut off at the end of the file (what a killed
    job leaves: offline, wandb writes a block when it is full), a checksum mismatch or a malformed
    chunk. A file that does not start with the W&B header yields nothing.
    """
    with open(path, "rb") as f:
        block = f.read(_BLOCK)
        if not block.startswith(_LOG_HEADER):
            return
        pos, parts = len(_LOG_HEADER), None  # parts: chunks of the record being assembled
        while True:
            if pos + _CHUNK_HEADER > len(block):  # end of block (padding) or of the file
                if len(block) < _BLOCK:
                    return
                block, pos = f.read(_BLOCK), 0
                if not block:
                    return
                continue
            crc, length, kind = struct.unpack_from("<IHB", block, pos)
            if crc == 0 and length == 0 and kind == 0 and parts is None:
                pos = len(block)  # a zeroed rest of block: wandb skips to the next block
                continue
            end = pos + _CHUNK_HEADER + length
            if end > len(block) or zlib.crc32(block[pos + 6:end]) != crc:
                return  # cut off or corrupt: wandb sync stops here
            payload, pos = block[pos + _CHUNK_HEADER:end], end
            if parts is None:
                if kind == _FULL:
                    yield payload
                elif kind == _FIRST:
                    parts = [payload]
                # a MIDDLE/LAST chunk without its FIRST is skipped, as wandb's reader does
            else:
                parts.append(payload)
                if kind in (_FULL, _LAST):
                    yield b"".join(parts)
                    parts = None


def history_steps(path: str | Path) -> Iterator[int]:
    """The ``_step`` of every history row in a W&B transaction log that ``wandb sync`` would upload
    (:func:`transaction_log_records`), in file order."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    for raw in transaction_log_records(path):
        record = pb.Record()
        try:
            record.ParseFromString(raw)
        except DecodeError:
            return  # wandb sync stops at a record it cannot parse
        if record.WhichOneof("record_type") != "history":
            continue
        step = None
        for item in record.history.item:
            if item.key == "_step" and not item.nested_key:
                if item.value_json:
                    step = int(json.loads(item.value_json))
                elif item.WhichOneof("value") in ("integer", "number"):
                    step = int(getattr(item, item.WhichOneof("value")))
        if step is None and record.history.HasField("step"):
            step = record.history.step.num
        if step is not None:
            yield step


def last_logged_step(wandb_dir: str | Path, run_id: str, *, exclude: Optional[str | Path] = None,
                     include_online: bool = True) -> int:
    """The highest step that the segments of run ``run_id`` under ``wandb_dir`` (its
    ``offline-run-*-<id>`` directories and, with ``include_online``, its ``run-*-<id>`` ones; not the
    run directory ``exclude``) hold in their transaction logs; -1 when they hold none.

    Read from wandb's own files, so it counts exactly the rows a sync uploads: a row that a
    killed job had logged but wandb had not yet written is not counted, so the resumed job logs
    it (computed again, or from the row journal when it is at or before its checkpoint).
    """
    skip = Path(exclude).resolve() if exclude is not None else None
    last = -1
    for path in sorted(Path(wandb_dir).glob(f"*/run-{run_id}.wandb")):
        if (skip is not None and path.parent.resolve() == skip) or \
                not (include_online or path.parent.name.startswith("offline-")):
            continue
        for step in history_steps(path):
            last = max(last, step)
    return last


def read_row_journal(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """``(step, scalars)`` of every complete line of a row journal (:class:`WandbTracker`), in
    order; [] when there is none. A line cut off by a kill is ignored (W&B never got that row)."""
    rows = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return rows
    for line in lines:
        try:
            entry = json.loads(line)
            rows.append((int(entry["step"]), dict(entry["row"])))
        except (ValueError, KeyError, TypeError):
            continue
    return rows


def _step_of(checkpoint: Path) -> int:
    """The optimizer step of a ``step_00000120`` directory."""
    return int(Path(checkpoint).name.rsplit("_", 1)[-1])


def _scalar(value: Any) -> Any:
    """``value`` as a JSON scalar (bool, int, float, str; numpy and 0-d torch scalars converted),
    or None for media, tables and plots."""
    import numbers

    if isinstance(value, (bool, str)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 and not isinstance(value, numbers.Number):
        value = value.item()
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return None
