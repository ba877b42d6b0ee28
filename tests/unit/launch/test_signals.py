"""tldist.launch.signals: stop signals request a stop and restore their handlers."""

from __future__ import annotations

import os
import signal
import time


def test_stop_signals_request_a_stop_and_restore_handlers():
    from tldist.launch.signals import StopSignals
    from tldist.train.loop import clear_stop_request
    from tldist.train import loop

    before = signal.getsignal(signal.SIGUSR2)
    clear_stop_request()
    with StopSignals() as stop:
        assert not loop._STOP.is_set()
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.01)
        assert loop._STOP.is_set() and stop.received == ["SIGUSR2"] and stop.requeue_requested
        os.kill(os.getpid(), signal.SIGTERM)  # would end pytest without the handler
        time.sleep(0.01)
        assert stop.received == ["SIGUSR2", "SIGTERM"]
    assert signal.getsignal(signal.SIGUSR2) is before
    clear_stop_request()
    assert not loop._STOP.is_set()
