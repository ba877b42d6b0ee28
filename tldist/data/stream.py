"""Deterministic, seekable per-slot record streams over WebDataset shards.

Everything here is pure arithmetic on the manifest's per-shard counts plus a raw tar
reader; nothing is decoded. The vocabulary used by the loaders:

* **slot**: one (rank, worker) pair, ``slot = rank * W + worker`` of ``S = world * W``.
* **stream-epoch k**: the shard order is ``default_rng([seed, k]).permutation(shards)`` (same
  on every rank, drawn *before* splitting); the samples concatenated in that order are split
  into ``S`` contiguous ranges ``[i*N//S, (i+1)*N//S)``, so every sample is read exactly once
  per stream-epoch and slot sizes differ by at most one (no rank runs dry: no DDP hang).
* **block**: ``block_size`` consecutive raw records of a slot's range, emitted in the order
  ``default_rng([seed, k, slot, b]).permutation`` (raw bytes are shuffled, decoding comes later).
* **position**: index into a slot's infinite stream (ranges of k = 0, 1, 2... concatenated).
  Seeking to ``p`` re-reads only the block that contains ``p``.
* **record**: one raw sample (member bytes by extension) or a *failed* record standing for a
  sample that could not be read (unreachable or truncated shard). Every shard always yields
  exactly its manifest count of records, so positions never drift.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from tldist.data.tar import iter_members
from tldist.errors import ConfigError

log = logging.getLogger("tldist.data")

RESAMPLED_TAG = 0x5E5A  # keeps resampled-mode seeds apart from stream-epoch seeds
MIXTURE_TAG = 0x31C5
MIXTURE_CHUNK = 4096  # mixture choices are drawn in chunks keyed by chunk index: O(1) seek


@dataclass(frozen=True)
class SourceSpec:
    """One shard set as the streams see it: where the shards are and how many samples each holds."""

    name: str
    """Manifest location (used in messages and checkpoints)."""
    urls: tuple[str, ...]
    """Shard URLs in manifest order (local path, ``http(s)://`` or ``pipe:``)."""
    counts: tuple[int, ...]
    """Samples per shard, from the manifest."""

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
    """Rate-limited warnings: the first ``first`` messages, then at most one per ``every`` seconds."""

    def __init__(self, first: int = 10, every: float = 30.0):
        self.first, self.every, self.sent, self.suppressed, self.last = first, every, 0, 0, 0.0

    def warn(self, msg: str) -> None:
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

def read_shard(url: str, skip: int, take: int) -> Iterator[Record]:
    """Yield exactly ``take`` records of the shard at ``url``, skipping its first ``skip`` samples.

    Skipped samples' members are passed over in the tar stream without being extracted.
    Members are grouped into samples by key (consecutive ``<key>.<ext>`` files). If the shard
    cannot be opened or ends early (truncated), the missing samples become failed records
    and one rate-limited warning names the shard.
    """
    if take <= 0:
        return
    produced, stream, error = 0, None, None
    key, fields = None, None  # the sample being assembled from consecutive members
    index, last_key = -1, None  # sample index of the member being looked at (select_files order)

    def select(fname: str) -> bool:
        # Called for each member before its bytes are read: returning False skips the bytes.
        nonlocal index, last_key
        prefix = base_plus_ext(fname)[0]
        if prefix is None:
            return False
        if prefix != last_key:
            index, last_key = index + 1, prefix
        return index >= skip  # the first member past the range is read once, then we stop

    try:
        stream = gopen(url, "rb")
        for fname, data in iter_members(stream, select):
            prefix, ext = base_plus_ext(fname)
            if prefix != key:
                if fields is not None:  # a sample is complete when the next key starts
                    yield Record(key, url, fields)
                    produced += 1
                    if produced == take:
                        return
                key, fields = prefix, {}
            fields[ext.lower()] = data
        if fields is not None:
            yield Record(key, url, fields)
            produced += 1
        if produced < take:  # a pipe/curl whose command failed looks like an empty stream: ask it
            failed, stream = _close(stream), None
            error = (f"cannot be read ({failed})" if failed else
                     f"is shorter than its manifest entry: it ends after {skip + produced} samples, the "
                     f"manifest counts at least {skip + take}")
    except GeneratorExit:
        raise
    except Exception as e:  # unreachable, truncated mid-member, bad tar header...
        failed = _close(stream) if stream is not None else None
        stream = None
        detail = failed or f"{type(e).__name__}: {e}"
        error = (f"cannot be read ({detail})" if produced == 0 and not fields else
                 f"broke off after {skip + produced} samples ({detail})")
        if fields:  # members read before the error form a (possibly incomplete) sample
            yield Record(key, url, fields)
            produced += 1
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception:  # a pipe closed early exits non-zero; nothing to report
                pass
    missing = take - produced
    if missing > 0:
        _throttle.warn(f"shard {url} {error}; {missing} of its samples are counted as failed "
                       f"(check it with 'tldist shards verify')")
        for _ in range(missing):
            yield Record(None, url, None, f"the shard {error}")


_CURL_EXIT = {6: "could not resolve the host", 7: "could not connect to the host", 22: "the server answered with an "
              "HTTP error such as 404 or 403", 28: "timed out", 35: "TLS handshake failed", 52: "empty reply",
              56: "the connection broke off"}


def _pipe_failure(stream) -> Optional[str]:
    """``curl exited with status 7: could not connect to the host`` when ``stream`` is a WebDataset
    pipe (``http(s)://`` via curl, ``pipe:``) whose command failed; None otherwise."""
    status = getattr(stream, "status", None)
    if not status:
        return None
    try:
        cmd = stream.args[0][0]
        name = f"'{cmd[:80]}'" if isinstance(cmd, str) else str(cmd[0]).rsplit("/", 1)[-1]  # pipe: / curl
    except (AttributeError, IndexError, TypeError):
        name = "the command"
    hint = _CURL_EXIT.get(status) if name == "curl" else None
    return f"{name} exited with status {status}" + (f": {hint}" if hint else "")


def _close(stream) -> Optional[str]:
    """Close a shard stream; the reason it failed (a pipe's command exiting non-zero), else None."""
    try:
        stream.close()
    except Exception as e:  # webdataset's Pipe raises when its command failed
        return _pipe_failure(stream) or f"{type(e).__name__}: {e}"
    return _pipe_failure(stream)


def read_segments(source: SourceSpec, segments) -> Iterator[Record]:
    """Chain :func:`read_shard` over ``(shard, skip, take)`` segments."""
    for shard, skip, take in segments:
        yield from read_shard(source.urls[shard], skip, take)


# ---------------------------------------------------------------------------------------
# Per-slot infinite stream with block shuffle and seek
# ---------------------------------------------------------------------------------------

class SlotStream:
    """Infinite, seekable stream of records of one source for one slot.

    ``records(start)`` yields ``(position, record)`` for positions ``start, start+1, ...``;
    the stream from ``p`` equals the tail of the stream from 0. In resampled mode shards are
    drawn with replacement (probability proportional to their sample counts) from
    ``default_rng([seed, slot, draw])``; each drawn shard is read whole.
    """

    def __init__(self, source: SourceSpec, slot: int, num_slots: int, *, seed: int, block_size: int,
                 resampled: bool = False, source_index: int = 0):
        if block_size <= 0:
            raise ConfigError(f"data.shuffle_buffer {block_size} must be > 0")
        self.source, self.slot, self.num_slots = source, slot, num_slots
        self.seed, self.block, self.resampled, self.src = seed, block_size, resampled, source_index
        total = source.num_samples
        if total <= 0:
            raise ConfigError(f"shard set '{source.name}' has no samples: check its manifest")
        lo, hi = slot_range(total, slot, num_slots)
        self.length = hi - lo  # samples per stream-epoch for this slot (same every epoch)
        if not resampled and total < num_slots:  # judged for all slots alike: every rank raises it
            raise ConfigError(
                f"shard set '{source.name}' has {total} samples but there are {num_slots} loader slots "
                f"(processes x data.num_workers): lower data.num_workers or use more data")
        if resampled:
            self._probs = np.asarray(source.counts, dtype=np.float64) / total

    def _extra(self) -> list[int]:
        return [self.src] if self.src else []

    # -- epoch mode ---------------------------------------------------------------------
    def epoch_segments(self, epoch: int, start: int = 0) -> list[tuple[int, int, int]]:
        """Segments of this slot's range in stream-epoch ``epoch``, from range offset ``start``."""
        order = shard_order(self.source.num_shards, self.seed, epoch, self.src)
        lo, hi = slot_range(self.source.num_samples, self.slot, self.num_slots)
        return range_segments(self.source.counts, order, lo + start, hi)

    def _block_perm(self, epoch: int, block: int, n: int) -> np.ndarray:
        if self.resampled:
            return _rng(self.seed, RESAMPLED_TAG, self.slot, block, *self._extra()).permutation(n)
        return _rng(self.seed, epoch, self.slot, block, *self._extra()).permutation(n)

    def records(self, start: int = 0) -> Iterator[tuple[int, Record]]:
        """Yield ``(position, record)`` forever, starting at stream position ``start``."""
        if start < 0:
            raise ValueError(f"stream position {start} < 0")
        if self.resampled:
            yield from self._resampled_records(start)
            return
        n, p = self.length, start
        while True:
            epoch, offset = divmod(p, n)
            first_block = offset // self.block
            # one reader for the rest of this epoch's range, starting at the block boundary
            raw = read_segments(self.source, self.epoch_segments(epoch, first_block * self.block))
            for b in range(first_block, (n + self.block - 1) // self.block):
                lo = b * self.block
                size = min(self.block, n - lo)
                recs = [next(raw) for _ in range(size)]  # raw bytes of one block, no decode
                perm = self._block_perm(epoch, b, size)
                base = epoch * n + lo
                for j in range(max(p - base, 0), size):
                    yield base + j, recs[perm[j]]
            raw.close()
            p = (epoch + 1) * n

    # -- resampled mode -----------------------------------------------------------------
    def draw(self, d: int) -> int:
        """Shard index of the ``d``-th draw of this slot (resampled mode)."""
        rng = _rng(self.seed, self.slot, d, *self._extra())
        return int(rng.choice(self.source.num_shards, p=self._probs))

    def _draw_segments(self, d: int, skip: int) -> Iterator[tuple[int, int, int]]:
        while True:
            shard = self.draw(d)
            n = self.source.counts[shard]
            if n > skip:
                yield shard, skip, n - skip
            skip, d = 0, d + 1

    def _resampled_records(self, start: int) -> Iterator[tuple[int, Record]]:
        b = start // self.block
        # find the draw holding the block's first record by summing drawn shards' counts
        target, d, cum = b * self.block, 0, 0
        while cum + (n := self.source.counts[self.draw(d)]) <= target:
            cum, d = cum + n, d + 1
        raw = read_segments(self.source, self._draw_segments(d, target - cum))
        while True:
            recs = [next(raw) for _ in range(self.block)]
            perm = self._block_perm(0, b, self.block)
            base = b * self.block
            for j in range(max(start - base, 0), self.block):
                yield base + j, recs[perm[j]]
            b += 1


# ---------------------------------------------------------------------------------------
# Mixtures: which source each record of a slot comes from
# ---------------------------------------------------------------------------------------

def mixture_choices(weights: Sequence[float], seed: int, slot: int, start: int = 0) -> Iterator[int]:
    """Source index of mixture draws ``start, start+1, ...`` for ``slot``.

    Draws come in chunks of ``MIXTURE_CHUNK`` from ``default_rng([seed, slot, tag, chunk])``,
    so seeking to a mixture counter costs one chunk, however far into training it is.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    chunk, offset = divmod(start, MIXTURE_CHUNK)
    while True:
        choices = _rng(seed, slot, MIXTURE_TAG, chunk).choice(len(w), size=MIXTURE_CHUNK, p=w)
        for c in choices[offset:]:
            yield int(c)
        chunk, offset = chunk + 1, 0


def mixed_records(streams: Sequence[SlotStream], weights: Sequence[float], seed: int, slot: int,
                  positions: Sequence[int], mix: int = 0) -> Iterator[tuple[int, int, Record]]:
    """Yield ``(source, position, record)``: one record per mixture draw from the chosen source.

    ``positions`` are each source's stream positions and ``mix`` the number of draws already
    made; both come from a checkpoint (or zeros) and together fix the continuation exactly.
    """
    if len(streams) == 1:
        for pos, rec in streams[0].records(positions[0]):
            yield 0, pos, rec
        return
    # per-source generators start lazily: a source's first block is read when first chosen
    its = [s.records(p) for s, p in zip(streams, positions)]
    for c in mixture_choices(weights, seed, slot, mix):
        pos, rec = next(its[c])
        yield c, pos, rec
