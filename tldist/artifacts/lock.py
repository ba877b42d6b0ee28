"""One run per output directory: a lock file in ``output_dir`` held by the run's main process.

Two runs writing checkpoints into one ``output_dir`` corrupt each other's resume state (a second
``resume=auto`` run picks up the first one's checkpoints while it keeps writing). A run therefore
takes ``<output_dir>/run.lock`` before it touches the directory, and a second run refuses with one
line naming the holder::

    lock = acquire_run_lock(cfg.output_dir)   # main process only; raises RunLockError
    try:
        ...train...
    finally:
        lock.release()                        # idempotent; also `with acquire_run_lock(d):`

**The file.** JSON with ``host``, ``pid``, ``started`` (ISO local time) and ``start_time``
(seconds since the epoch), ``job_id`` (``SLURM_JOB_ID``, else null), ``restart``
(``SLURM_RESTART_COUNT``), ``heartbeat_s``, the holder's ``boot_id``/``pid_ns``/``proc_start``
(which make the pid unambiguous on its machine) and a random ``token``. It is written in full to a
unique temporary name and then ``link()``-ed to ``run.lock``: creating a hard link is atomic on
local filesystems and on NFS (v2 and later; success is confirmed by the temporary file's link count,
as NFS may report a lost reply as failure), so no reader ever sees a half-written lock. Filesystems
without hard links fall back to ``O_CREAT | O_EXCL``.

**Staleness** (a holder that died without releasing: ``kill -9``, a node failure):

- same machine (same kernel ``boot_id`` and pid namespace): stale when the pid is gone, a zombie,
  or now belongs to a process with another start time (pid reuse);
- another machine or container: the holder touches the file every ``heartbeat_s`` seconds from a
  daemon thread; the lock is stale when its mtime is more than ``STALE_HEARTBEATS`` intervals old
  (the age is measured against a file just written to the same directory, so the clocks of the
  hosts do not matter, and read through an open file, so NFS attribute caching does not either);
- a requeued attempt of the same SLURM job (same ``SLURM_JOB_ID``, higher ``SLURM_RESTART_COUNT``)
  takes over at once: SLURM starts a new attempt only after it ended the previous one.

A stale lock is broken under a short-lived guard file (``run.lock.break``), so that of several runs
finding the same stale lock exactly one takes it over. The lock is released when the holder calls
:meth:`RunLock.release`, leaves the ``with`` block, or exits normally (``atexit``).
"""

from __future__ import annotations

import atexit
import datetime as _dt
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tldist.artifacts import layout
from tldist.errors import UserError
from tldist.paths import make_output_dir
from tldist.world import gather_objects

log = logging.getLogger("tldist")

LOCK_NAME = layout.LOCK
"""File name of the lock inside ``output_dir``."""
HEARTBEAT_S = 30.0
"""Default seconds between two heartbeats (mtime touches) of the holder."""
STALE_HEARTBEATS = 4
"""A lock whose holder cannot be checked directly is stale after this many missed heartbeats."""
GUARD_STALE_S = 60.0
"""A break guard older than this was left by a process that died while breaking a lock."""
_ACQUIRE_ATTEMPTS = 50
_NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS)

_held: dict[str, "RunLock"] = {}  # lock path -> the lock this process holds on it
_held_guard = threading.Lock()


class RunLockError(UserError):
    """``output_dir`` is locked by another run; the one-line message names the holder and how to clear it."""


# ---------------------------------------------------------------------------------- identity
def _read_text(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def boot_id() -> Optional[str]:
    """This kernel's boot id (Linux; None elsewhere): equal for every process and container of one boot."""
    return _read_text("/proc/sys/kernel/random/boot_id")


def pid_namespace() -> Optional[str]:
    """This process's pid namespace (``pid:[4026531836]``; None where /proc has none)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _proc_stat(pid: int) -> Optional[tuple[str, int]]:
    """(state letter, start time in clock ticks after boot) of ``pid`` from /proc; None if it is gone."""
    raw = _read_text(f"/proc/{pid}/stat")
    if raw is None:
        return None
    fields = raw.rsplit(")", 1)[-1].split()  # the command name may hold spaces and parentheses
    try:
        return fields[0], int(fields[19])  # field 3 (state) and field 22 (starttime) of proc(5)
    except (IndexError, ValueError):
        return None


def process_start(pid: int) -> Optional[int]:
    """Start time of ``pid`` in clock ticks after boot (Linux), None if unknown or gone."""
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def pid_alive(pid: int, start: Optional[int] = None) -> bool:
    """Whether ``pid`` runs on this machine (a zombie counts as dead); with ``start`` (from
    :func:`process_start`), also whether it is still the same process and not a reused pid."""
    if pid <= 0:
        return False
    stat = _proc_stat(pid)
    if stat is not None:
        state, started = stat
        return state not in ("Z", "X", "x") and (start is None or started == start)
    if os.path.isdir("/proc/self"):  # Linux: no /proc/<pid> means no such process here
        return False
    try:  # no /proc (macOS): signal 0 checks existence only
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class LockInfo:
    """The content of a lock file (see the module docstring)."""

    host: str
    pid: int
    started: str
    start_time: float
    job_id: Optional[str]
    restart: int
    heartbeat_s: float
    boot_id: Optional[str]
    pid_ns: Optional[str]
    proc_start: Optional[int]
    token: str

    @classmethod
    def mine(cls, heartbeat_s: float) -> "LockInfo":
        now = time.time()
        return cls(host=socket.gethostname(), pid=os.getpid(),
                   started=_dt.datetime.fromtimestamp(now).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
                   start_time=now, job_id=os.environ.get("SLURM_JOB_ID") or None,
                   restart=_int(os.environ.get("SLURM_RESTART_COUNT"), 0), heartbeat_s=float(heartbeat_s),
                   boot_id=boot_id(), pid_ns=pid_namespace(), proc_start=process_start(os.getpid()),
                   token=uuid.uuid4().hex)

    @classmethod
    def from_json(cls, text: str) -> "LockInfo":
        """Parse a lock file; raises ValueError when it is not one."""
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        try:
            return cls(host=str(d["host"]), pid=int(d["pid"]), started=str(d.get("started", "?")),
                       start_time=float(d.get("start_time", 0.0)), job_id=_str_or_none(d.get("job_id")),
                       restart=_int(d.get("restart"), 0), heartbeat_s=float(d.get("heartbeat_s", HEARTBEAT_S)),
                       boot_id=_str_or_none(d.get("boot_id")), pid_ns=_str_or_none(d.get("pid_ns")),
                       proc_start=_int(d.get("proc_start"), None), token=str(d.get("token", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"missing or bad field ({e})") from None

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1) + "\n"

    def same_machine(self) -> bool:
        """Whether the holder's pid can be checked from here (same kernel boot and pid namespace)."""
        if self.boot_id is not None or boot_id() is not None:
            return self.boot_id == boot_id() and self.pid_ns == pid_namespace()
        return self.host == socket.gethostname()  # no /proc: trust the host name

    def describe(self) -> str:
        """``host vm, pid 123, started 2026-11-30 11:20:00 UTC, SLURM job 77 (restart 1)``."""
        text = f"host {self.host}, pid {self.pid}, started {self.started}"
        if self.job_id:
            text += f", SLURM job {self.job_id}" + (f" (restart {self.restart})" if self.restart else "")
        return text


def _int(value: Any, default: Optional[int]) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _str_or_none(value: Any) -> Optional[str]:
    return None if value is None else str(value)


# ---------------------------------------------------------------------------------- file operations
def _write_unique(directory: Path, text: str) -> Path:
    tmp = directory / f".{LOCK_NAME}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:12]}"
    _write_new(tmp, text)
    return tmp


def _write_new(path: Path, text: str) -> None:
    """Create ``path`` exclusively (``O_CREAT | O_EXCL``), write ``text`` and fsync it;
    raises ``FileExistsError`` when it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_exclusive(path: Path, text: str) -> tuple[bool, float]:
    """Atomically create ``path`` holding ``text``; returns (created, the filesystem's clock now).

    The clock is the mtime of the temporary file just written: lock ages are measured against it,
    so the clocks of the hosts sharing the filesystem do not matter.
    """
    tmp = _write_unique(path.parent, text)
    try:
        fs_now = os.stat(tmp).st_mtime
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False, fs_now
        except OSError as e:
            if e.errno in _NO_HARD_LINKS:  # some FUSE/SMB mounts: exclusive create instead
                return _create_excl_fallback(path, text), fs_now
            # anything else (e.g. a lost NFS reply after the link was made): the link count decides
        return os.stat(tmp).st_nlink == 2, fs_now
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _create_excl_fallback(path: Path, text: str) -> bool:
    try:
        _write_new(path, text)
    except FileExistsError:
        return False
    return True


def _read_lock(path: Path) -> tuple[Optional[str], Optional[float]]:
    """(content, mtime) read through one open file (fresh attributes on NFS); (None, None) if absent."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None, None
    try:
        mtime = os.fstat(fd).st_mtime
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", "replace"), mtime
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------- the lock
class RunLock:
    """A held run lock on ``output_dir`` (from :func:`acquire_run_lock`).

    ``release()`` removes the lock file if it is still this run's (idempotent; a no-op in a forked
    child). While held, a daemon thread touches the file every ``info.heartbeat_s`` seconds; if
    the file was removed or taken over meanwhile (this run was judged dead, e.g. its node was cut
    off and the job requeued elsewhere), ``lost`` becomes True and an error is logged: check it
    before writing a checkpoint.
    """

    def __init__(self, path: Path, info: LockInfo):
        self.path = path
        """The lock file, ``<output_dir>/run.lock``."""
        self.info = info
        """What was written into it."""
        self.lost = False
        self._stop = threading.Event()
        self._released = False
        self._thread = threading.Thread(target=self._heartbeat, name="tldist-run-lock-heartbeat", daemon=True)
        self._thread.start()
        atexit.register(self.release)

    @property
    def held(self) -> bool:
        return not self._released

    def _still_mine(self) -> bool:
        text, _ = _read_lock(self.path)
        try:
            return text is not None and LockInfo.from_json(text).token == self.info.token
        except ValueError:
            return False

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.info.heartbeat_s):
            try:
                if not self._still_mine():
                    if self._stop.is_set():  # release() removed it meanwhile
                        return
                    self.lost = True
                    log.error("the run lock %s was removed or taken over by another run while this run (pid %d) "
                              "held it: two runs may now write to %s", self.path, self.info.pid, self.path.parent)
                    return
                os.utime(self.path)
            except OSError as e:  # a filesystem hiccup: try again at the next beat
                log.warning("could not refresh the run lock %s: %s", self.path, e)

    def ensure_held(self) -> None:
        """Raise :class:`RunLockError` unless the lock file is still this run's (one small read).

        Called before every checkpoint write: a run whose lock was taken over (it was judged dead
        and the job started again elsewhere) must stop instead of writing beside its successor.
        """
        if self.lost or self._released or not self._still_mine():
            self.lost = True
            raise RunLockError(f"the run lock {self.path} is no longer held by this run (pid {self.info.pid}): another "
                               f"run took over {self.path.parent}; stopping without writing a checkpoint")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still this run's. Idempotent."""
        if self._released or os.getpid() != self.info.pid:  # forked children never release the parent's lock
            return
        self._released = True
        self._stop.set()
        atexit.unregister(self.release)
        with _held_guard:
            if _held.get(str(self.path)) is self:
                del _held[str(self.path)]
        try:
            if self._still_mine():
                os.unlink(self.path)
        except OSError as e:
            log.warning("could not remove the run lock %s: %s; delete it by hand", self.path, e)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RunLock({str(self.path)!r}, {self.info.describe()}, {'held' if self.held else 'released'})"


def _stale_reason(info: LockInfo, age: float) -> Optional[str]:
    """Why the lock described by ``info`` (mtime ``age`` seconds ago) is stale; None while it is live."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and info.job_id == job and _int(os.environ.get("SLURM_RESTART_COUNT"), 0) > info.restart:
        return f"it was taken by attempt {info.restart} of this SLURM job {job}, which SLURM has ended"
    if info.same_machine():
        if info.pid == os.getpid() and info.proc_start == process_start(os.getpid()):
            with _held_guard:
                if any(h.info.token == info.token for h in _held.values()):
                    return None  # held by this very process (a nested run on the same directory)
            return "it was left by this process without being released"
        if not pid_alive(info.pid, info.proc_start):
            return f"process {info.pid} is no longer running"
        return None
    limit = STALE_HEARTBEATS * info.heartbeat_s
    if age > limit:
        return f"its heartbeat stopped {age:.0f} s ago (stale after {limit:.0f} s)"
    return None


def _refusal(path: Path, info: LockInfo, age: float) -> RunLockError:
    where = f"output_dir '{path.parent}' is in use by another run ({info.describe()}"
    if info.same_machine():
        who = "this process" if info.pid == os.getpid() else "still running"
        return RunLockError(f"{where}; {who}): stop that run first or use another output_dir (a lock left by a "
                            f"run that died is taken over automatically; to clear it by hand delete {path})")
    left = max(STALE_HEARTBEATS * info.heartbeat_s - age, 0)
    return RunLockError(f"{where}; last heartbeat {max(age, 0):.0f} s ago): stop that run first or use another "
                        f"output_dir; if that run is gone (e.g. its node died) its lock goes stale in {left:.0f} s, "
                        f"or delete {path}")


def _break_stale(path: Path, info: LockInfo, reason: str) -> None:
    """Remove ``path`` if it still holds ``info``'s lock, under a guard so one breaker acts at a time."""
    guard = path.with_name(path.name + ".break")
    created, fs_now = _create_exclusive(guard, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    if not created:
        try:
            if fs_now - os.stat(guard).st_mtime > GUARD_STALE_S:  # its breaker died mid-way
                os.unlink(guard)
        except FileNotFoundError:
            pass
        time.sleep(0.05)
        return
    try:
        text, _ = _read_lock(path)
        try:
            current = LockInfo.from_json(text) if text is not None else None
        except ValueError:
            current = None
        if current is not None and current.token == info.token:
            log.warning("taking over the run lock %s of %s: %s", path, info.describe(), reason)
            os.unlink(path)
    finally:
        try:
            os.unlink(guard)
        except FileNotFoundError:
            pass


def acquire_run_lock(output_dir: str | os.PathLike, *, heartbeat_s: float = HEARTBEAT_S) -> RunLock:
    """Lock ``output_dir`` (created if missing) for this run; call it on the main process only.

    Returns the held :class:`RunLock`. Raises :class:`RunLockError` (a :class:`UserError`, one line)
    naming the holder's host, pid, start time and SLURM job when another live run holds the
    directory, and how to clear a stale lock; or when ``output_dir`` cannot be created or written.
    A stale lock (see the module docstring) is taken over with a warning naming its old holder.
    ``heartbeat_s``: seconds between two touches of the file (the others judge staleness by it).
    """
    directory = Path(output_dir).expanduser().resolve()
    path = directory / LOCK_NAME
    if heartbeat_s <= 0:
        raise ValueError(f"heartbeat_s must be > 0, got {heartbeat_s}")
    try:
        make_output_dir(directory, "output_dir")
    except OSError as e:
        raise RunLockError(f"cannot create output_dir '{directory}': {e.strerror or e}; choose a writable "
                           "output_dir") from None
    unreadable_since: Optional[float] = None
    for _ in range(_ACQUIRE_ATTEMPTS):
        info = LockInfo.mine(heartbeat_s)
        try:
            created, fs_now = _create_exclusive(path, info.to_json())
        except OSError as e:
            raise RunLockError(f"cannot write the run lock {path}: {e.strerror or e}; choose a writable "
                               "output_dir") from None
        if created:
            lock = RunLock(path, info)
            with _held_guard:
                _held[str(path)] = lock
            return lock
        text, mtime = _read_lock(path)
        if text is None:  # released between our attempt and the read: try again
            continue
        age = fs_now - (mtime or fs_now)
        try:
            holder = LockInfo.from_json(text)
        except ValueError as e:
            # only a lock written by the O_EXCL fallback can be seen half-written; give it a moment
            unreadable_since = unreadable_since or time.monotonic()
            if age > STALE_HEARTBEATS * HEARTBEAT_S or time.monotonic() - unreadable_since > 2.0:
                raise RunLockError(f"the run lock {path} is unreadable ({e}): if no other run uses output_dir "
                                   f"'{directory}', delete it") from None
            time.sleep(0.1)
            continue
        reason = _stale_reason(holder, age)
        if reason is None:
            raise _refusal(path, holder, age)
        _break_stale(path, holder, reason)
    raise RunLockError(f"could not take the run lock {path} after {_ACQUIRE_ATTEMPTS} attempts (other runs keep "
                       f"taking and releasing it); make sure a single run uses output_dir '{directory}'")


def claim_output_dir(output_dir: str | os.PathLike, *, is_main: bool) -> Optional[RunLock]:
    """Lock ``output_dir`` for this run (call on every rank; the main process holds the lock).

    The ranks agree on the outcome, so when another run holds the directory every rank raises
    the same one-line error (printed once) instead of rank 0 failing while the others wait.
    Returns the lock (None on other ranks); release it with ``release()``.
    """
    lock, refusal = None, None
    if is_main:
        try:
            lock = acquire_run_lock(output_dir)
        except UserError as e:
            refusal = str(e)
    refusals = [r for r in gather_objects(refusal) if r]  # a normal-path collective: every rank gets here
    if refusals:
        if lock is not None:
            lock.release()
        err = UserError(refusals[0])
        err.same_on_every_rank = True
        raise err
    return lock
