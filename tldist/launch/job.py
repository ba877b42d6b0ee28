"""What runs inside a submitted job: :class:`TrainJob`, pickled by submitit, called on every task.

One call of ``TrainJob()`` is one attempt of a (possibly requeued) training job:

1. export the torch distributed environment from the job's own variables, overwriting whatever
   the submitter's shell leaked into the job (sbatch exports the whole environment): RANK,
   LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR = first host of the job,
   MASTER_PORT = 20000 + job id % 20000 (the same on every task, and on a requeued attempt);
2. rebuild the config and force ``checkpoint.resume=auto`` so that every attempt continues from
   the latest complete checkpoint of ``output_dir``;
3. install :class:`~tldist.launch.signals.StopSignals` (replacing submitit's own SIGUSR2/SIGTERM
   handlers, which would requeue and exit at once without a checkpoint) and call
   :func:`tldist.train.main.run` on every rank;
4. if the loop stopped on a signal: every rank has saved the checkpoint by then. If any rank got
   SIGUSR2 (time limit, preemption notice, ``scancel --signal=USR2``) and the job has been
   restarted fewer than ``max_requeues`` times, rank 0 requeues it (``scontrol requeue``). All
   ranks then exit without writing a submitit result, so the submitter keeps waiting for the
   requeued attempt. After SIGTERM (scancel, preemption, ``scontrol requeue``; also when USR2 came
   with it) nothing is requeued here: SLURM brings the job back itself or not at all.

A rank whose collective fails because a peer vanished (node lost or cut off, peer killed; no SIGTERM
reached this rank) logs it and exits without a submitit result: SLURM requeues or fails the job, and
an orphan's error must not be read as the outcome of the requeued attempt.

``checkpoint()`` is kept for the short window before ``__call__`` installs its handlers
(unpickling, imports): submitit then calls it on rank 0 and requeues the unchanged job.
"""

from __future__ import annotations

import logging
import os
import subprocess
import zlib
from pathlib import Path
from typing import Any, Optional

from tldist.artifacts.checkpoint import latest_checkpoint
from tldist.artifacts.layout import RunDir
from tldist.config import config_from_dict
from tldist.errors import UserError
from tldist.launch.signals import StopSignals
from tldist.train.loop import clear_stop_request, request_stop
from tldist.train.main import run
from tldist.world import gather_objects, is_peer_failure

log = logging.getLogger("tldist.launch")

STOPPED_EXIT_CODE = 3
"""Exit status of a task that stopped on a signal after checkpointing (same as ``tldist train``)."""
_LEAKED_LAUNCHER_VARS = ("GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "TORCHELASTIC_RUN_ID",
                         "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE")


class RequeueLimitError(RuntimeError):
    """The job was stopped again after using up its requeues."""


def master_port(job_id: str | int) -> int:
    """A port in [20000, 40000) derived from the job id: identical on all tasks and attempts."""
    try:
        n = int(str(job_id).split("_")[0])
    except ValueError:
        n = zlib.crc32(str(job_id).encode())
    return 20000 + n % 20000


def export_distributed_env(job_env: Any) -> dict[str, str]:
    """Set the torch ``env://`` variables from a submitit ``JobEnvironment``; returns what was set.

    Always overwrites: a job submitted from inside another distributed job (or from a shell that
    exported MASTER_PORT) must not join the submitter's process group.
    """
    raw_id = os.environ.get("SLURM_JOB_ID") or job_env.raw_job_id  # an array task has its own SLURM_JOB_ID
    values = {
        "MASTER_ADDR": job_env.hostnames[0],
        "MASTER_PORT": str(master_port(raw_id)),
        "RANK": str(job_env.global_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_RANK": str(job_env.local_rank),
        "LOCAL_WORLD_SIZE": str(max(1, job_env.num_tasks // max(1, job_env.num_nodes))),
        "NODE_RANK": str(job_env.node),
    }
    for name in _LEAKED_LAUNCHER_VARS:
        os.environ.pop(name, None)
    os.environ.update(values)
    return values


def restart_count(job_env: Any, folder: Optional[Path] = None) -> int:
    """How many times this job was requeued: ``SLURM_RESTART_COUNT``, else our own counter file
    (submitit's local executor restarts the job without telling it)."""
    if "SLURM_RESTART_COUNT" in os.environ:
        return int(os.environ["SLURM_RESTART_COUNT"])
    f = _counter_file(job_env, folder)
    return int(f.read_text()) if f is not None and f.is_file() else 0


def _counter_file(job_env: Any, folder: Optional[Path]) -> Optional[Path]:
    try:
        folder = folder or job_env.paths.folder
    except KeyError:  # no SUBMITIT_FOLDER (called outside submitit)
        return None
    return Path(folder) / f"{job_env.job_id}_requeues"


def choose_resume(cfg: Any) -> str:
    """``auto`` unless this is the first attempt of a job warm-started from an explicit checkpoint."""
    resume = cfg.checkpoint.resume
    has_own = latest_checkpoint(RunDir.of(cfg.output_dir).checkpoints) is not None
    if resume not in ("auto", "none") and not has_own:
        return resume
    if resume != "auto":
        log.info("checkpoint.resume=%s replaced by 'auto': a requeued attempt must continue from the latest "
                 "checkpoint in %s/checkpoints", resume, cfg.output_dir)
    return "auto"


class TrainJob:
    """A picklable training job for submitit: ``TrainJob(cfg.to_dict(), max_requeues=5)``.

    Calling it (on every task of the job) runs :func:`tldist.train.main.run` and returns its
    result dict, extended with ``job_id``, ``rank`` and ``restarts``.
    """

    def __init__(self, config: dict[str, Any], *, max_requeues: int = 5):
        self.config = config
        self.max_requeues = max_requeues

    def __repr__(self) -> str:
        return f"TrainJob(output_dir={self.config.get('output_dir')!r}, max_requeues={self.max_requeues})"

    # -- submitit protocol ------------------------------------------------------------------------
    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit's own USR2 handler on rank 0, which is active only until ``__call__``
        installs ours. No collective work is possible here: ask the loop to stop and let submitit
        requeue the same job; the periodic checkpoints and ``resume=auto`` do the rest."""
        from submitit.core.utils import DelayedSubmission

        request_stop()
        return DelayedSubmission(self, *args, **kwargs)

    def __call__(self) -> dict[str, Any]:
        import submitit

        job_env = submitit.JobEnvironment()
        logging.getLogger("submitit").propagate = False  # it has its own handler: no doubled lines
        logging.basicConfig(level=logging.INFO if job_env.global_rank == 0 else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
        dist_vars = export_distributed_env(job_env)
        restarts = restart_count(job_env)
        _limit_threads()
        cfg = config_from_dict(self.config)
        cfg.checkpoint.resume = choose_resume(cfg)
        if job_env.global_rank == 0:
            log.info("%r: job %s attempt %d, rank %s/%s, master %s:%s", self, job_env.job_id, restarts + 1,
                     dist_vars["RANK"], dist_vars["WORLD_SIZE"], dist_vars["MASTER_ADDR"], dist_vars["MASTER_PORT"])
        clear_stop_request()
        with StopSignals() as stop:
            try:
                result = run(cfg)
            except UserError as e:
                if job_env.global_rank != 0 and e.same_on_every_rank:
                    # every rank raised it alike (a config mistake, an agreed data fault): rank 0's log and
                    # submitit result carry it; this task ends with the CLI's status for user errors
                    raise SystemExit(2) from None
                raise
            except Exception as e:
                if "SIGTERM" not in stop.received and is_peer_failure(e):
                    # A peer rank vanished (its node failed or was cut off, or it was killed). SLURM requeues
                    # or fails the job; a submitit result from this task would be read as the job's outcome
                    # while the requeued attempt is still running (seen: an orphaned rank on a cut-off node
                    # timed out and its error pickle made the submitter give up). Log it, leave no result.
                    log.error("rank %s lost its peers (%s); exiting without a result: SLURM requeues the job "
                              "(--requeue) or reports it failed", job_env.global_rank, " ".join(str(e).split())[:300])
                    raise SystemExit(1) from None
                if "SIGTERM" not in stop.received:
                    raise
                # SLURM is ending this attempt (scontrol requeue, preemption, scancel): SIGTERM also
                # reaches the DataLoader workers, whose torch handler exits, so the loop may fail before
                # its checkpoint. Leave without a submitit result: a requeued attempt resumes from the
                # latest complete checkpoint, and a cancelled job reports itself as cancelled.
                log.warning("training failed after SIGTERM; exiting without a result (SLURM requeues or "
                            "cancels the job)", exc_info=True)
                raise SystemExit(STOPPED_EXIT_CODE) from None
        result.update(job_id=job_env.job_id, rank=job_env.global_rank, restarts=restarts)
        if not result.get("stopped"):
            return result
        self._after_stop(job_env, stop, restarts, cfg.output_dir)
        raise AssertionError("unreachable")  # _after_stop always raises

    # -- after a signal ----------------------------------------------------------------------------
    def _after_stop(self, job_env: Any, stop: Any, restarts: int, output_dir: str) -> None:
        """Requeue (rank 0) or give up, then leave without a submitit result. Always raises."""
        received = [s for names in gather_objects(list(stop.received)) for s in names]  # every rank's signals
        # SIGTERM too means SLURM itself is ending the job (preemption with GraceTime, scancel,
        # scontrol requeue): it requeues or cancels it; a second requeue from here would race with it.
        wants_requeue = "SIGUSR2" in received and "SIGTERM" not in received
        where = f"{output_dir}/checkpoints"
        if not wants_requeue:
            log.warning("stopped after %s with a checkpoint in %s; not requeueing from here (SLURM requeues "
                        "preempted or 'scontrol requeue'd jobs itself)", ",".join(received) or "a peer's stop", where)
            raise SystemExit(STOPPED_EXIT_CODE)
        if restarts >= self.max_requeues:
            raise RequeueLimitError(
                f"job {job_env.job_id} stopped by {received[0]} after {restarts} requeues and --max-requeues is "
                f"{self.max_requeues}; the latest checkpoint is in {where}. Resubmit the same command to continue "
                "(checkpoint.resume=auto), or raise --max-requeues")
        if job_env.global_rank == 0:
            counter = _counter_file(job_env, None)
            if job_env.name() != "slurm" and counter is not None:  # SLURM counts in SLURM_RESTART_COUNT
                counter.write_text(str(restarts + 1))
            log.warning("checkpoint saved in %s; requeueing job %s (requeue %d of at most %d)", where,
                        job_env.job_id, restarts + 1, self.max_requeues)
            try:
                job_env._requeue(self.max_requeues - restarts - 1)  # slurm: scontrol requeue; local: exit 144
            except (OSError, subprocess.SubprocessError) as e:
                raise RuntimeError(f"could not requeue job {job_env.job_id} ({e}); the latest checkpoint is in "
                                   f"{where}: resubmit the same command to continue") from None
        raise SystemExit(STOPPED_EXIT_CODE)


def _limit_threads() -> None:
    """One intra-op thread pool per task sized to its CPUs (torch defaults to every core of the node).

    Also exported as ``OMP_NUM_THREADS``: otherwise accelerate (MULTI_CPU) resets the pool to
    physical cores / tasks on the node, so the same job got 1 thread per task on one node but 2 on
    two nodes, and different floating-point results."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and "OMP_NUM_THREADS" not in os.environ:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(max(1, int(cpus)))
        torch.set_num_threads(max(1, int(cpus)))
