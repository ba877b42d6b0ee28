"""Streaming train/eval loaders over WebDataset shards: deterministic, evenly split, exactly resumable.

Pipeline of one rank (stages in order; details in :mod:`tldist.data.stream` and
:mod:`tldist.data.worker`):

1. manifests -> :class:`~tldist.data.stream.SourceSpec` (shard URLs + per-shard counts) and one
   merged class list;
2. each stream-epoch (shard order from ``(seed, epoch)``) is cut into ``data.partitions`` canonical
   partitions; global sample ``t`` is draw ``t // C`` of partition ``t % C``, and rank ``r`` takes the
   samples ``t0 + i*world + r`` (:mod:`tldist.data.stream`): the samples of a global step do not depend
   on the number of ranks or loader workers;
3. every partition is read by one loader worker, in blocks of ``data.shuffle_buffer / data.partitions``
   raw records that are shuffled, then decoded + augmented in the worker into uint8 rows of the
   micro-batches (:class:`~tldist.data.worker.TrainDataset`);
4. the DataLoader (``batch_size=None``, ``in_order=True``) hands the workers' items out round-robin;
   :class:`TrainLoader` puts each micro-batch together and records the global position, so
   ``state_dict()`` captures exactly what was consumed and a resumed loader continues with the very
   next sample on any number of ranks and workers.

These loaders must NOT go through ``accelerator.prepare``: accelerate would shard the
IterableDataset a second time. Normalize batches in the training process with
:class:`~tldist.data.transforms.Normalizer`.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from tldist.config import DataConfig, bad_value, require_at_least, require_choice, require_positive, val_set_entries
from tldist.data.augment import build_worker_augment, check_augment
from tldist.data.manifest import Manifest, load_manifest, manifest_path, missing_shards, resolve_shard_urls
from tldist.data.retry import RetryPolicy
from tldist.data.stream import DEFAULT_PARTITIONS, GlobalLayout, SourceSpec
from tldist.data.transforms import EVAL_CROP_PCT, IMAGENET_MEAN, build_eval_transform, build_train_transform
from tldist.data.worker import MIN_READ_FOR_FAULT_CHECK, EvalDataset, TrainDataset, skip_error
from tldist.errors import ConfigError, DataError
from tldist.world import World, broadcast_object, distributed

log = logging.getLogger("tldist.data")

STATE_VERSION = 2
"""Version 2: one global position in the topology-free order (version 1 held per-slot positions)."""


RECYCLE_HOLD = 2
"""With ``recycle_batches``, a batch's image buffer is refilled once this many later batches were handed out."""
RECYCLE_BUFFERS = 6
"""Buffers per worker: the one being filled, those queued (prefetch) and those held (RECYCLE_HOLD)."""

SIGTERM_GRACE_S = 15.0
"""How long a loader worker keeps serving after SIGTERM (see :func:`_defer_sigterm`)."""


def _defer_sigterm(_worker_id: int) -> None:
    """Loader workers outlive a SIGTERM by :data:`SIGTERM_GRACE_S` seconds, then exit quietly.

    On preemption SLURM signals every process of the job at once; a worker dying at once would
    crash the training process before it finishes its step and checkpoints. The grace is bounded
    so that a parent which really wants its workers gone (multiprocessing's exit handler
    terminates and then joins them) is not blocked for long; exit status 0 keeps torch's
    worker-failure check from raising in the parent.
    """
    import signal
    import threading

    def later(_signum, _frame) -> None:
        threading.Timer(SIGTERM_GRACE_S, os._exit, args=(0,)).start()

    signal.signal(signal.SIGTERM, later)


def _make_dataloader(dataset, num_workers: int, pin_memory: bool, prefetch_factor: int) -> DataLoader:
    # A private generator: creating an iterator must not draw from the global torch RNG, or a
    # resumed run's dropout/augmentation draws would shift against the uninterrupted run's. The
    # workers' sample order does not depend on it (each stream is seeded from data.seed).
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
                      pin_memory=pin_memory and torch.cuda.is_available(),
                      prefetch_factor=prefetch_factor if num_workers > 0 else None, in_order=True,
                      worker_init_fn=_defer_sigterm if num_workers > 0 else None,
                      generator=torch.Generator().manual_seed(0))


class TrainLoader:
    """Infinite iterator of this rank's training micro-batches in the global sample order, with an exact,
    topology-free ``state_dict``.

    Batch fields: ``image`` uint8 [B,3,H,W], ``label`` int64 [B], ``key`` list[str], ``source`` int64 [B]
    (mixture index), ``_micro`` (micro-batch number since the run's origin), and ``_jpeg``/``_erase`` when
    used. Each micro-batch is put together from one item of every loader worker (:class:`TrainDataset`);
    the rows of micro-batch ``n`` of rank ``r`` are the global samples ``t0 + (n*B + row)*world + r`` of the
    order in :mod:`tldist.data.stream`, so the samples of a global step do not depend on the number of ranks
    and workers.

    ``state_dict()`` stores the global position (the next sample ``t``), the order's constants (partitions,
    shuffle block, seed, sources, weights) and this rank's read/skipped counts. ``load_state_dict`` continues
    from that position on any world size, worker count or batch size (:meth:`load_resharded` when the world
    size changed).
    """

    per_rank = True
    """A checkpoint keeps one loader state per rank (:class:`~tldist.artifacts.checkpoint.CheckpointManager`);
    their positions are equal, their counters differ."""

    def __init__(self, dataset: TrainDataset, *, world: World, num_workers: int, epoch_samples: int,
                 classes: list[str], source_names: list[str], pin_memory: bool = True, prefetch_factor: int = 2,
                 recycle_batches: bool = False, raise_on_fault: bool = True):
        self.dataset, self.world, self.num_workers = dataset, world, num_workers
        self.raise_on_fault = raise_on_fault
        self.fault: Optional[DataError] = None
        """Set (instead of raised, with ``raise_on_fault=False``) once this rank's skipped samples
        exceed ``data.max_skip_fraction``: the trainer has all ranks agree on it and stop together."""
        self.classes, self.source_names = classes, source_names
        self.num_samples = epoch_samples
        self.batch_size = dataset.batch_size
        self.steps_per_epoch = epoch_samples // (world.world_size * dataset.batch_size)
        self._pin, self._prefetch = pin_memory, prefetch_factor
        self._recycle = recycle_batches
        self._workers = dataset.workers
        self._counts = [(0, 0)] * self._workers  # (read, skipped) per logical worker, as of the last batch
        self._retries: dict[int, int] = {}  # remote shard re-opens per logical worker, since this loader started
        self._base = (0, 0)  # counts carried over from before the run's origin (a resume)
        self._batches = 0  # micro-batches handed out since the origin
        self._ring: list[torch.Tensor] = []
        self._it: Optional[Iterator] = None
        self._loader: Optional[DataLoader] = None

    # -- iteration -------------------------------------------------------------------------
    def __iter__(self) -> "TrainLoader":
        return self

    def _start(self) -> None:
        self.dataset.start_micro = self._batches
        self.dataset.counts = list(self._counts)
        # new workers get their own buffer flags (old workers may still be shutting down)
        self.dataset.free = torch.ones(self._workers, RECYCLE_BUFFERS, dtype=torch.uint8).share_memory_() \
            if self.num_workers > 0 else None
        self._loader = _make_dataloader(self.dataset, self.num_workers, self._pin, self._prefetch)
        self._it = iter(self._loader)

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            self._start()
        n = self._batches
        parts = []
        for w in range(self._workers):  # in_order=True: micro-batch n's items come from workers 0..W-1 in turn
            item = next(self._it)
            if item["_worker"] != w or item["_micro"] != n:
                raise RuntimeError(f"loader item (worker {item['_worker']}, micro-batch {item['_micro']}) arrived "
                                   f"where (worker {w}, micro-batch {n}) was due: items must arrive in order")
            parts.append(item)
        batch = self._assemble(parts)
        self._batches += 1
        # -- fault threshold over this rank's workers
        stats = self.stats()
        read, skipped = stats["read"], stats["skipped"]
        if read >= MIN_READ_FOR_FAULT_CHECK and skipped > self.dataset.max_skip_fraction * read and self.fault is None:
            self.fault = skip_error(read, skipped, self.dataset.max_skip_fraction, f"on rank {self.world.rank}")
            if self.raise_on_fault:
                raise self.fault
        return batch

    def _buffer(self, like: torch.Tensor) -> torch.Tensor:
        """The image tensor of the next micro-batch: a ring of RECYCLE_HOLD + 1 buffers with recycling (the
        loop is done with a batch after RECYCLE_HOLD more), else a fresh one."""
        shape = (self.batch_size, *like.shape[1:])
        if not self._recycle:
            return torch.empty(shape, dtype=torch.uint8)
        if len(self._ring) <= RECYCLE_HOLD:
            self._ring.append(torch.empty(shape, dtype=torch.uint8))
            return self._ring[-1]
        buf = self._ring.pop(0)
        self._ring.append(buf)
        return buf

    def _assemble(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """One micro-batch from its workers' items (rows copied into place; share buffers released)."""
        b = self.batch_size
        images = self._buffer(parts[0]["image"])
        labels = torch.empty(b, dtype=torch.int64)
        sources = torch.empty(b, dtype=torch.int64)
        keys: list[str] = [""] * b
        seeds = torch.zeros(b, dtype=torch.int64) if any("_erase" in p for p in parts) else None
        jpeg_parts = []
        for p in parts:
            rows = p["rows"]
            k = len(rows)
            if k:
                images.index_copy_(0, rows, p["image"][:k])
                labels[rows] = p["label"]
                sources[rows] = p["source"]
                for row, key in zip(rows.tolist(), p["key"]):
                    keys[row] = key
                if seeds is not None:
                    seeds[rows] = p["_erase"]["seeds"]
            if "_jpeg" in p:
                jpeg_parts.append(p["_jpeg"])
            self._counts[p["_worker"]] = (p["_read"], p["_skipped"])
            self._retries[p["_worker"]] = p.get("_retries", 0)
            if self.dataset.free is not None and p["_buf"] >= 0:  # copied: the worker may refill it
                self.dataset.free[p["_worker"], p["_buf"]] = 1
        batch: dict[str, Any] = {"image": images, "label": labels, "key": keys, "source": sources, "_micro": self._batches}
        if seeds is not None:
            batch["_erase"] = {"p": next(p["_erase"]["p"] for p in parts if "_erase" in p), "seeds": seeds}
        if jpeg_parts:
            batch["_jpeg"] = _merge_jpeg(jpeg_parts)
        return batch

    def close(self) -> None:
        """Stop the worker processes (they are also stopped when the loader is garbage collected)."""
        self._it, self._loader = None, None

    # -- bookkeeping -----------------------------------------------------------------------
    @property
    def batches(self) -> int:
        """Micro-batches handed out since the run's origin (its start, or the resume it continues)."""
        return self._batches

    @property
    def position(self) -> int:
        """The global sample the next micro-batch starts at (:mod:`tldist.data.stream`)."""
        return self.dataset.origin + self._batches * self.batch_size * self.world.world_size

    def stats(self) -> dict[str, int]:
        """Samples read and skipped on this rank (summed over workers, cumulative over resumes)."""
        return {"read": self._base[0] + sum(r for r, _ in self._counts),
                "skipped": self._base[1] + sum(s for _, s in self._counts),
                "retries": sum(self._retries.values())}

    def _order(self) -> dict[str, Any]:
        """What fixes the sample order: it must be the same to continue a run."""
        d = self.dataset
        return {"partitions": d.partitions, "block": d.block, "seed": d.seed, "resampled": d.resampled,
                "weights": [round(float(w), 12) for w in d.weights],
                "sources": [{"name": s.name, "shards": s.num_shards, "samples": s.num_samples} for s in d.sources]}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue with the exact next global sample (see :meth:`load_state_dict`)."""
        stats = self.stats()
        return {"version": STATE_VERSION, **self._order(), "position": self.position,
                "world_size": self.world.world_size, "batch_size": self.batch_size, "num_workers": self.num_workers,
                "read": stats["read"], "skipped": stats["skipped"]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (this rank's, same world size) before the first batch."""
        self._load(sd, (int(sd.get("read", 0)), int(sd.get("skipped", 0))))

    def load_resharded(self, states: list[dict[str, Any]]) -> None:
        """Continue from the states of every rank of a run with another world size: the same global position;
        the read/skipped counters of all old ranks go to rank 0, so the job's totals stay cumulative."""
        total = (sum(int(s.get("read", 0)) for s in states), sum(int(s.get("skipped", 0)) for s in states))
        self._load(states[0], total if self.world.rank == 0 else (0, 0))

    def _load(self, sd: dict[str, Any], counts: tuple[int, int]) -> None:
        if self._it is not None:
            raise RuntimeError("TrainLoader.load_state_dict must be called before the first batch")
        if sd.get("version") != STATE_VERSION:
            raise ConfigError(f"the checkpoint's data-loader state is version {sd.get('version')!r}, written by a tldist "
                              f"without the topology-free sample order (version {STATE_VERSION}); resume it with the "
                              "tldist that wrote it, or start from its weights: model.checkpoint=<checkpoint> "
                              "checkpoint.resume=none")
        mine, saved = self._order(), {k: sd.get(k) for k in self._order()}
        for key in ("partitions", "block"):  # the run's own order constants win over today's config
            if saved[key] != mine[key]:
                log.info("resume: data.%s from the checkpoint: %s (the config gives %s)",
                         "partitions" if key == "partitions" else "shuffle block", saved[key], mine[key])
                setattr(self.dataset, key, int(saved[key]))
        mine = self._order()
        for key, value in mine.items():
            have, had = value, saved[key]
            if key == "sources":  # names may change (moved data); sizes may not
                have, had = [(s["shards"], s["samples"]) for s in value], [(s["shards"], s["samples"]) for s in had]
            if had != have:
                raise ConfigError(
                    f"cannot resume the data loader: '{key}' was {had!r} in the checkpoint but is {have!r} now; "
                    "resume with the same data settings (data.train, data.train_weights, data.seed, data.resampled) "
                    "or start a new run")
        old_batch = int(sd["world_size"]) * int(sd["batch_size"])
        new_batch = self.world.world_size * self.batch_size
        if old_batch != new_batch and self.world.rank == 0:
            log.warning("resume: the batch of all ranks changes from %d (%d ranks x %d) to %d (%d ranks x %d); the run "
                        "continues from the same sample (global position %d)", old_batch, sd["world_size"],
                        sd["batch_size"], new_batch, self.world.world_size, self.batch_size, sd["position"])
        self.dataset.origin = int(sd["position"])
        self._batches = 0
        self._base = counts
        self._counts = [(0, 0)] * self._workers


def _merge_jpeg(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One ``_jpeg`` field from the workers' (their rows are already micro-batch rows)."""
    if len(parts) == 1:
        return parts[0]
    offsets, data, shift = [], [], 0
    for p in parts:
        offsets.append(p["offsets"][:-1] + shift)
        shift += int(p["offsets"][-1])
        data.append(p["data"])
    return {"data": torch.cat(data), "offsets": torch.cat([*offsets, torch.tensor([shift])]),
            "rows": torch.cat([p["rows"] for p in parts]), "meta": torch.cat([p["meta"] for p in parts]),
            "transform": parts[0]["transform"]}


class EvalLoader:
    """One pass over a val shard set per iteration; every sample exactly once across ranks x workers.

    Each rank yields exactly :attr:`num_batches` batches (the most any rank needs; computed from
    the manifest, no communication), padding with all-``mask=False`` batches, so FSDP forward
    passes (collectives) line up. Batch fields: ``image`` uint8 [b,3,H,W], ``label`` int64 [b],
    ``mask`` bool [b] (False: padding or a sample that failed to load), ``key`` list[str].
    """

    def __init__(self, dataset: EvalDataset, *, num_workers: int, classes: list[str], pin_memory: bool = True,
                 prefetch_factor: int = 2):
        self.dataset, self.num_workers, self.classes = dataset, num_workers, classes
        self.num_samples = dataset.source.num_samples
        self.batch_size = dataset.batch_size
        self.num_batches = max(dataset.rank_batches(r) for r in range(dataset.world_size))
        self._loader = _make_dataloader(dataset, num_workers, pin_memory, prefetch_factor)
        self._stats: dict[int, tuple[int, int, int]] = {}

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._stats = {}
        n = 0
        for batch in self._loader:
            self._stats[batch["_worker"]] = (batch["_read"], batch["_skipped"], batch.get("_retries", 0))
            n += 1
            yield batch
        # -- pad: every rank runs the same number of forward passes
        size, bs = self.dataset.image_size, self.batch_size
        for _ in range(self.num_batches - n):
            yield {"image": torch.zeros(bs, 3, size, size, dtype=torch.uint8),
                   "label": torch.zeros(bs, dtype=torch.int64), "mask": torch.zeros(bs, dtype=torch.bool),
                   "key": [""] * bs, "_worker": -1, "_read": 0, "_skipped": 0}

    def stats(self) -> dict[str, int]:
        """Samples read and failed on this rank during the last (or current) pass."""
        return {"read": sum(v[0] for v in self._stats.values()), "skipped": sum(v[1] for v in self._stats.values()),
                "retries": sum(v[2] for v in self._stats.values())}


# ---------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------

def load_source(location: str, pattern: Optional[str] = None, *, policy: Optional[RetryPolicy] = None,
                check_files: bool = True) -> tuple[SourceSpec, Manifest]:
    """Manifest at ``location`` -> (SourceSpec, Manifest): the shard URLs (or ``pattern``'s), their counts and
    seek index, the set's label rule and the retry ``policy``. With ``check_files`` a missing local shard
    raises :class:`DataError`; the loaders check once, on rank 0 (:func:`load_sources`)."""
    manifest = load_manifest(location)
    urls = resolve_shard_urls(manifest, pattern or None, check_files=check_files)
    offsets = tuple(tuple((int(i), int(o)) for i, o in s.offsets) for s in manifest.shards)
    return SourceSpec(str(location), tuple(urls), tuple(s.num_samples for s in manifest.shards),
                      offsets if any(offsets) else (), manifest.label_rule, policy), manifest


def load_sources(locations: Sequence[str], patterns: Sequence[Optional[str]], world: World, *,
                 policy: RetryPolicy, max_skip_fraction: float) -> list[tuple[SourceSpec, Manifest]]:
    """:func:`load_source` for each location, with the start-up check of the shard files done once per job
    (call on every rank): rank 0 alone looks for missing local shards and shares what it found, instead of
    every rank stat-ing every shard (512 ranks x 100k shards on a shared file system). A missing shard is then
    read like any other unreadable one: its samples are counted as skipped when it is opened. When the missing
    shards hold more than ``data.max_skip_fraction`` of a set's samples the run could not pass its skip check,
    so :class:`DataError` names them now."""
    loaded = [load_source(loc, pat, policy=policy, check_files=False) for loc, pat in zip(locations, patterns)]
    check = world.rank == 0 or not distributed()  # without a process group there is no rank 0 to ask
    found = [missing_shards(list(src.urls)) for src, _ in loaded] if check else None
    found = broadcast_object(found)
    for (src, _), missing in zip(loaded, found):
        if not missing:
            continue
        lost = sum(n for u, n in zip(src.urls, src.counts) if u in set(missing))
        if lost > max_skip_fraction * src.num_samples:
            raise DataError(f"shard '{missing[0]}' listed in the manifest of '{src.name}' does not exist ({len(missing)} "
                            f"of {src.num_shards} shards missing, {lost} of {src.num_samples} samples, more than "
                            f"data.max_skip_fraction={max_skip_fraction}); re-run 'tldist shards' or fix data.*_urls")
        if world.rank == 0:
            log.warning("shard set '%s': %d of %d shards do not exist (%s%s); their %d samples are counted as skipped",
                        src.name, len(missing), src.num_shards, ", ".join(missing[:3]),
                        " ..." if len(missing) > 3 else "", lost)
    return loaded


def merge_classes(manifests: list[Manifest]) -> tuple[list[str], list[Optional[list[int]]]]:
    """Union of the class lists by name (first source's order, then new names) and per-source label maps.

    A source whose classes already match the merged list gets ``None`` (no remapping).
    """
    classes = list(manifests[0].classes)
    index = {c: i for i, c in enumerate(classes)}
    for m in manifests[1:]:
        for c in m.classes:
            if c not in index:
                index[c] = len(classes)
                classes.append(c)
    maps = [None if m.classes == classes[:len(m.classes)] else [index[c] for c in m.classes] for m in manifests]
    return classes, maps


def check_data_locations(cfg: DataConfig, *, train: bool = True) -> None:
    """Raise :class:`DataError` naming the key (``data.train[1]``, ``data.val``, ``data.val_sets[0]``) when a
    local shard set location holds no manifest, before any output is written; URLs are checked when read.
    With ``train=False`` (an eval-only job) ``data.train`` is not checked."""
    keyed = [(f"data.train[{i}]", loc) for i, loc in enumerate(cfg.train)] if train else []
    keyed += [("data.val", cfg.val)] if cfg.val else []
    keyed += [(v.key, v.path) for v in val_set_entries(cfg.val_sets)]
    for key, location in keyed:
        try:
            manifest_path(location, key)
        except DataError as e:
            raise DataError(f"{key} '{location}': {e}") from None


def check_data_config(cfg: DataConfig, *, train: bool = True) -> None:
    """Check the ``data.*`` values on their own (the one home of these rules); raises
    :class:`ConfigError` naming the key. With ``train=False`` (an eval-only job) the ``data.train``
    rules are skipped. Cross-section rules (e.g. Mixup needs an even ``data.batch_size``) are
    :meth:`tldist.config.JobConfig.validate`'s."""
    if train:
        if not cfg.train:
            bad_value("data.train", cfg.train, "list at least one shard set, e.g. data.train=[shards/train]")
        if cfg.train_weights and len(cfg.train_weights) != len(cfg.train):
            bad_value("data.train_weights", cfg.train_weights,
                      f"give one weight per data.train entry ({len(cfg.train)})")
        if any(w <= 0 for w in cfg.train_weights):
            bad_value("data.train_weights", cfg.train_weights, "weights must be > 0")
        if cfg.train_urls and len(cfg.train_urls) != len(cfg.train):
            bad_value("data.train_urls", cfg.train_urls, f"give one URL pattern per data.train entry ({len(cfg.train)})")
        if cfg.resampled and cfg.samples_per_epoch <= 0:
            bad_value("data.samples_per_epoch", cfg.samples_per_epoch,
                      "set a positive epoch size when data.resampled=true")
    require_positive("data.batch_size", cfg.batch_size)
    require_at_least("data.num_workers", cfg.num_workers, 0)
    require_positive("data.shuffle_buffer", cfg.shuffle_buffer)
    require_at_least("data.partitions", cfg.partitions, 0)
    if len(cfg.train_crop_scale) != 2 or not 0 < cfg.train_crop_scale[0] <= cfg.train_crop_scale[1] <= 1:
        bad_value("data.train_crop_scale", cfg.train_crop_scale, "use [min, max] with 0 < min <= max <= 1")
    require_choice("data.decode", cfg.decode, ("pil", "torchvision", "nvjpeg"))
    check_augment(cfg)
    if not 0 <= cfg.max_skip_fraction < 1:
        bad_value("data.max_skip_fraction", cfg.max_skip_fraction, "use a fraction in [0, 1)")
    RetryPolicy.from_config(cfg)  # data.read_retries, data.retry_backoff_s


def build_train_loader(cfg: DataConfig, world: World, *, image_size: int, interpolation: str = "bilinear",
                       mean: Sequence[float] = IMAGENET_MEAN, prefetch_factor: int = 2, recycle_batches: bool = False,
                       raise_on_fault: bool = True, grad_accum: int = 1) -> TrainLoader:
    """Infinite, exactly resumable training loader for this rank (see :class:`TrainLoader`).

    With ``recycle_batches`` a micro-batch's image tensor is refilled once :data:`RECYCLE_HOLD` later
    batches have been handed out, sparing a fresh allocation per batch: only for consumers that are
    done with a batch by then (the training loop is; ``clone()`` an image tensor to keep it longer).
    ``data.partitions`` (0: ``lcm(``:data:`~tldist.data.stream.DEFAULT_PARTITIONS` ``, world size)``, at most the smallest source's
    sample count) and the shuffle block ``ceil(data.shuffle_buffer / partitions)`` fix the sample order;
    a resumed loader takes both from its checkpoint. ``grad_accum`` (``train.grad_accum``) decides which samples
    share a micro-batch (:class:`~tldist.data.stream.GlobalLayout`). With ``raise_on_fault=False`` crossing
    ``data.max_skip_fraction`` sets :attr:`TrainLoader.fault` instead of raising, for callers
    that stop all ranks together (the training loop).

    ``data.auto_augment`` / ``data.color_jitter`` run in the workers after crop + flip (``mean``, the
    model's normalization mean in 0..1 units, is the policies' fill colour, as in timm);
    ``data.random_erasing`` adds per-sample seeds to each batch (``_erase``) for
    :func:`tldist.data.augment.erase_batch` on the device. Eval loaders never augment.

    Call on every rank (rank 0 checks the shard files for all, :func:`load_sources`). Do not pass it to
    ``accelerator.prepare``. Raises :class:`DataError` for missing manifests or too many missing local shards,
    and :class:`ConfigError` for inconsistent ``data.*`` settings.
    """
    check_data_config(cfg)
    # -- manifests -> sources; class lists merged by name
    loaded = load_sources(cfg.train, [cfg.train_urls[i] if cfg.train_urls else None for i in range(len(cfg.train))],
                          world, policy=RetryPolicy.from_config(cfg), max_skip_fraction=cfg.max_skip_fraction)
    sources, manifests = [s for s, _ in loaded], [m for _, m in loaded]
    classes, maps = merge_classes(manifests)
    if len(set(tuple(m.classes) for m in manifests)) > 1:
        log.info("train shard sets have different class lists; merged by name into %d classes", len(classes))
    weights = list(cfg.train_weights) or [float(s.num_samples) for s in sources]
    total = sum(weights)
    weights = [w / total for w in weights]
    augment = build_worker_augment(cfg.auto_augment, cfg.color_jitter, image_size=image_size, mean=mean,
                                   interpolation=interpolation)
    transform = build_train_transform(image_size, cfg.train_crop_scale, cfg.hflip, interpolation, augment)
    partitions = cfg.partitions or min(math.lcm(DEFAULT_PARTITIONS, world.world_size), min(s.num_samples for s in sources))
    block = max(1, -(-cfg.shuffle_buffer // partitions))
    dataset = TrainDataset(sources, weights=weights, num_classes=[m.num_classes for m in manifests], label_maps=maps,
                           rank=world.rank, world_size=world.world_size, num_workers=cfg.num_workers, seed=cfg.seed,
                           partitions=partitions, block=block, resampled=cfg.resampled, batch_size=cfg.batch_size,
                           transform=transform, decoder=cfg.decode, max_skip_fraction=cfg.max_skip_fraction,
                           random_erasing=cfg.random_erasing, grad_accum=grad_accum)
    _check_layout(dataset.layout(), world)
    epoch_samples = cfg.samples_per_epoch or sum(s.num_samples for s in sources)
    return TrainLoader(dataset, world=world, num_workers=cfg.num_workers, epoch_samples=epoch_samples,
                       classes=classes, source_names=[str(t) for t in cfg.train], pin_memory=cfg.pin_memory,
                       prefetch_factor=prefetch_factor, recycle_batches=recycle_batches,
                       raise_on_fault=raise_on_fault)


def _check_layout(layout: GlobalLayout, world: World) -> None:
    """Warn (rank 0) about layouts that waste work: more loader workers than partitions, or partitions that
    several ranks read (the world size does not divide ``data.partitions``)."""
    if world.rank != 0:
        return
    slots = layout.world * layout.workers
    if slots > layout.partitions:
        log.warning("data.partitions=%d is less than ranks x data.num_workers = %d: %d loader workers have no "
                    "partition to read; raise data.partitions (a multiple of the world sizes you run on)",
                    layout.partitions, slots, slots - layout.partitions)
    if layout.read_factor() > 1:
        log.warning("the world size %d does not divide data.partitions=%d: each partition is read by %d ranks, so "
                    "every rank reads %dx the records it uses; world sizes dividing %d avoid it", layout.world,
                    layout.partitions, layout.read_factor(), layout.read_factor(), layout.partitions)


def build_eval_loader(cfg: DataConfig, world: World, *, image_size: int, interpolation: str = "bilinear",
                      crop_pct: float = EVAL_CROP_PCT, location: Optional[str] = None,
                      classes: Optional[list[str]] = None, prefetch_factor: int = 2) -> EvalLoader:
    """Eval loader for ``location`` (default ``cfg.val``): each val sample once across ranks x workers.

    Images: resize to ``floor(image_size / crop_pct)`` with ``interpolation``, center-crop
    ``image_size`` (:func:`~tldist.data.transforms.build_eval_transform`; pass the model's
    ``ModelInfo.crop_pct``). ``cfg.val_urls`` applies only to ``cfg.val``. With ``classes`` (the
    model's class list: ``train_loader.classes``, trainer.json or model.json ``classes``) val labels
    are remapped to it by name; the set may hold any subset of them, in any order. Call on every rank (rank
    0 checks the shard files for all). Raises :class:`DataError` for missing manifests, too many missing local
    shards, or val classes the model does not know.
    """
    check_data_config(cfg, train=False)
    if location is None:
        if not cfg.val:
            raise ConfigError("config key 'data.val' is not set: give a validation shard set to evaluate")
        location, pattern = cfg.val, cfg.val_urls
    else:
        pattern = cfg.val_urls if location == cfg.val else None
    (source, manifest), = load_sources([location], [pattern], world, policy=RetryPolicy.from_config(cfg),
                                       max_skip_fraction=cfg.max_skip_fraction)
    label_map = None
    if classes is not None and list(manifest.classes) != list(classes)[:len(manifest.classes)]:
        unknown = [c for c in manifest.classes if c not in classes]
        if unknown:
            more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
            raise DataError(f"val set '{location}' has classes the model does not know: {unknown[:5]}{more} (the "
                            f"model has {len(classes)}: {list(classes)[:5]}{'...' if len(classes) > 5 else ''}); "
                            "evaluate on a set whose classes are a subset of the model's classes")
        index = {c: i for i, c in enumerate(classes)}
        label_map = [index[c] for c in manifest.classes]
    batch_size = cfg.eval_batch_size or 2 * cfg.batch_size
    dataset = EvalDataset(source, num_classes=manifest.num_classes, rank=world.rank, world_size=world.world_size,
                          num_workers=cfg.num_workers, batch_size=batch_size, image_size=image_size,
                          transform=build_eval_transform(image_size, interpolation, crop_pct), decoder=cfg.decode,
                          label_map=label_map)
    return EvalLoader(dataset, num_workers=cfg.num_workers, classes=list(classes or manifest.classes),
                      pin_memory=cfg.pin_memory, prefetch_factor=prefetch_factor)
