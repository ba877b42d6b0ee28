"""What runs inside each DataLoader worker: read records, decode, transform, batch.

Two IterableDatasets, both yielding *whole batches* (the DataLoader runs with
``batch_size=None``), so a worker's batch carries that worker's exact stream position:

* :class:`TrainDataset` - infinite, block-shuffled, mixture-aware; skips bad samples.
* :class:`EvalDataset` - one sequential pass over the slot's range; bad samples become
  zero images with ``mask=False`` so batch counts stay predictable.

DataLoader worker ``j`` plays *logical* worker ``(j + rotation) % W``. With ``in_order=True``
batches arrive round-robin over workers, so after ``n`` consumed batches the next one comes
from logical worker ``n % W``; a resumed loader sets ``rotation = n % W`` to continue exactly.
"""

from __future__ import annotations

import math
import random
from functools import partial
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from tldist.data.augment import erase_fields
from tldist.data.device_decode import JpegRows, worker_decoder
from tldist.data.manifest import IMAGE_EXTS
from tldist.data.stream import (Record, SlotStream, SourceSpec, Throttle, mixed_records, range_segments,
                                read_segments, slot_range)
from tldist.data.transforms import decode_image
from tldist.errors import DataError

MIN_READ_FOR_FAULT_CHECK = 200  # samples read before the skip fraction is judged
STALL_RECORDS = 1000  # a worker that read this many records without a batch checks the fraction itself


class SampleError(Exception):
    """A sample that cannot be used (bad image bytes, missing member, bad label)."""


def decode_record(rec: Record, decoder: str, transform, rng: Optional[random.Random], num_classes: int,
                  label_map: Optional[Sequence[int]], out: Optional[torch.Tensor] = None,
                  defer: Optional[Callable[[bytes, Optional[random.Random]], bool]] = None) -> tuple[torch.Tensor, int]:
    """Raw record -> (uint8 [3,H,W] image, label), the image written into ``out`` when given.
    ``defer(bytes, rng)`` may take the image instead (``JpegRows.add``: left for the trainer's device;
    ``out`` is then untouched). Raises :class:`SampleError` with the reason when the record is unusable
    (unreadable, no label, bytes that do not decode); an error of the transform itself propagates."""
    if not rec.ok:
        raise SampleError(rec.error or "unreadable")  # "the shard cannot be read (...)"
    raw_label = rec.fields.get("cls")
    if raw_label is None:
        raise SampleError("no .cls label member")
    try:
        label = int(raw_label.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise SampleError(f"bad label {raw_label[:20]!r} (expected ASCII digits)") from None
    if not 0 <= label < num_classes:
        raise SampleError(f"label {label} outside the manifest's {num_classes} classes")
    ext = next((e for e in IMAGE_EXTS if e in rec.fields), None)
    if ext is None:
        raise SampleError(f"no image member (looked for {', '.join(IMAGE_EXTS)}; found {sorted(rec.fields)})")
    data = rec.fields[ext]
    try:
        deferred = defer is not None and defer(data, rng)
        decoded = None if deferred else decode_image(data, decoder)
    except Exception as e:  # PIL/torchvision raise many types for corrupt bytes
        raise SampleError(f"cannot decode .{ext} ({type(e).__name__}: {e})") from None
    # Only decoding is judged as bad data: a crop or augmentation that fails on a decoded image
    # is a fault of the code (or of a library), so it stops the run instead of being skipped.
    image = out if deferred else transform(decoded, rng, out=out)
    return image, (label_map[label] if label_map is not None else label)


def batch_buffer(n: int, size: int) -> torch.Tensor:
    """An uninitialised uint8 [n, 3, size, size] batch that the transforms write into row by row.

    Inside a DataLoader worker it is allocated in shared memory, as ``default_collate`` does for
    its outputs, so handing it to the training process copies nothing: no ``torch.stack`` of the
    rows and no copy into shared memory when the batch is pickled.
    """
    numel = n * 3 * size * size
    if get_worker_info() is None:
        flat = torch.empty(numel, dtype=torch.uint8)
    else:
        flat = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(numel))
    return flat.view(n, 3, size, size)


class BatchPool:
    """The batch buffers of one loader worker, reused once the training process lets go of them.

    ``free`` (uint8 [K] in shared memory, 1 = free) is written by the worker when it takes a
    buffer and by :class:`~tldist.data.pipeline.TrainLoader` when it releases one, so a buffer is
    refilled only after its batch has been consumed: a fresh shared-memory segment per batch
    costs ~7 ms of page faults for 64 images at 224 px (~6% of decoding them). If no buffer is
    free, or without ``free``, a new one is allocated.
    """

    def __init__(self, free: Optional[torch.Tensor], n: int, size: int):
        self.free, self.n, self.size = free, n, size
        self.buffers: list[Optional[torch.Tensor]] = [None] * (len(free) if free is not None else 0)

    def take(self) -> tuple[torch.Tensor, int]:
        """(buffer, its index; -1 for a one-off buffer)."""
        for k, buf in enumerate(self.buffers):
            if self.free[k]:
                self.free[k] = 0
                if buf is None:
                    buf = self.buffers[k] = batch_buffer(self.n, self.size)
                return buf, k
        return batch_buffer(self.n, self.size), -1


def _worker_id() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def skip_error(read: int, skipped: int, max_fraction: float, where: str) -> DataError:
    """The error raised when too many samples fail."""
    return DataError(
        f"{skipped} of {read} samples read {where} failed to load ({skipped / max(read, 1):.1%} > "
        f"data.max_skip_fraction={max_fraction}); the warnings above name the shards and keys. "
        f"Check the shards with 'tldist shards verify' or raise data.max_skip_fraction")


class TrainDataset(IterableDataset):
    """Infinite stream of collated training batches for one rank (see module docstring)."""

    def __init__(self, sources: Sequence[SourceSpec], *, weights: Sequence[float], num_classes: Sequence[int],
                 label_maps: Sequence[Optional[Sequence[int]]], rank: int, world_size: int, num_workers: int,
                 seed: int, shuffle_buffer: int, resampled: bool, batch_size: int, transform, decoder: str,
                 max_skip_fraction: float, random_erasing: float = 0.0):
        self.sources, self.weights = list(sources), list(weights)
        self.num_classes, self.label_maps = list(num_classes), list(label_maps)
        self.rank, self.world_size, self.workers = rank, world_size, max(1, num_workers)
        self.seed, self.shuffle_buffer, self.resampled = seed, shuffle_buffer, resampled
        self.batch_size, self.transform, self.decoder = batch_size, transform, decoder
        self.max_skip_fraction = max_skip_fraction
        self.random_erasing = random_erasing
        """Erasing probability (``data.random_erasing``): > 0 adds per-sample seeds (``_erase``) to each batch."""
        self.num_slots = world_size * self.workers
        self.free: Optional[torch.Tensor] = None
        """uint8 [workers, K] buffer flags in shared memory (see :class:`BatchPool`); None: no reuse."""
        # start state per logical worker; set by the loader before the DataLoader starts
        self.rotation = 0
        self.start = [self.initial_state() for _ in range(self.workers)]
        for w in range(self.workers):  # fail at build time (main process) for too few samples
            self.streams(self.rank * self.workers + w)

    def initial_state(self) -> dict[str, Any]:
        """State of a logical worker that has consumed nothing yet."""
        return {"positions": [0] * len(self.sources), "mix": 0, "read": 0, "skipped": 0}

    def streams(self, slot: int) -> list[SlotStream]:
        """One :class:`SlotStream` per source for ``slot`` (raises ConfigError if a source is too small)."""
        return [SlotStream(src, slot, self.num_slots, seed=self.seed, block_size=self.shuffle_buffer,
                           resampled=self.resampled, source_index=i) for i, src in enumerate(self.sources)]

    def pos_value(self, positions: list[int], mix: int) -> Any:
        """The ``_pos`` batch field: an int for one source, else per-source positions + mixture counter."""
        return positions[0] if len(self.sources) == 1 else {"sources": list(positions), "mix": mix}

    def __iter__(self):
        # -- which logical worker / slot this process plays, and where it starts
        j, n = _worker_id()
        if n != self.workers:
            raise RuntimeError(f"TrainDataset built for {self.workers} workers runs under {n}")
        w = (j + self.rotation) % self.workers
        slot = self.rank * self.workers + w
        st = self.start[w]
        positions, mix = list(st["positions"]), int(st["mix"])
        read, skipped, since_batch = int(st["read"]), int(st["skipped"]), 0
        throttle, bs, size = Throttle(), self.batch_size, self.transform.image_size
        pool = BatchPool(self.free[w] if self.free is not None else None, bs, size)
        jpeg = JpegRows(self.transform) if self.decoder == "nvjpeg" else None  # JPEGs decoded by the trainer
        (images, buf), filled = pool.take(), 0
        labels: list[int] = []
        keys: list[str] = []
        srcs: list[int] = []
        erase: list[int] = []  # per-sample random-erasing seeds (tldist.data.augment.erase_batch)
        # -- raw records in block-shuffled order, the source picked per draw for mixtures
        for s, pos, rec in mixed_records(self.streams(slot), self.weights, self.seed, slot, positions, mix):
            positions[s], mix, read, since_batch = pos + 1, mix + 1, read + 1, since_batch + 1
            # -- decode + augment; the augmentation RNG is keyed by the record's stream position
            rng = random.Random(f"{self.seed}/{s}/{slot}/{pos}")
            try:
                _, label = decode_record(rec, worker_decoder(self.decoder), self.transform, rng, self.num_classes[s],
                                         self.label_maps[s], out=images[filled],
                                         defer=None if jpeg is None else partial(jpeg.add, filled))
            except SampleError as e:
                skipped += 1
                throttle.warn(f"skipping {rec.describe()} of shard {rec.url}: {e}")
                if (since_batch >= STALL_RECORDS and read >= MIN_READ_FOR_FAULT_CHECK
                        and skipped > self.max_skip_fraction * read):
                    raise skip_error(read, skipped, self.max_skip_fraction, f"by loader worker {w} of rank {self.rank}")
                continue
            filled += 1
            labels.append(label)
            keys.append(rec.key)
            srcs.append(s)
            if self.random_erasing > 0:  # drawn after the crop/flip/policy draws of the sample
                erase.append(rng.getrandbits(63))
            # -- a full batch: uint8 images (already in place), metadata for exact resume
            if filled == bs:
                yield {"image": images, "label": torch.tensor(labels, dtype=torch.int64),
                       "key": keys, "source": torch.tensor(srcs, dtype=torch.int64),
                       "_worker": w, "_buf": buf, "_pos": self.pos_value(positions, mix), "_read": read,
                       "_skipped": skipped, **(jpeg.take() if jpeg is not None else {}),
                       **erase_fields(self.random_erasing, erase)}
                (images, buf), filled = pool.take(), 0
                labels, keys, srcs, erase, since_batch = [], [], [], [], 0


class EvalDataset(IterableDataset):
    """One pass over a val shard set: this rank's slots read contiguous ranges of the manifest order."""

    def __init__(self, source: SourceSpec, *, num_classes: int, rank: int, world_size: int, num_workers: int,
                 batch_size: int, image_size: int, transform, decoder: str,
                 label_map: Optional[Sequence[int]] = None):
        self.source, self.num_classes, self.label_map = source, num_classes, label_map
        self.rank, self.world_size, self.workers = rank, world_size, max(1, num_workers)
        self.batch_size, self.image_size = batch_size, image_size
        self.transform, self.decoder = transform, decoder
        self.num_slots = world_size * self.workers

    def slot_batches(self, slot: int) -> int:
        """Batches the worker playing ``slot`` yields per pass."""
        lo, hi = slot_range(self.source.num_samples, slot, self.num_slots)
        return math.ceil((hi - lo) / self.batch_size)

    def rank_batches(self, rank: int) -> int:
        """Batches the DataLoader of ``rank`` yields (before padding)."""
        return sum(self.slot_batches(rank * self.workers + w) for w in range(self.workers))

    def __iter__(self):
        # -- this worker's contiguous range of the sequential (unshuffled) concatenation
        j, _ = _worker_id()
        slot = self.rank * self.workers + j
        lo, hi = slot_range(self.source.num_samples, slot, self.num_slots)
        records = read_segments(self.source, range_segments(self.source.counts, range(self.source.num_shards), lo, hi))
        throttle, bs, size = Throttle(), self.batch_size, self.image_size
        read = skipped = 0
        jpeg = JpegRows(self.transform) if self.decoder == "nvjpeg" else None  # JPEGs decoded by the trainer
        for start in range(lo, hi, bs):
            # -- fixed-shape batch: failed and padding rows are zero images with mask False
            n = min(bs, hi - start)
            images = batch_buffer(bs, size).zero_()
            labels = torch.zeros(bs, dtype=torch.int64)
            mask = torch.zeros(bs, dtype=torch.bool)
            keys = [""] * bs
            for i in range(n):
                rec = next(records)
                read += 1
                keys[i] = rec.key or ""
                try:
                    _, labels[i] = decode_record(rec, worker_decoder(self.decoder), self.transform, None,
                                                 self.num_classes, self.label_map, out=images[i],
                                                 defer=None if jpeg is None else partial(jpeg.add, i))
                    mask[i] = True
                except SampleError as e:
                    images[i].zero_()  # failed rows stay zero images
                    skipped += 1
                    throttle.warn(f"eval: {rec.describe()} of shard {rec.url} counted as failed: {e}")
            yield {"image": images, "label": labels, "mask": mask, "key": keys,
                   "_worker": j, "_read": read, "_skipped": skipped, **(jpeg.take() if jpeg is not None else {})}
