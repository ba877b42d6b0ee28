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

:func:`tldist.world.die_with_parent` covers the opposite case: a launcher that is killed must take
its training processes with it.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Optional

from tldist.train.loop import request_stop

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
