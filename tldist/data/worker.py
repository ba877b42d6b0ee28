"""What runs inside each DataLoader worker: read records, decode, transform, batch.

Two IterableDatasets, both yielding *whole batches* (the DataLoader runs with
``batch_size=None``), so a worker's batch carries that worker's exact stream position:

* :class:`TrainDataset` - this rank's part of the global, topology-free sample order
  (:mod:`tldist.data.stream`): one item per (micro-batch, worker), block-shuffled, mixture-aware;
  a bad sample is replaced by the nearest good one of its block.
* :class:`EvalDataset` - one sequential pass over the slot's range; bad samples become
  zero images with ``mask=False`` so batch counts stay predictable.
"""

from __future__ import annotations

import math
import random
from functools import partial
from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from tldist.data.augment import erase_fields
from tldist.data.device_decode import JpegRows, worker_decoder
from tldist.data.labels import LabelError, LabelRule, rule_for_shard
from tldist.data.retry import retry_count
from tldist.data.stream import (GlobalLayout, PartitionReader, PartitionStream, Record, SourceSpec, Throttle,
                                range_segments, read_segments, slot_range)
from tldist.data.transforms import decode_error, decode_image
from tldist.errors import DataError

MIN_READ_FOR_FAULT_CHECK = 200  # samples read before the skip fraction is judged


class SampleError(Exception):
    """A sample that cannot be used (bad image bytes, missing member, bad label)."""


def decode_record(rec: Record, decoder: str, transform, rng: Optional[random.Random], num_classes: int,
                  label_map: Optional[Sequence[int]], out: Optional[torch.Tensor] = None,
                  defer: Optional[Callable[[bytes, Optional[random.Random]], bool]] = None,
                  labels: Optional[LabelRule] = None) -> tuple[torch.Tensor, int]:
    """Raw record -> (uint8 [3,H,W] image, label), the image written into ``out`` when given.
    ``defer(bytes, rng)`` may take the image instead (``JpegRows.add``: left for the trainer's device;
    ``out`` is then untouched). ``labels``: how the record's set stores labels and images (its manifest's
    :attr:`~tldist.data.manifest.Manifest.label_rule`); by default the rule registered for the record's shard
    URL (:func:`~tldist.data.labels.rule_for_shard`: ``.cls`` for tldist's own sets). An unlabelled set
    (``none``) gives label -1, unmapped. Raises :class:`SampleError` with the reason when the record is
    unusable (unreadable, no label, bytes that do not decode); an error of the transform itself propagates."""
    if not rec.ok:
        raise SampleError(rec.error or "unreadable")  # "the shard cannot be read (...)"
    rule = labels if labels is not None else rule_for_shard(rec.url)
    try:
        label = rule.label(rec.fields)
        ext, data = rule.image_member(rec.fields)
    except LabelError as e:
        raise SampleError(str(e)) from None
    if rule.labelled:
        if not 0 <= label < num_classes:
            raise SampleError(f"label {label} outside the manifest's {num_classes} classes")
        label = label_map[label] if label_map is not None else label
    try:
        deferred = defer is not None and defer(data, rng)
        decoded = None if deferred else decode_image(data, decoder)
    except Exception as e:  # PIL/torchvision raise many types for corrupt bytes
        raise SampleError(f"cannot decode .{ext} ({decode_error(e)})") from None
    # Only decoding is judged as bad data: a crop or augmentation that fails on a decoded image
    # is a fault of the code (or of a library), so it stops the run instead of being skipped.
    image = out if deferred else transform(decoded, rng, out=out)
    return image, label


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
    """This rank's share of the global sample order, as one item per (micro-batch, loader worker).

    Loader worker ``w`` reads the partitions :class:`~tldist.data.stream.GlobalLayout` gives it and, for every
    micro-batch ``n = start_micro, start_micro + 1, ...``, yields the rows of that micro-batch whose samples
    live in its partitions (possibly none): ``rows`` int64 [k] (rows of the micro-batch), ``image`` uint8
    [>=k, 3, H, W] (rows ``:k`` filled), ``label``/``source`` int64 [k], ``key`` list[str], ``_worker``,
    ``_micro``, ``_buf`` (its share buffer, -1 if not recycled), ``_read``/``_skipped`` (its cumulative counts),
    and ``_jpeg`` (nvjpeg rows, numbered as micro-batch rows) / ``_erase`` (per-row seeds) when used. With the
    DataLoader's ``in_order=True`` the items of micro-batch ``n`` arrive from workers ``0..W-1`` in turn;
    :class:`~tldist.data.pipeline.TrainLoader` puts them together.

    A record that does not decode is replaced by the nearest record of its block that does (the same on every
    topology: blocks belong to partitions), decoded with the failed record's augmentation draws, and counted as
    skipped; the augmentation of every sample is seeded by ``(data.seed, source, partition, position)``.
    """

    def __init__(self, sources: Sequence[SourceSpec], *, weights: Sequence[float], num_classes: Sequence[int],
                 label_maps: Sequence[Optional[Sequence[int]]], rank: int, world_size: int, num_workers: int,
                 seed: int, partitions: int, block: int, resampled: bool, batch_size: int, transform, decoder: str,
                 max_skip_fraction: float, random_erasing: float = 0.0, grad_accum: int = 1):
        self.sources, self.weights = list(sources), list(weights)
        self.num_classes, self.label_maps = list(num_classes), list(label_maps)
        self.rank, self.world_size, self.workers = rank, world_size, max(1, num_workers)
        self.seed, self.partitions, self.block, self.resampled = seed, partitions, block, resampled
        self.batch_size, self.transform, self.decoder = batch_size, transform, decoder
        self.max_skip_fraction = max_skip_fraction
        self.grad_accum = grad_accum
        """Micro-batches per optimizer step (``train.grad_accum``): which samples share a micro-batch."""
        self.random_erasing = random_erasing
        """Erasing probability (``data.random_erasing``): > 0 adds per-sample seeds (``_erase``) to each item."""
        self.free: Optional[torch.Tensor] = None
        """uint8 [workers, K] share-buffer flags in shared memory (see :class:`BatchPool`); None: no reuse."""
        self.origin = 0
        """The global sample this run started (or resumed) at; set by the loader before the DataLoader starts."""
        self.start_micro = 0
        """The first micro-batch (counted from ``origin``) the workers produce; set by the loader."""
        self.counts = [(0, 0)] * self.workers
        """``(read, skipped)`` each logical worker starts counting from; set by the loader."""
        for i, src in enumerate(self.sources):  # fail at build time (main process) for too small sources
            PartitionStream(src, 0, partitions, seed=seed, block=block, resampled=resampled, source_index=i)

    def layout(self) -> GlobalLayout:
        return GlobalLayout(partitions=self.partitions, world=self.world_size, rank=self.rank, workers=self.workers,
                            batch=self.batch_size, origin=self.origin, accum=self.grad_accum)

    def reader(self, part: int) -> PartitionReader:
        """The reader of partition ``part`` across the sources."""
        streams = [PartitionStream(src, part, self.partitions, seed=self.seed, block=self.block,
                                   resampled=self.resampled, source_index=i) for i, src in enumerate(self.sources)]
        return PartitionReader(streams, self.weights, self.seed, part)

    def __iter__(self):
        w, n = _worker_id()
        if n != self.workers:
            raise RuntimeError(f"TrainDataset built for {self.workers} workers runs under {n}")
        layout = self.layout()
        readers: dict[int, PartitionReader] = {}
        read, skipped = self.counts[w]
        retried = retry_count()  # this iterator's own re-opens: the process may have run other loaders before
        throttle, bs, size = Throttle(), self.batch_size, self.transform.image_size
        pool = BatchPool(self.free[w] if self.free is not None else None, bs, size)
        jpeg = JpegRows(self.transform) if self.decoder == "nvjpeg" else None  # JPEGs decoded by the trainer
        decoder = worker_decoder(self.decoder)
        micro = self.start_micro
        while True:
            plan = layout.rows(micro, w)
            images, buf = pool.take()
            rows, labels, keys, srcs, erase = [], [], [], [], []
            for k, (row, part, draw) in enumerate(plan):
                reader = readers.get(part)
                if reader is None:
                    reader = readers[part] = self.reader(part)
                s, pos, rec = reader.at(draw)
                read += 1
                # -- decode + augment; the draws are keyed by the sample's identity, not by who reads it
                rng_key = f"{self.seed}/{s}/{part}/{pos}"
                defer = None if jpeg is None else partial(jpeg.add, row)
                try:
                    _, label = decode_record(rec, decoder, self.transform, random.Random(rng_key), self.num_classes[s],
                                             self.label_maps[s], out=images[k], defer=defer,
                                             labels=self.sources[s].labels)
                except SampleError as e:
                    skipped += 1
                    throttle.warn(f"skipping {rec.describe()} of shard {rec.url}: {e}; the nearest readable sample of "
                                  "its shuffle block takes its place", key=f"{rec.url}/{rec.key or 'unread'}")
                    rec, label = self._substitute(reader, s, rng_key, images[k], defer, decoder)
                    if read >= MIN_READ_FOR_FAULT_CHECK and skipped > self.max_skip_fraction * read:
                        raise skip_error(read, skipped, self.max_skip_fraction,
                                         f"by loader worker {w} of rank {self.rank}")
                rows.append(row)
                labels.append(label)
                keys.append(rec.key)
                srcs.append(s)
                if self.random_erasing > 0:  # drawn after the crop/flip/policy draws of the sample
                    erase.append(random.Random(rng_key + "/erase").getrandbits(63))
            yield {"rows": torch.tensor(rows, dtype=torch.int64), "image": images,
                   "label": torch.tensor(labels, dtype=torch.int64), "key": keys,
                   "source": torch.tensor(srcs, dtype=torch.int64), "_worker": w, "_micro": micro, "_buf": buf,
                   "_read": read, "_skipped": skipped, "_retries": retry_count() - retried,
                   **(jpeg.take() if jpeg is not None else {}), **erase_fields(self.random_erasing, erase)}
            micro += 1

    def _substitute(self, reader: PartitionReader, s: int, rng_key: str, out: torch.Tensor, defer, decoder: str):
        """``(record, label)`` of the nearest readable record of the failed draw's block, decoded into ``out``
        with the failed draw's augmentation; a :class:`DataError` when none of the block decodes."""
        for rec in reader.substitutes():
            try:
                _, label = decode_record(rec, decoder, self.transform, random.Random(rng_key), self.num_classes[s],
                                         self.label_maps[s], out=out, defer=defer, labels=self.sources[s].labels)
                return rec, label
            except SampleError:
                continue
        raise DataError(f"no sample of a shuffle block of shard set '{self.sources[s].name}' could be read (around "
                        f"partition {reader.part}); check the shards with 'tldist shards verify'")


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
        retried = retry_count()  # this pass's own re-opens, not those of earlier loaders of the process
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
                                                 defer=None if jpeg is None else partial(jpeg.add, i),
                                                 labels=self.source.labels)
                    mask[i] = True
                except SampleError as e:
                    images[i].zero_()  # failed rows stay zero images
                    skipped += 1
                    throttle.warn(f"eval: {rec.describe()} of shard {rec.url} counted as failed: {e}")
            yield {"image": images, "label": labels, "mask": mask, "key": keys,
                   "_worker": j, "_read": read, "_skipped": skipped, "_retries": retry_count() - retried,
                   **(jpeg.take() if jpeg is not None else {})}
