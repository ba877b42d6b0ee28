"""Turn SLURM's "stop soon" signals into a graceful stop of the training loop.

SLURM announces the end of a job with signals, and the training loop must react without doing any
collective work inside a signal handler:

- ``SIGUSR2`` comes ``--signal=USR2@<s>`` seconds before the time limit, at preemption (with
  ``SlurmctldParameters=preempt_send_user_signal``), or from ``scancel --signal=USR2``. It means
  "checkpoint, then requeue me".
- ``SIGTERM`` comes at preemption, ``scancel`` and ``scontrol requeue``, followed by ``SIGKILL``
  after ``KillWait`` seconds. It means "checkpoint if you can, then exit"; whoever sent it
  decides whether the job comes back.

Both handlers only call :func:`tldist.train.loop.request_stop` and record the signal. The loop
all-reduces the flag at its next optimizer step, every rank saves a checkpoint, and ``fit()``
returns with ``stopped=True``. The caller then decides about the requeue (see
:mod:`tldist.launch.job`). Forked DataLoader workers inherit these handlers, so signals that
SLURM sends to every process of a step do not kill them.

:func:`die_with_parent` covers the opposite case: a launcher that is
killed (``kill -9`` of ``accelerate launch``, or of its process group) must take its training
processes with it. torch-elastic starts each rank in a session of its own, so without this they
would run on as orphans and keep writing checkpoints into ``output_dir``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any, Optional

log = logging.getLogger("tldist.launch")

REQUEUE_SIGNALS = ("SIGUSR2",)
"""Signals meaning "checkpoint and requeue" (the job's own ``--signal``)."""
EXIT_SIGNALS = ("SIGTERM",)
"""Signals meaning "checkpoint if there is time, then exit" (scancel, preemption, scontrol requeue)."""


class StopSignals:
    """Installs the stop handlers in the main thread and remembers which signals arrived.

    Use as a context manager; the previous handlers come back on exit::

        with StopSignals() as stop:
            result = run(cfg)
        if result["stopped"] and stop.requeue_requested: ...
    """

    def __init__(self, requeue_signals: tuple[str, ...] = REQUEUE_SIGNALS,
                 exit_signals: tuple[str, ...] = EXIT_SIGNALS):
        self._requeue = [getattr(signal, s) for s in requeue_signals]
        self._exit = [getattr(signal, s) for s in exit_signals]
        self._previous: dict[int, Any] = {}
        self.received: list[str] = []
        """Names of the signals received so far, in order."""

    @property
    def requeue_requested(self) -> bool:
        """True once a requeue signal (USR2) arrived."""
        return any(getattr(signal, s) in self._requeue for s in self.received)

    @property
    def stop_requested(self) -> bool:
        return bool(self.received)

    def _handle(self, signum: int, frame: Optional[Any] = None) -> None:
        from tldist.train.loop import request_stop

        name = signal.Signals(signum).name
        first = not self.received
        self.received.append(name)
        request_stop()
        if first:  # logging from a handler is fine here: it runs between bytecodes in the main thread
            log.warning("caught %s: the loop will checkpoint at its next optimizer step and stop", name)

    def install(self) -> "StopSignals":
        """Install the handlers (main thread only; a no-op with a warning elsewhere)."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("stop signals not installed: not in the main thread")
            return self
        for sig in self._requeue + self._exit:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put the handlers that were there before :meth:`install` back."""
        for sig, old in self._previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> "StopSignals":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.restore()


def clear_stop_request() -> None:
    """Forget a stop requested earlier in this process (jobs run in-process by submitit's debug
    executor share the flag of :mod:`tldist.train.loop`)."""
    from tldist.train import loop

    flag = getattr(loop, "_STOP", None)
    if flag is not None and hasattr(flag, "clear"):
        flag.clear()


# ---------------------------------------------------------------------------------------- parent death
PR_SET_PDEATHSIG = 1
"""``prctl`` option: the signal this process gets when the thread that created it exits (Linux)."""
_LAUNCHER_COMMANDS = ("python", "accelerate", "torchrun")


def launcher_parent() -> str | None:
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


def _parent_gone(expected: int | None, before: int) -> bool:
    now = os.getppid()
    if expected is not None:
        return now != expected
    if now != before:  # re-parented between the first look and prctl
        return True
    # Re-parented to init before we looked: getppid() is 1. Unless pid 1 is the launcher itself
    # (a container whose entrypoint is `accelerate launch`), the parent is gone.
    return now == 1 and not _command_of(1).startswith(_LAUNCHER_COMMANDS)


def die_with_parent(sig: int = signal.SIGTERM, *, parent_pid: int | None = None, always: bool = False) -> bool:
    """End this process with ``sig`` when the launcher that started it dies (Linux; a no-op elsewhere).

    Acts only in a process started by a launcher (:func:`launcher_parent`: torch-elastic or submitit's
    local executor), or with ``parent_pid`` or ``always=True``: ``tldist train`` started from a shell
    (``nohup tldist train ... &``) must survive that shell. Returns True when armed (or when ``sig``
    was sent because the parent was already gone), False when it did nothing.

    Uses ``prctl(PR_SET_PDEATHSIG, sig)``. As that only covers a parent that dies *after* the call,
    the parent is checked once more: if it is already gone (``getppid()`` differs from
    ``parent_pid``, or changed during the call, or is init while init is not a launcher), ``sig`` is
    sent to this process at once. With :class:`StopSignals` installed, SIGTERM becomes a graceful
    stop (every rank checkpoints, then exits); without it, the default action ends the process.

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
