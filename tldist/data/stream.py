"""A global sample order that does not depend on the topology, over WebDataset shards.

Everything here is pure arithmetic on the manifest's per-shard counts plus a raw tar reader; nothing
is decoded. The order follows MosaicML Streaming's "elastic determinism" (a fixed number of canonical
partitions, mapped onto whatever ranks and workers exist); the vocabulary:

* **stream-epoch k** of a source: the shard order is ``default_rng([seed, k, source]).permutation(shards)``
  and the samples concatenated in that order are cut into ``C`` contiguous **partitions** (``data.partitions``;
  partition ``c`` covers ``[c*L + min(c, R), ...)`` with ``L, R = divmod(N, C)``: lengths differ by one at
  most, and every sample is read exactly once per stream-epoch).
* **partition stream**: partition ``c`` of stream-epochs 0, 1, 2... concatenated, read in blocks of
  ``block`` raw records emitted in the order ``default_rng([seed, k, c, b, source]).permutation`` (raw bytes
  are shuffled, decoding comes later). Position ``p`` of a partition stream is found in O(1): its
  stream-epoch, block and offset follow from ``p``; seeking re-reads at most one block of one shard.
  In resampled mode a partition stream is a sequence of **visits** of a fixed length ``V`` (the mean shard
  count rounded up to whole blocks): visit ``v`` reads ``V`` samples in manifest order from the start of
  the shard ``default_rng([seed, tag, c, v, source]).choice(shards, p=counts/N)`` (with replacement,
  proportional to sample counts, as webdataset's ``resampled=True``), continuing into the next shards when
  that one is shorter. Position ``p`` is visit ``p // V``: found in O(1), and read sequentially.
* **mixtures**: draw ``p`` of partition ``c`` takes its sample from one source, chosen by a stratified
  permutation of each chunk of :data:`MIXTURE_CHUNK` draws (each source's share of a chunk is its
  weight, rounded by largest remainder), so the source of draw ``p`` and its position in that source's
  partition stream both follow from ``p`` (:class:`MixtureCursor`).
* **global sample** ``t`` is draw ``t // C`` of partition ``t % C``. Global step ``j`` of a run holds the
  samples ``t`` in ``[t0 + j*G, t0 + (j+1)*G)`` (``G`` = global batch, ``t0`` the run's start), whatever the
  number of ranks, micro-batches and loader workers: micro-batch ``k`` of rank ``r`` takes every ``V``-th of
  them from ``k*world + r`` on (``V = world x accum``), and the partition of ``t`` is read by exactly one loader
  worker of that rank (:class:`GlobalLayout`).
* **record**: one raw sample (member bytes by extension) or a *failed* record standing for a
  sample that could not be read (unreachable or truncated shard). Every shard always yields
  exactly its manifest count of records, so positions never drift.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
from webdataset.tariterators import base_plus_ext

from tldist.data.labels import LabelRule
from tldist.data.retry import RetryPolicy, current_policy, is_remote, note_retry, open_shard, seekable
from tldist.data.tar import iter_members
from tldist.errors import ConfigError

log = logging.getLogger("tldist.data")

RESAMPLED_TAG = 0x5E5A  # keeps resampled-mode seeds apart from stream-epoch seeds
MIXTURE_TAG = 0x31C5
MIXTURE_CHUNK = 4096
"""Mixture draws are planned in chunks of this many: each source's share of a chunk is its weight (rounded),
so seeking to any draw costs one chunk, however far into training it is."""
BLOCK_CACHE = 8
"""Shuffle blocks kept per partition reader and source, for draws visited out of order within one step."""
SUBSTITUTE_REACH = 64
"""Records past a shuffle block (then records drawn at random) that may stand in for one that does not decode."""
SUBSTITUTE_TAG = 0x5B57  # keeps the random substitutes' seeds apart
DEFAULT_PARTITIONS = 240
"""``data.partitions`` when left at 0: 240 = 2^4 * 3 * 5, divisible by every world size of 1-6, 8, 10, 12, 15,
16, 20, 24, 30, 40, 48, 60, 80, 120 and 240 ranks, capped at the smallest source's sample count."""


@dataclass(frozen=True)
class SourceSpec:
    """One shard set as the streams see it: where the shards are and how many samples each holds."""

    name: str
    """Manifest location (used in messages and checkpoints)."""
    urls: tuple[str, ...]
    """Shard URLs in manifest order (local path, ``http(s)://`` or ``pipe:``)."""
    counts: tuple[int, ...]
    """Samples per shard, from the manifest."""
    offsets: tuple[tuple[tuple[int, int], ...], ...] = ()
    """Per shard, the manifest's sparse seek index ``((sample, byte offset), ...)`` (every 64th sample's first
    header; empty for a shard without one): a read that skips samples starts at the nearest entry."""
    labels: Optional[LabelRule] = None
    """How this set stores labels and images (the manifest's rule; None: ``.cls``, or the URL's registered rule)."""
    policy: Optional[RetryPolicy] = None
    """Retries of remote shards that break off (``data.read_retries``; None: the process default)."""

    @property
    def num_samples(self) -> int:
        return int(sum(self.counts))

    @property
    def num_shards(self) -> int:
        return len(self.urls)


class Record:
    """One raw sample: ``fields`` maps extension -> bytes; ``fields is None`` marks a failed read."""

    __slots__ = ("key", "url", "fields", "error")

    def __init__(self, key: Optional[str], url: str, fields: Optional[dict[str, bytes]], error: Optional[str] = None):
        self.key, self.url, self.fields, self.error = key, url, fields, error

    @property
    def ok(self) -> bool:
        return self.fields is not None

    def __repr__(self) -> str:
        return f"Record({self.key!r}, {self.url!r}, {'ok' if self.ok else self.error})"

    def describe(self) -> str:
        """``sample 'key'`` for log lines; ``an unread sample`` for a failed read (its key is unknown)."""
        return f"sample '{self.key}'" if self.key is not None else "an unread sample"


class Throttle:
    """Rate-limited warnings: the first ``first`` messages, then at most one per ``every`` seconds; a message
    given a ``key`` already warned about (a shard read again, e.g. for substitutes) is only counted."""

    def __init__(self, first: int = 10, every: float = 30.0):
        self.first, self.every, self.sent, self.suppressed, self.last = first, every, 0, 0, 0.0
        self.keys: set[str] = set()

    def warn(self, msg: str, key: Optional[str] = None) -> None:
        if key is not None:
            if key in self.keys:
                self.suppressed += 1
                return
            self.keys.add(key)
        now = time.monotonic()
        if self.sent < self.first or now - self.last >= self.every:
            extra = f" ({self.suppressed} similar warnings suppressed)" if self.suppressed else ""
            log.warning(msg + extra)
            self.sent, self.suppressed, self.last = self.sent + 1, 0, now
        else:
            self.suppressed += 1


_throttle = Throttle()


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) for p in parts])


# ---------------------------------------------------------------------------------------
# Split arithmetic (manifest counts only; no I/O)
# ---------------------------------------------------------------------------------------

def shard_order(num_shards: int, seed: int, epoch: int, source: int = 0) -> np.ndarray:
    """Shard permutation of stream-epoch ``epoch``; identical on every rank and worker."""
    return _rng(seed, epoch, *([source] if source else [])).permutation(num_shards)


def slot_range(total: int, slot: int, num_slots: int) -> tuple[int, int]:
    """Global sample range ``[lo, hi)`` of ``slot`` in a concatenation of ``total`` samples."""
    return slot * total // num_slots, (slot + 1) * total // num_slots


def range_segments(counts: Sequence[int], order: Sequence[int], lo: int, hi: int) -> list[tuple[int, int, int]]:
    """``(shard, skip, take)`` triples covering global samples ``[lo, hi)`` of shards in ``order``.

    Shards wholly before ``lo`` are skipped by count without being opened.
    """
    segments, start = [], 0
    for shard in order:
        n = int(counts[shard])
        end = start + n
        if end > lo and start < hi and n > 0:
            skip = max(lo - start, 0)
            segments.append((int(shard), skip, min(hi, end) - start - skip))
        if end >= hi:
            break
        start = end
    return segments


# ---------------------------------------------------------------------------------------
# Raw tar reading: exactly `take` records from a shard, starting after `skip` samples
# ---------------------------------------------------------------------------------------

def read_shard(url: str, skip: int, take: int, *, policy: Optional[RetryPolicy] = None,
               offsets: Sequence[Sequence[int]] = ()) -> Iterator[Record]:
    """Yield exactly ``take`` records of the shard at ``url``, skipping its first ``skip`` samples.

    With a seek index (``offsets``: ``(sample, byte offset)`` pairs, the manifest's, sorted) and a seekable URL
    (a local file, ``http(s)://`` through a Range request, ``s3://``), reading starts at the byte offset of the
    nearest indexed sample at or before ``skip``, so a resume mid-shard re-reads at most 63 samples' bytes;
    otherwise skipped samples' members are passed over in the tar stream without being extracted.
    Members are grouped into samples by key (consecutive ``<key>.<ext>`` files). A remote shard
    (``http(s)://``, ``pipe:``, ``s3://``) that breaks off after delivering data is re-opened and
    read on from its next unread member (those before it are passed over, not kept twice), at most
    ``policy.retries`` times with exponential backoff (default :func:`tldist.data.retry.current_policy`:
    ``data.read_retries``, ``data.retry_backoff_s``); each retry is logged and counted
    (:func:`tldist.data.retry.retry_count`). If the shard cannot be opened or still ends early
    (truncated), the missing samples become failed records and one rate-limited warning names the shard.
    """
    if take <= 0:
        return
    policy = policy if policy is not None else current_policy()
    first, offset = 0, 0  # the sample the stream starts at, and its byte offset
    if skip and offsets and seekable(url):
        for sample, byte in offsets:
            if sample > skip:
                break
            first, offset = int(sample), int(byte)
    produced, stream, error, attempt = 0, None, None, 0
    key, fields = None, None  # the sample being assembled from consecutive members
    index, last_key = first - 1, None  # sample index of the member being looked at (select_files order)
    done, seen = 0, 0  # members consumed over all attempts / members offered in this attempt

    def select(fname: str) -> bool:
        # Called for each member before its bytes are read: returning False skips the bytes.
        nonlocal index, last_key, seen, done
        seen += 1
        if seen <= done:  # consumed before a retry re-opened the shard: pass over it again
            return False
        prefix = base_plus_ext(fname)[0]
        if prefix is None:
            done = seen
            return False
        if prefix != last_key:
            index, last_key = index + 1, prefix
        if index < skip:
            done = seen
            return False
        return True  # the first member past the range is read once, then we stop

    while True:
        seen, detail = 0, None
        try:
            stream = open_shard(url, offset)
            for fname, data in iter_members(stream, select):
                done = seen
                prefix, ext = base_plus_ext(fname)
                if prefix != key:
                    if fields is not None:  # a sample is complete when the next key starts
                        yield Record(key, url, fields)
                        produced += 1
                        if produced == take:
                            return
                    key, fields = prefix, {}
                fields[ext.lower()] = data
            # a pipe/curl whose command failed looks like an early end of the stream: ask it
            detail, stream = _close(stream), None
            if detail is None:  # the real end of the shard
                if fields is not None:
                    yield Record(key, url, fields)
                    produced += 1
                if produced < take:
                    error = (f"is shorter than its manifest entry: it ends after {skip + produced} samples, the "
                             f"manifest counts at least {skip + take}")
                break
        except GeneratorExit:
            raise
        except Exception as e:  # unreachable, truncated mid-member, bad tar header, connection reset...
            failed = _close(stream) if stream is not None else None
            stream = None
            detail = failed or f"{type(e).__name__}: {e}"
        finally:
            if stream is not None:
                try:
                    stream.close()
                except Exception:  # a pipe closed early exits non-zero; nothing to report
                    pass
            stream = None
        delivered = bool(seen or done)  # members came through before the failure
        if offset and not delivered:  # opening at the seek offset failed (a server ignoring HTTP Range)
            offset, index, last_key = 0, -1, None  # read the shard from its start instead
            continue
        if is_remote(url) and delivered and attempt < policy.retries:
            attempt += 1
            time.sleep(note_retry(url, attempt, policy, skip + produced, detail))
            continue
        error = (f"broke off after {skip + produced} samples ({detail})" if delivered else
                 f"cannot be read ({detail})")
        if fields:  # members read before the error form a (possibly incomplete) sample
            yield Record(key, url, fields)
            produced += 1
        break
    missing = take - produced
    if missing > 0:
        _throttle.warn(key=url, msg=f"shard {url} {error}; {missing} of its samples are counted as failed "
                       f"(check it with 'tldist shards verify')")
        for _ in range(missing):
            yield Record(None, url, None, f"the shard {error}")


def _close(stream) -> Optional[str]:
    """Close a shard stream; why it failed (a command that exited non-zero, see
    :class:`~tldist.data.retry.CommandStream`), else None."""
    try:
        stream.close()
    except Exception as e:
        return getattr(stream, "failure", None) or f"{type(e).__name__}: {e}"
    return getattr(stream, "failure", None)


def read_segments(source: SourceSpec, segments) -> Iterator[Record]:
    """Chain :func:`read_shard` over ``(shard, skip, take)`` segments (with the set's seek index and retries)."""
    for shard, skip, take in segments:
        yield from read_shard(source.urls[shard], skip, take, policy=source.policy,
                              offsets=source.offsets[shard] if source.offsets else ())


# ---------------------------------------------------------------------------------------
# Partitions: the canonical, topology-free cut of every stream-epoch
# ---------------------------------------------------------------------------------------

def partition_bounds(total: int, part: int, parts: int) -> tuple[int, int]:
    """``[lo, hi)`` of partition ``part`` of ``parts`` over ``total`` samples (lengths differ by one at most)."""
    base, rest = divmod(total, parts)
    lo = part * base + min(part, rest)
    return lo, lo + base + (1 if part < rest else 0)


class PartitionStream:
    """Infinite, seekable stream of the raw records of one partition of one source.

    ``records(start)`` yields ``(position, record)`` for positions ``start, start+1, ...``; the stream from
    ``p`` equals the tail of the stream from 0. Seeking re-reads at most one block of one shard.
    """

    def __init__(self, source: SourceSpec, part: int, parts: int, *, seed: int, block: int, resampled: bool = False,
                 source_index: int = 0):
        if block <= 0:
            raise ConfigError(f"shuffle block {block} must be > 0 (data.shuffle_buffer / data.partitions)")
        total = source.num_samples
        if total < parts:
            raise ConfigError(f"shard set '{source.name}' has {total} samples, fewer than data.partitions={parts}: "
                              f"set data.partitions to at most {total}")
        self.source, self.part, self.parts = source, part, parts
        self.seed, self.block, self.resampled, self.src = seed, block, resampled, source_index
        self.lo, self.hi = partition_bounds(total, part, parts)
        self.length = self.hi - self.lo
        """Samples of this partition per stream-epoch."""
        self._cdf = np.cumsum(source.counts, dtype=np.int64)  # resampled draws: shard ends in manifest order

    def _extra(self) -> list[int]:
        return [self.src] if self.src else []

    # -- epoch mode ---------------------------------------------------------------------
    def epoch_segments(self, epoch: int, start: int = 0) -> list[tuple[int, int, int]]:
        """``(shard, skip, take)`` of this partition in stream-epoch ``epoch``, from offset ``start``."""
        order = shard_order(self.source.num_shards, self.seed, epoch, self.src)
        return range_segments(self.source.counts, order, self.lo + start, self.hi)

    def block_order(self, epoch: int, block: int, n: int) -> np.ndarray:
        """The emission order of the ``n`` records of block ``block`` of stream-epoch ``epoch`` (a draw index in
        resampled mode)."""
        if self.resampled:
            return _rng(self.seed, RESAMPLED_TAG, self.part, block, 1, *self._extra()).permutation(n)
        return _rng(self.seed, epoch, self.part, block, *self._extra()).permutation(n)

    def blocks(self, start: int = 0) -> Iterator[tuple[int, list[Record], np.ndarray]]:
        """``(position of the block's first record, its raw records, their emission order)`` from the block that
        holds position ``start`` on, forever."""
        if start < 0:
            raise ValueError(f"stream position {start} < 0")
        if self.resampled:
            yield from self._resampled_blocks(start)
            return
        n, p = self.length, start
        nblocks = (n + self.block - 1) // self.block
        while True:
            epoch, offset = divmod(p, n)
            first = offset // self.block
            # one reader for the rest of this epoch's range, starting at the block boundary
            raw = read_segments(self.source, self.epoch_segments(epoch, first * self.block))
            for b in range(first, nblocks):
                size = min(self.block, n - b * self.block)
                recs = [next(raw) for _ in range(size)]  # raw bytes of one block, no decode
                yield epoch * n + b * self.block, recs, self.block_order(epoch, b, size)
            raw.close()
            p = (epoch + 1) * n

    def records(self, start: int = 0) -> Iterator[tuple[int, Record]]:
        """Yield ``(position, record)`` forever, starting at position ``start``."""
        for base, recs, order in self.blocks(start):
            for j in range(max(start - base, 0), len(recs)):
                yield base + j, recs[order[j]]

    # -- resampled mode -----------------------------------------------------------------
    @property
    def visit_length(self) -> int:
        """Samples per resampled visit: the mean shard count rounded up to whole blocks (a multiple of ``block``)."""
        mean = -(-self.source.num_samples // self.source.num_shards)
        return self.block * -(-mean // self.block)

    def visit_shard(self, visit: int) -> int:
        """The shard resampled visit ``visit`` starts at: drawn with probability proportional to its sample count
        (inverse CDF of one uniform from ``default_rng([seed, tag, partition, visit, source])``, O(log shards)),
        so any visit is found without replaying the earlier ones."""
        u = _rng(self.seed, RESAMPLED_TAG, self.part, visit, *self._extra()).random()
        return min(int(np.searchsorted(self._cdf, u * self._cdf[-1], side="right")), len(self._cdf) - 1)

    def _resampled_blocks(self, start: int) -> Iterator[tuple[int, list[Record], np.ndarray]]:
        total, V = self.source.num_samples, self.visit_length
        order = range(self.source.num_shards)
        v, first = divmod(start // self.block * self.block, V)
        while True:  # visit v: V samples in manifest order from its shard's first, wrapping around the set's end
            shard = self.visit_shard(v)
            shard_lo = int(self._cdf[shard]) - self.source.counts[shard]
            a, end = shard_lo + first, shard_lo + V
            segs = []
            while a < end:  # [a, end) modulo the set (a visit longer than the set wraps more than once)
                lo = a % total
                hi = min(total, lo + end - a)
                segs += range_segments(self.source.counts, order, lo, hi)
                a += hi - lo
            raw = read_segments(self.source, segs)
            for off in range(first, V, self.block):
                recs = [next(raw) for _ in range(self.block)]
                blk = (v * V + off) // self.block
                yield blk * self.block, recs, self.block_order(0, blk, self.block)
            raw.close()
            v, first = v + 1, 0


# ---------------------------------------------------------------------------------------
# Mixtures: which source each draw of a partition comes from, seekable in O(1)
# ---------------------------------------------------------------------------------------

def chunk_shares(weights: Sequence[float], chunk: int = MIXTURE_CHUNK) -> list[int]:
    """Each source's number of draws in a chunk of ``chunk``: ``weight * chunk`` rounded by largest remainder
    (so the shares sum to ``chunk``; a weight below ``1 / chunk`` may get none)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * chunk
    shares = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - shares), kind="stable")[: chunk - int(shares.sum())]:
        shares[i] += 1
    return [int(n) for n in shares]


class MixtureCursor:
    """The source of each draw of partition ``part`` (``(source, position in that source's partition stream)``
    for draws ``start, start+1, ...``), from a stratified permutation of each chunk of draws keyed by
    ``(seed, part, chunk)``: seeking costs one chunk, each further draw O(1)."""

    def __init__(self, weights: Sequence[float], seed: int, part: int, start: int = 0):
        self.shares = chunk_shares(weights)
        self.seed, self.part = seed, part
        self._plan = np.repeat(np.arange(len(self.shares)), self.shares)
        self.chunk, offset = divmod(start, MIXTURE_CHUNK)
        self._load(self.chunk)
        self.next_pos = [self.chunk * n for n in self.shares]
        for s in self._choices[:offset]:
            self.next_pos[s] += 1
        self.offset = offset

    def _load(self, chunk: int) -> None:
        perm = _rng(self.seed, self.part, MIXTURE_TAG, chunk).permutation(MIXTURE_CHUNK)
        self._choices = self._plan[perm].tolist()

    def __next__(self) -> tuple[int, int]:
        if self.offset == MIXTURE_CHUNK:
            self.chunk, self.offset = self.chunk + 1, 0
            self._load(self.chunk)
        s = self._choices[self.offset]
        self.offset += 1
        pos = self.next_pos[s]
        self.next_pos[s] += 1
        return s, pos

    def __iter__(self) -> "MixtureCursor":
        return self


class PartitionReader:
    """The draws of one partition across every source (mixture), read forward from any position.

    ``at(p)`` returns draw ``p``: ``(source, position in the source's partition stream, record)``, for
    ``p`` read forward (draws in between are passed over without decoding; the micro-batches of one step may go
    back a few draws, to blocks still held). ``substitutes(p)`` yields the
    other records of draw ``p``'s block, for a record that does not decode (same on every topology).
    """

    def __init__(self, streams: Sequence[PartitionStream], weights: Sequence[float], seed: int, part: int):
        self.streams, self.weights, self.seed, self.part = list(streams), list(weights), seed, part
        self._mix: Optional[MixtureCursor] = None
        self._p = -1
        self._blocks: list[Optional[Iterator]] = [None] * len(self.streams)
        self._current: list[Optional[tuple[int, list[Record], np.ndarray]]] = [None] * len(self.streams)
        # the last blocks read, per source: the micro-batches of one optimizer step visit a partition's draws out
        # of order (GlobalLayout), within about (global batch / partitions) draws
        self._recent = [collections.deque(maxlen=BLOCK_CACHE) for _ in self.streams]
        self._last: tuple[int, int] = (0, 0)

    def _draw(self, p: int) -> tuple[int, int]:
        if len(self.streams) == 1:
            return 0, p
        if self._mix is None or p < self._p:
            self._mix = MixtureCursor(self.weights, self.seed, self.part, p)
            self._p = p
        while self._p < p:  # passed-over draws
            next(self._mix)
            self._p += 1
        self._p += 1
        return next(self._mix)

    def _block(self, s: int, pos: int) -> tuple[int, list[Record], np.ndarray]:
        cur = self._current[s]
        if cur is None or not (cur[0] <= pos < cur[0] + len(cur[1])):
            cached = next((b for b in self._recent[s] if b[0] <= pos < b[0] + len(b[1])), None)
            if cached is not None:  # a step's later micro-batch going back to a draw before the last one read
                self._current[s] = cached
                return cached
            if cur is None or pos < cur[0] or self._blocks[s] is None:
                self._blocks[s] = self.streams[s].blocks(pos)
            while True:
                cur = next(self._blocks[s])
                self._recent[s].append(cur)
                if pos < cur[0] + len(cur[1]):
                    break
            self._current[s] = cur
        return cur

    def at(self, p: int) -> tuple[int, int, Record]:
        """Draw ``p`` of this partition: ``(source, source position, record)``."""
        s, pos = self._draw(p)
        base, recs, order = self._block(s, pos)
        self._last = (s, pos)
        return s, pos, recs[order[pos - base]]

    def substitutes(self) -> Iterator[Record]:
        """Replacements for the last draw's record when it does not decode, nearest first: the other records of
        its block in emission order (wrapping around), then the next :data:`SUBSTITUTE_REACH` records of its
        partition stream (a block of one record has no neighbour), then as many samples of the set drawn at
        random (a missing shard holds a whole partition's range). The same on every topology."""
        s, pos = self._last
        base, recs, order = self._block(s, pos)
        j = pos - base
        for k in range(1, len(recs)):
            yield recs[order[(j + k) % len(recs)]]
        ahead = self.streams[s].records(base + len(recs))  # a separate reader: the draws' own stays where it is
        try:
            for _, rec in itertools.islice(ahead, SUBSTITUTE_REACH):
                yield rec
        finally:
            ahead.close()
        # a whole unreadable neighbourhood (a missing or truncated shard): samples of the set drawn at random,
        # keyed by (seed, partition, position), each found with one seek
        src = self.streams[s].source
        rng = _rng(self.seed, SUBSTITUTE_TAG, self.part, pos, s)
        for i in rng.integers(src.num_samples, size=SUBSTITUTE_REACH):
            yield from read_segments(src, range_segments(src.counts, range(src.num_shards), int(i), int(i) + 1))


# ---------------------------------------------------------------------------------------
# The layout: global samples -> (rank, loader worker, micro-batch row)
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GlobalLayout:
    """How the global sample order meets this job's topology (see the module docstring).

    ``partitions`` (C) and ``origin`` (``t0``, the global sample the run started or resumed at) fix the order;
    ``world``, ``workers``, ``batch`` and ``accum`` only decide who reads which sample.

    Micro-batch ``k`` (of ``accum``) of rank ``r`` in optimizer step ``j`` is *virtual rank* ``v = k*world + r`` of
    ``V = world * accum``: its row ``i`` is global sample ``t0 + j*G + i*V + v`` (``G = V * batch``). So a step's
    micro-batches hold the same samples, with the same companions (BatchNorm statistics), whether they run
    as 2 ranks x 1 micro-batch or 1 rank x 2 micro-batches; and rank ``r`` only ever reads samples
    ``t = r (mod world)``, so with ``world`` dividing ``C`` no partition is read by two ranks.
    """

    partitions: int
    world: int
    rank: int
    workers: int
    batch: int
    origin: int = 0
    accum: int = 1

    def sample(self, i: int) -> int:
        """Global sample ``t`` of this rank's local index ``i`` (micro-batch ``n = i // batch``, row ``i % batch``)."""
        n, row = divmod(i, self.batch)
        step, k = divmod(n, self.accum)
        virtual = self.world * self.accum
        return self.origin + step * virtual * self.batch + row * virtual + k * self.world + self.rank

    def partition(self, t: int) -> tuple[int, int]:
        """``(partition, draw)`` of global sample ``t``."""
        return t % self.partitions, t // self.partitions

    def worker_of(self, part: int) -> int:
        """The loader worker of this rank that reads partition ``part``. A partition belongs to one rank when
        ``world`` divides ``C``; otherwise its draws are shared by ``world / gcd(world, C)`` ranks, each reading
        past the others' (see :meth:`read_factor`)."""
        return (part // math.gcd(self.world, self.partitions)) % self.workers

    def read_factor(self) -> int:
        """Raw records read per sample used: 1 when ``world`` divides ``C``, else ``world / gcd(world, C)``."""
        return self.world // math.gcd(self.world, self.partitions)

    def rows(self, micro: int, worker: int) -> list[tuple[int, int, int]]:
        """``(row, partition, draw)`` of the rows of micro-batch ``micro`` that loader worker ``worker`` produces."""
        out = []
        for row in range(self.batch):
            part, draw = self.partition(self.sample(micro * self.batch + row))
            if self.worker_of(part) == worker:
                out.append((row, part, draw))
        return out
