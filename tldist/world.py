"""Who this process is in the job, and how ranks agree: the process floor of tldist.

This is the only module that asks whether ``torch.distributed`` is on (:func:`distributed`); every
other module calls the helpers below, so a command behaves the same alone and under ``accelerate
launch``/``torchrun``/SLURM:

- :class:`World` (rank, world size, local rank) and :func:`start_world`, which joins the job's
  process group through Accelerate from plain values (no job config);
- :func:`setup_logging` (INFO on the main process, warnings elsewhere);
- collectives: :func:`gather_objects`, :func:`gather_to_main`, :func:`broadcast_object`, :func:`all_reduce_sum`,
  :func:`all_reduce_max`, :func:`barrier`, :func:`broadcast_module_state`; each must be called on every
  rank, at the same point relative to the others, and never on an error path;
- :func:`run_on_main`: run a step on rank 0 and give every rank its result or its error;
- :func:`die_with_parent` (a killed launcher takes its ranks with it) and :func:`is_peer_failure`
  (a collective failed because another rank is gone).

Launch facts this module encodes (measured on CPU machines, see the README):
``accelerate launch --cpu --num_processes 2`` starts ONE process, so tldist's CPU recipe is an
ordinary multi-process launch (``configs/accelerate/cpu.yaml``) plus ``Accelerator(cpu=True)``,
which :func:`start_world` passes whenever no GPU is present: the state becomes MULTI_CPU over gloo.
No model goes through ``accelerator.prepare``: :mod:`tldist.train.parallelize` places and wraps it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist

from tldist.errors import ConfigError, DataError, UserError

log = logging.getLogger("tldist")

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the job (all fields are plain ints)."""

    rank: int = 0
    """Global rank of this process."""
    world_size: int = 1
    """Number of training processes."""
    local_rank: int = 0
    """Rank within the node."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "World":
        """Read RANK/WORLD_SIZE/LOCAL_RANK as set by torchrun, accelerate launch or submitit."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


# ---------------------------------------------------------------------------------------- the world
def distributed() -> bool:
    """Whether a ``torch.distributed`` process group is up (the one place tldist asks)."""
    return dist.is_available() and dist.is_initialized()


def multi_process() -> bool:
    """Whether a process group with more than one rank is up."""
    return distributed() and dist.get_world_size() > 1


def start_world(*, mixed_precision: Optional[str] = "no", timeout_s: float = 600):
    """Join the job's process group and pick this rank's device; returns the ``accelerate.Accelerator``
    (call on every rank, once per process; without a launcher it is a one-process world).

    Args:
        mixed_precision: ``no``, ``bf16`` or ``fp16``: only for ``accelerator.autocast()`` of the
            eval/adapt/compress entry points (training takes its autocast and GradScaler from
            :mod:`tldist.train.parallelize`); None: the launcher's (``ACCELERATE_MIXED_PRECISION``, set by
            ``accelerate launch --mixed_precision``), as ``Accelerator`` reads it, else ``no``. ``no`` under a
            launcher that asked for bf16/fp16 (adapt, pseudo-label, compress run in fp32) logs a warning.
        timeout_s: seconds a collective may wait for the other ranks before it raises (torch's defaults
            are 30 min for gloo and 10 min for NCCL): a rank whose peer vanished without closing its
            connections (a lost node, a hung GPU) then raises instead of waiting for the time limit.

    On a machine without a GPU the Accelerator is built with ``cpu=True`` (gloo, MULTI_CPU).
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if mixed_precision == "no" and launcher in ("bf16", "fp16"):  # say so rather than drop it silently
        log.warning("the launcher's --mixed_precision %s is not used by this command: it runs in fp32", launcher)
    pg_kwargs = InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision,
                       kwargs_handlers=[pg_kwargs], step_scheduler_with_optimizer=False)


def world_of(accelerator: Any) -> World:
    """The :class:`World` of an Accelerator built by :func:`start_world`."""
    return World(rank=accelerator.process_index, world_size=accelerator.num_processes,
                 local_rank=accelerator.local_process_index)


def current_world() -> World:
    """The :class:`World` of the process group that is up (one process when none is)."""
    if not distributed():
        return World()
    return World(rank=dist.get_rank(), world_size=dist.get_world_size(),
                 local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def command_line() -> str:
    """This process's command line as the user would type it (``tldist train CONFIG k=v ...``; a rank started
    by ``accelerate launch -m tldist.cli`` shows ``tldist`` too), shell-quoted; for records and model cards."""
    import shlex

    argv = list(sys.argv)
    if argv and argv[0].endswith(("tldist/cli/__main__.py", "tldist/cli/main.py", "/tldist")):
        argv[0] = "tldist"
    return shlex.join(argv)


class ConsoleHandler(logging.StreamHandler):
    """A logging handler writing to ``sys.stdout`` (or ``sys.stderr``) as it is when each record is emitted,
    not as it was when the handler was made: a caller that swaps the stream afterwards (pytest's capture of
    one test, a notebook's redirect) and closes it does not leave a handler writing to a closed file.

    Args:
        stream_name: ``"stdout"`` or ``"stderr"``.
    """

    def __init__(self, stream_name: str = "stdout"):
        self.stream_name = stream_name
        super().__init__()

    @property
    def stream(self):
        return getattr(sys, self.stream_name)

    @stream.setter
    def stream(self, value) -> None:  # set by StreamHandler.__init__; the current sys stream is used instead
        pass


def setup_logging(is_main: bool) -> None:
    """INFO on the main process, warnings only elsewhere (root logger, to stdout)."""
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, handlers=[ConsoleHandler()],
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", force=True)


# ---------------------------------------------------------------------------------------- collectives
def gather_objects(obj: Any) -> list[Any]:
    """All ranks' ``obj`` (picklable) in rank order; ``[obj]`` without a process group (call on every rank)."""
    if not distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(obj: Any) -> Optional[list[Any]]:
    """All ranks' ``obj`` (picklable) in rank order on rank 0, None on the other ranks; ``[obj]`` without a
    process group (call on every rank). Unlike :func:`gather_objects` only rank 0 receives: the other ranks
    hold nothing but their own ``obj`` (``torch.distributed.gather_object``; NCCL sends it from the current
    CUDA device)."""
    if not multi_process():
        return [obj]
    out: Optional[list[Any]] = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every rank; ``obj`` without a process group (call on every rank)."""
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over ranks, returned on the CPU (call on every rank). The reduction runs on the
    default group's device (CUDA for NCCL); without a process group ``t`` comes back as is."""
    if not multi_process():
        return t
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    x = t.to(device)
    dist.all_reduce(x)
    return x.cpu()


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elementwise maximum over ranks, returned on the CPU (call on every rank); as
    :func:`all_reduce_sum`, ``t`` as is without a process group."""
    if not multi_process():
        return t
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    x = t.to(device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x.cpu()


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place, on its own device (call on every rank); returns ``t``."""
    if distributed():
        dist.all_reduce(t)
    return t


def barrier() -> None:
    """Wait until every rank gets here (call on every rank; a no-op for one process)."""
    if multi_process():
        dist.barrier()


def broadcast_module_state(model: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (call on every rank; a no-op for one process)."""
    if not multi_process():
        return
    box = [{k: v.detach().cpu() for k, v in model.state_dict().items()} if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    if dist.get_rank() != 0:
        model.load_state_dict(box[0])


def run_on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and return its (picklable) result on every rank (call on every rank).

    Without this a failure on rank 0 (disk full, a bad output dir) would leave the other ranks
    waiting in the next collective. An exception on rank 0 is raised there as it is, and on the
    other ranks as the same kind of :class:`~tldist.errors.UserError` (``ConfigError``,
    ``DataError``) with its message, or as ``RuntimeError`` for any other error; a user error is
    marked ``same_on_every_rank`` so that the CLI prints it once.
    """
    if not multi_process():
        return fn()
    result: Any = None
    error: Optional[BaseException] = None
    status: tuple[str, Any] = ("ok", None)
    if dist.get_rank() == 0:
        try:
            result = fn()
            status = ("ok", result)
        except Exception as e:  # noqa: BLE001 - forwarded to the other ranks, re-raised below
            error = e
            status = (type(e).__name__ if isinstance(e, UserError) else "", str(e))
    status = broadcast_object(status)
    if error is not None:
        if isinstance(error, UserError):
            error.same_on_every_rank = True
        raise error
    kind, value = status
    if kind == "ok":
        return value
    if kind:
        err = {"ConfigError": ConfigError, "DataError": DataError}.get(kind, UserError)(value)
        err.same_on_every_rank = True
        raise err
    raise RuntimeError(f"rank 0 failed: {value}")


_PEER_FAILURE_MARKERS = ("Connection closed by peer", "Connection reset by peer", "gloo/transport", "Timed out",
                         "timed out", "Broken pipe", "NCCL communicator was aborted", "NCCL error")
"""Texts of the errors a collective raises when another rank died, was cut off or timed out (gloo's
transport, NCCL, the process group's timeout)."""


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because another rank is gone: a
    ``torch.distributed.DistError``, or a ``RuntimeError`` naming one of :data:`_PEER_FAILURE_MARKERS`."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(k in text for k in _PEER_FAILURE_MARKERS)


# ---------------------------------------------------------------------------------------- parent death
PR_SET_PDEATHSIG = 1
"""``prctl`` option: the signal this process gets when the thread that created it exits (Linux)."""
_LAUNCHER_COMMANDS = ("python", "accelerate", "torchrun")


def launcher_parent() -> Optional[str]:
    """The launcher whose child this process is, when its death must end this process: ``torchelastic``
    (a rank of ``accelerate launch`` / ``torchrun``), ``submitit-local`` (a task of submitit's local
    executor); None otherwise (a shell, srun/slurmstepd, which ends its tasks itself, a test)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchelastic"
    if os.environ.get("SUBMITIT_EXECUTOR") == "local":
        return "submitit-local"
    return None


def _command_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _parent_gone(expected: Optional[int], before: int) -> bool:
    now = os.getppid()
    if expected is not None:
        return now != expected
    if now != before:  # re-parented between the first look and prctl
        return True
    # Re-parented to init before we looked: getppid() is 1. Unless pid 1 is the launcher itself
    # (a container whose entrypoint is `accelerate launch`), the parent is gone.
    return now == 1 and not _command_of(1).startswith(_LAUNCHER_COMMANDS)


def die_with_parent(sig: int = signal.SIGTERM, *, parent_pid: Optional[int] = None, always: bool = False) -> bool:
    """End this process with ``sig`` when the launcher that started it dies (Linux; a no-op elsewhere).

    A launcher that is killed (``kill -9`` of ``accelerate launch``, or of its process group) must
    take its training processes with it: torch-elastic starts each rank in a session of its own, so
    without this they would run on as orphans and keep writing checkpoints into ``output_dir``.

    Acts only in a process started by a launcher (:func:`launcher_parent`: torch-elastic or submitit's
    local executor), or with ``parent_pid`` or ``always=True``: ``tldist train`` started from a shell
    (``nohup tldist train ... &``) must survive that shell. Returns True when armed (or when ``sig``
    was sent because the parent was already gone), False when it did nothing.

    Uses ``prctl(PR_SET_PDEATHSIG, sig)``. As that only covers a parent that dies *after* the call,
    the parent is checked once more: if it is already gone (``getppid()`` differs from
    ``parent_pid``, or changed during the call, or is init while init is not a launcher), ``sig`` is
    sent to this process at once. With :class:`tldist.launch.signals.StopSignals` installed, SIGTERM
    becomes a graceful stop (every rank checkpoints, then exits); without it, the default action ends
    the process.

    Caveats (Linux semantics): the signal comes when the parent *thread* that started this process
    exits (torch-elastic starts ranks from its main thread); it is cleared in the child of a
    ``fork()`` and by exec of a set-uid binary; a re-parenting to a subreaper other than init
    before this call is only detected with ``parent_pid``. Call it early in each rank.
    """
    if not sys.platform.startswith("linux"):
        return False
    if parent_pid is None and not always and launcher_parent() is None:
        return False
    import ctypes

    before = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
            return False
    except (OSError, AttributeError) as e:
        log.warning("prctl(PR_SET_PDEATHSIG) unavailable: %s", e)
        return False
    if _parent_gone(parent_pid, before):
        log.warning("the launcher (parent of pid %d) is already gone: stopping with %s", os.getpid(),
                    signal.Signals(sig).name)
        os.kill(os.getpid(), sig)
    return True
