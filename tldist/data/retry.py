"""Opening shard streams, and retrying the remote ones that break off mid-read.

:func:`open_shard` opens any shard URL tldist reads: a local path, ``http(s)://`` (``curl``, with webdataset's
options), ``pipe:<command>`` (the shell), ``s3://bucket/key`` (boto3, the ``s3`` extra; see :mod:`tldist.s3`) and
webdataset's other ``gopen`` schemes. A command's output is read through :class:`CommandStream`, which
delivers every byte the command wrote before it failed and only then reports the failure.

A remote shard (``http(s)://``, ``pipe:``, ``s3://``) whose stream fails *after it delivered data* (a
reset connection, a client that died mid-object) is re-opened by
:func:`tldist.data.stream.read_shard` and read on from the next member it had not read, up to
:attr:`RetryPolicy.retries` times, waiting ``backoff_s * 2**(k-1)`` seconds before retry ``k``. Failures to
open a shard at all are left to the transport's own retries (curl's ``--retry``, the S3 client's), so a
missing or forbidden shard is not retried for nothing. Local files are never retried: their errors do not
go away. Every retry is logged (one warning naming the shard, the samples read so far and the reason) and
counted in this process (:func:`retry_count`, for the loader's ``data/retries``).
"""

from __future__ import annotations

import logging
import subprocess
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO, Optional, Sequence, Union

from webdataset.gopen import gopen

from tldist.errors import ConfigError
from tldist.s3 import open_object

log = logging.getLogger("tldist.data")

REMOTE_PREFIXES = ("http://", "https://", "pipe:", "s3://")
"""Shard URLs whose mid-read failures are retried."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and after how long, a remote shard that broke off is re-opened."""

    retries: int = 3
    """Re-opens per shard read (``data.read_retries``); 0 turns retrying off."""
    backoff_s: float = 0.5
    """Seconds before the first retry (``data.retry_backoff_s``); each further retry waits twice as long."""

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ConfigError(f"config key 'data.read_retries' is {self.retries}: use 0 (no retries) or more")
        if not self.backoff_s >= 0:
            raise ConfigError(f"config key 'data.retry_backoff_s' is {self.backoff_s}: use seconds >= 0")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry ``attempt`` (1-based)."""
        return self.backoff_s * 2 ** (attempt - 1)

    @classmethod
    def from_config(cls, data_cfg: Any) -> "RetryPolicy":
        """The policy of a ``DataConfig`` (``data.read_retries``, ``data.retry_backoff_s``)."""
        return cls(int(data_cfg.read_retries), float(data_cfg.retry_backoff_s))


_policy = RetryPolicy()
_count = 0
_lock = threading.Lock()


def configure(policy: RetryPolicy) -> None:
    """Make ``policy`` the default of :func:`~tldist.data.stream.read_shard` in this process and the loader
    workers it forks afterwards (call it where the loaders are built, before their workers start)."""
    global _policy
    _policy = policy


def current_policy() -> RetryPolicy:
    """The policy :func:`~tldist.data.stream.read_shard` uses when given none."""
    return _policy


def retry_count() -> int:
    """Retries made by this process so far, by every reader in it. A loader's iterator reports the difference
    from its start (an in-process loader after another, or a test after a test, counts only its own); the
    loader sums its workers' for ``data/retries``."""
    return _count


def is_remote(url: str) -> bool:
    """Whether ``url`` is read over a network or a command (its mid-read failures are retried)."""
    return url.startswith(REMOTE_PREFIXES)


def note_retry(url: str, attempt: int, policy: RetryPolicy, samples: int, reason: str) -> float:
    """Count and log retry ``attempt`` of the shard at ``url`` (``samples`` read so far); the seconds to wait."""
    global _count
    with _lock:
        _count += 1
    delay = policy.delay(attempt)
    log.warning("shard %s broke off after %d samples (%s); retry %d of %d in %.1f s, from the next unread member",
                url, samples, reason, attempt, policy.retries, delay)
    return delay


def seekable(url: str) -> bool:
    """Whether a shard can be opened at a byte offset: local files (``seek``), ``http(s)://`` (an HTTP Range
    request) and ``s3://`` (a ranged GET); not ``pipe:`` commands."""
    return not url.startswith("pipe:")


CURL = ("curl", "--connect-timeout", "30", "--retry", "30", "--retry-delay", "2", "-f", "-s", "-L")
"""The ``curl`` command of webdataset's ``gopen`` for ``http(s)://`` (``gopen_curl``): the same options here."""

CURL_EXIT = {6: "could not resolve the host", 7: "could not connect to the host", 18: "the transfer ended early "
             "(the server or the connection closed it)", 22: "the server answered with an HTTP error such as 404 "
             "or 403", 28: "timed out", 33: "the server ignored the byte range asked for", 35: "TLS handshake "
             "failed", 52: "empty reply", 56: "the connection broke off"}
"""What curl's exit statuses mean (curl's man page, "EXIT CODES"), for the messages naming a failed shard."""

_STOPPED = (-13, 141, 23)
"""Exit statuses of a command stopped by closing its output early: SIGPIPE (as a signal, or 128+13 from a
shell) and curl's write error (23). Not a failure: the reader chose to stop."""


class CommandStream:
    """A read-only binary stream of a command's standard output (``curl`` for ``http(s)://``, the shell for
    ``pipe:``).

    webdataset's ``gopen.Pipe`` raises from ``read`` as soon as the command has exited non-zero, even while
    the pipe still holds output it wrote before failing: a download cut mid-shard could lose everything
    it delivered, and be reported as unreadable from its first byte. Here every byte the command wrote is
    read first; its failure is then raised as ``OSError(failure)`` at the end of the output (``read``
    returning nothing) and again from :meth:`close`. ``failure`` names the command and its exit status,
    with curl's meaning of it (:data:`CURL_EXIT`). A command stopped by :meth:`close` before its output
    was read to the end (exit statuses in :data:`_STOPPED`, or killed after ``close_timeout_s``) has not
    failed.

    Args:
        args: the command (a list, or a string with ``shell=True``).
        name: how messages name the command (``curl``, or the quoted ``pipe:`` command).
        shell: run ``args`` through ``/bin/sh -c`` (``pipe:`` URLs, as webdataset does).
        close_timeout_s: seconds :meth:`close` waits for a command whose output was not read to its end.
    """

    def __init__(self, args: Union[str, Sequence[str]], *, name: str, shell: bool = False,
                 close_timeout_s: float = 10.0):
        self.name, self.close_timeout_s = name, close_timeout_s
        self.failure: Optional[str] = None
        """``curl exited with status 18: the transfer ended early ...`` once the command is known to have
        failed; None while it runs or when it succeeded."""
        self._proc = subprocess.Popen(args, stdout=subprocess.PIPE, shell=shell)
        self._out, self._ended = self._proc.stdout, False

    @property
    def closed(self) -> bool:
        return self._out.closed

    def readable(self) -> bool:
        return True

    def read(self, size: Optional[int] = -1) -> bytes:
        """Up to ``size`` bytes (all that is left with -1 or None); ``b""`` at the end of a command that
        succeeded. Raises ``OSError(failure)`` at the end of the output of a command that failed."""
        data = self._out.read(size)
        if not data and size != 0:
            self._ended = True
            self._judge(self._proc.wait())
        return data

    def _judge(self, status: int) -> None:
        if status != 0 and self.failure is None:
            if status < 0:
                self.failure = f"{self.name} was killed by signal {-status}"
            else:
                hint = CURL_EXIT.get(status) if self.name == "curl" else None
                self.failure = f"{self.name} exited with status {status}" + (f": {hint}" if hint else "")
        if self.failure is not None:
            raise OSError(self.failure)

    def close(self) -> None:
        """Close the output and wait for the command; raises ``OSError(failure)`` when it failed (see the
        class docstring). Closing again does nothing."""
        if self._out.closed:
            return
        self._out.close()
        try:
            status = self._proc.wait(None if self._ended else self.close_timeout_s)
        except subprocess.TimeoutExpired:  # still running (retrying a connection) while nobody reads it
            self._proc.kill()
            self._proc.wait()
            return
        if not self._ended and status in _STOPPED:
            return
        self._judge(status)

    def __enter__(self) -> "CommandStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # nothing can report it here; the reader saw it from read() or close()
            pass


def pipe_command(url: str) -> str:
    """How messages name the command of a ``pipe:`` URL: quoted, at most 80 characters."""
    return f"'{url[5:][:80]}'"


def open_shard(url: str, offset: int = 0) -> BinaryIO:
    """A binary stream of the shard at ``url`` from byte ``offset`` on (see the module docstring; ``offset`` > 0
    needs :func:`seekable`). ``http(s)://`` and ``pipe:`` give a :class:`CommandStream`. Errors propagate:
    ``OSError`` (a missing file, a command that failed), ``ValueError`` (webdataset: an unknown scheme, a seek
    in a pipe), :class:`~tldist.errors.DataError` (S3)."""
    if url.startswith("s3://"):
        return open_object(url, offset)
    if url.startswith(("http://", "https://")):
        # -C (not -r) for an offset: curl fails (exit 33) instead of passing on the whole file when the server
        # ignores the range
        return CommandStream([*CURL, *(("-C", str(offset)) if offset else ()), url], name="curl")
    if url.startswith("pipe:"):
        if offset:
            raise ValueError(f"cannot seek in a pipe: shard '{url}'")
        return CommandStream(url[5:], name=pipe_command(url), shell=True)
    if offset:
        f = open(url[7:] if url.startswith("file://") else url, "rb")
        f.seek(offset)
        return f
    return gopen(url, "rb")
