"""tldist.artifacts.lock: one run per output_dir, tested with real processes holding the lock."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, write_lock
from tldist.artifacts.lock import (
    LOCK_NAME,
    RunLockError,
    acquire_run_lock,
    pid_alive,
    pid_namespace,
    process_start,
)

# Holds the lock on argv[1] (heartbeat argv[2] s) until stdin closes, then reports and exits;
# with argv[3] == "exit" it leaves without calling release() (atexit must do it).
HOLDER = r"""
import json, sys
from tldist.artifacts.lock import acquire_run_lock, RunLockError
try:
    lock = acquire_run_lock(sys.argv[1], heartbeat_s=float(sys.argv[2]))
except RunLockError as e:
    print(json.dumps({"refused": str(e)}), flush=True)
    sys.exit(2)
print(json.dumps({"locked": lock.info.__dict__}), flush=True)
if len(sys.argv) > 3 and sys.argv[3] == "exit":
    sys.exit(0)
sys.stdin.read()
if len(sys.argv) > 3 and sys.argv[3] == "expect-lost":  # give the heartbeat thread time to notice
    import time
    deadline = time.monotonic() + 20 * lock.info.heartbeat_s
    while not lock.lost and time.monotonic() < deadline:
        time.sleep(0.05)
print(json.dumps({"lost": lock.lost}), flush=True)
lock.release()
"""


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def start_holder(out: Path, heartbeat: float = 30.0, *extra: str, prefix: tuple[str, ...] = ()) -> tuple:
    proc = subprocess.Popen([*prefix, sys.executable, "-c", HOLDER, str(out), str(heartbeat), *extra],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env())
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    return proc, json.loads(line)


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def test_second_run_is_refused_with_one_line_naming_the_holder(tmp_path):
    holder, got = start_holder(tmp_path / "run")
    try:
        info = got["locked"]
        content = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
        assert content["pid"] == holder.pid and content["host"] == socket.gethostname()
        assert {"started", "start_time", "job_id", "token"} <= set(content)
        with pytest.raises(RunLockError) as e:
            acquire_run_lock(tmp_path / "run")
        msg = str(e.value)
        assert "\n" not in msg
        for part in (f"host {socket.gethostname()}", f"pid {holder.pid}", f"started {info['started']}",
                     f"delete {tmp_path / 'run' / LOCK_NAME}", str(tmp_path / "run")):
            assert part in msg, (part, msg)
        other, refused = start_holder(tmp_path / "run")  # another process is refused as well
        assert other.wait(timeout=30) == 2 and f"pid {holder.pid}" in refused["refused"]
    finally:
        holder.stdin.close()
        assert json.loads(holder.stdout.readline()) == {"lost": False}
        holder.wait(timeout=30)
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released
    with acquire_run_lock(tmp_path / "run") as lock:  # free again; a context manager
        assert lock.path.is_file()
    assert not lock.path.exists()
    lock.release()  # idempotent


def test_lock_is_released_when_the_holder_exits_without_release(tmp_path):
    proc, _ = start_holder(tmp_path / "run", 30.0, "exit")
    assert proc.wait(timeout=30) == 0
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_killed_holder_is_stale_and_taken_over(tmp_path, caplog):
    holder, _ = start_holder(tmp_path / "run")
    holder.kill()  # SIGKILL: no release, no atexit
    holder.wait(timeout=30)
    assert (tmp_path / "run" / LOCK_NAME).exists()
    with caplog.at_level(logging.WARNING, logger="tldist"):
        lock = acquire_run_lock(tmp_path / "run")
    try:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        assert f"pid {holder.pid}" in caplog.text and "no longer running" in caplog.text
    finally:
        lock.release()


def test_a_reused_pid_does_not_keep_a_dead_runs_lock(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        start = process_start(sleeper.pid)
        assert pid_alive(sleeper.pid, start) and not pid_alive(sleeper.pid, (start or 0) + 1)
        write_lock(tmp_path / "a", pid=sleeper.pid, proc_start=start)  # the live process itself
        with pytest.raises(RunLockError, match=f"pid {sleeper.pid}"):
            acquire_run_lock(tmp_path / "a")
        write_lock(tmp_path / "b", pid=sleeper.pid, proc_start=(start or 0) + 1)  # same pid, other process
        acquire_run_lock(tmp_path / "b").release()
    finally:
        sleeper.kill()
        sleeper.wait()


RACER = r"""
import os, sys, time
from tldist.artifacts.lock import acquire_run_lock, RunLockError
while not os.path.exists(sys.argv[2]):
    time.sleep(0.001)
try:
    lock = acquire_run_lock(sys.argv[1])
    print("won", flush=True)
    sys.stdin.read()
    lock.release()
except RunLockError:
    print("refused", flush=True)
"""


@pytest.mark.parametrize("stale_lock", [False, True])
def test_racing_runs_exactly_one_wins(tmp_path, stale_lock):
    out, go = tmp_path / "run", tmp_path / "go"
    if stale_lock:  # a dead run's lock that every racer wants to break
        dead = subprocess.Popen(["true"])
        dead.wait()
        write_lock(out, pid=dead.pid)
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(out), str(go)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
              for _ in range(6)]
    time.sleep(0.5)  # let them start (not required for correctness)
    go.touch()
    results = [p.stdout.readline().strip() for p in racers]
    for p in racers:
        p.stdin.close()
        p.wait(timeout=30)
    assert sorted(results) == ["refused"] * 5 + ["won"], [p.stderr.read() for p in racers]
    assert not (out / LOCK_NAME).exists() and not list(out.glob(f"*{LOCK_NAME}*"))  # no leftovers


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_live_holder_in_another_pid_namespace_is_judged_by_its_heartbeat(tmp_path):
    """A holder whose pid cannot be checked from here (another container) stays live while it beats,
    goes stale when it freezes, and notices afterwards that it lost the lock."""
    out = tmp_path / "run"
    prefix = ("unshare", "--pid", "--fork", "--mount-proc")
    if subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare --pid is not permitted here")
    holder, got = start_holder(out, 0.5, "expect-lost", prefix=prefix)
    path = out / LOCK_NAME
    try:
        assert got["locked"]["pid_ns"] != pid_namespace()
        first = path.stat().st_mtime
        wait_until(lambda: path.stat().st_mtime > first, 30, "a heartbeat")
        second = path.stat().st_mtime
        wait_until(lambda: path.stat().st_mtime > second, 30, "a second heartbeat")
        with pytest.raises(RunLockError, match="last heartbeat"):
            acquire_run_lock(out)
        _signal_tree(holder.pid, signal.SIGSTOP)  # frozen: no more heartbeats
        taken = []

        def take() -> bool:
            try:
                taken.append(acquire_run_lock(out))
                return True
            except RunLockError:
                return False

        wait_until(take, 60, "the frozen holder's lock to go stale")
        _signal_tree(holder.pid, signal.SIGCONT)
        holder.stdin.close()
        assert json.loads(holder.stdout.readline()) == {"lost": True}
        assert "taken over by another run" in holder.stderr.read()
        assert json.loads(path.read_text())["pid"] == os.getpid()  # the loser did not remove our lock
        taken[0].release()
    finally:
        _signal_tree(holder.pid, signal.SIGCONT)
        holder.kill()
        holder.wait(timeout=30)


def _signal_tree(pid: int, sig: int) -> None:
    """Signal ``pid`` and its descendants (unshare --fork runs the holder as its child)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    kids = children.read_text().split() if children.exists() else []
    for kid in kids:
        _signal_tree(int(kid), sig)
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
