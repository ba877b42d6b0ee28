"""Opening shard streams, and retrying the remote ones that break off mid-read.

:func:`open_shard` opens any shard URL tldist reads: a local path, ``http(s)://`` (webdataset's
``gopen``: ``curl``), ``pipe:<command>`` and ``s3://bucket/key`` (boto3, the ``s3`` extra; see :mod:`tldist.s3`).

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
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO

from webdataset.gopen import Pipe, gopen

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


def open_shard(url: str, offset: int = 0) -> BinaryIO:
    """A binary stream of the shard at ``url`` from byte ``offset`` on (see the module docstring; ``offset`` > 0
    needs :func:`seekable`); errors propagate (``OSError``, ``ValueError`` from webdataset,
    :class:`~tldist.errors.DataError` for S3)."""
    if url.startswith("s3://"):
        return open_object(url, offset)
    if offset and url.startswith(("http://", "https://")):  # webdataset's curl command, with a Range header
        # -C (not -r): curl fails (exit 33) instead of passing on the whole file when the server ignores the range
        return Pipe(["curl", "--connect-timeout", "30", "--retry", "30", "--retry-delay", "2", "-f", "-s", "-L",
                     "-C", str(offset), url], mode="rb", bufsize=8192, ignore_status=[141, 23])
    if offset:
        if url.startswith("pipe:"):
            raise ValueError(f"cannot seek in a pipe: shard '{url}'")
        f = open(url[7:] if url.startswith("file://") else url, "rb")
        f.seek(offset)
        return f
    return gopen(url, "rb")
