"""Streaming train/eval loaders over WebDataset shards: deterministic, evenly split, exactly resumable.

Pipeline of one rank (stages in order; details in :mod:`tldist.data.stream` and
:mod:`tldist.data.worker`):

1. manifests -> :class:`~tldist.data.stream.SourceSpec` (shard URLs + per-shard counts) and one
   merged class list;
2. every (rank, worker) *slot* reads its own sample range of each stream-epoch (shard order
   from ``(seed, epoch)``, split at sample level -> every slot gets N//S or N//S+1 samples);
3. blocks of ``shuffle_buffer`` raw records are shuffled, then decoded + augmented in the
   worker into uint8 tensors and collated into batches carrying the worker's stream position;
4. the DataLoader (``batch_size=None``, ``in_order=True``) hands batches out round-robin over
   workers; :class:`TrainLoader` records each worker's position, so ``state_dict()`` captures
   exactly what was consumed and a resumed loader continues with the very next batch.

These loaders must NOT go through ``accelerator.prepare``: accelerate would shard the
IterableDataset a second time. Normalize batches in the training process with
:class:`~tldist.data.transforms.Normalizer`.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from typing import Any, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from tldist.config import DataConfig
from tldist.data.augment import build_worker_augment, check_augment
from tldist.data.manifest import Manifest, load_manifest, resolve_shard_urls
from tldist.data.stream import SourceSpec
from tldist.data.transforms import EVAL_CROP_PCT, IMAGENET_MEAN, build_eval_transform, build_train_transform
from tldist.data.worker import MIN_READ_FOR_FAULT_CHECK, EvalDataset, TrainDataset, skip_error
from tldist.errors import ConfigError, DataError
from tldist.world import World

log = logging.getLogger("tldist.data")

STATE_VERSION = 1


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
    """Infinite iterator of training batches for this rank, with exact ``state_dict`` resume.

    Batch fields: ``image`` uint8 [B,3,H,W], ``label`` int64 [B], ``key`` list[str],
    ``source`` int64 [B] (mixture index), ``_worker`` (logical worker), ``_buf`` (its buffer
    index, -1 if not recycled), ``_pos`` (that worker's stream position after the batch),
    ``_read``/``_skipped`` (its cumulative counts).
    """

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
        self._recycle = recycle_batches and num_workers > 0
        self._held: deque[tuple[int, int]] = deque()  # (worker, buffer) of recent batches not yet released
        self._workers = dataset.workers
        self._states = [dict(s) for s in dataset.start]  # per logical worker, as of the last batch handed out
        self._batches = 0
        self._it: Optional[Iterator] = None
        self._loader: Optional[DataLoader] = None

    # -- iteration -------------------------------------------------------------------------
    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            # a fresh DataLoader starts with its worker 0: make it play logical worker n % W
            self.dataset.rotation = self._batches % self._workers
            self.dataset.start = [dict(s) for s in self._states]
            # new workers get their own buffer flags (old workers may still be shutting down)
            self.dataset.free = torch.ones(self._workers, RECYCLE_BUFFERS, dtype=torch.uint8).share_memory_() \
                if self._recycle else None
            self._held.clear()
            self._loader = _make_dataloader(self.dataset, self.num_workers, self._pin, self._prefetch)
            self._it = iter(self._loader)
        batch = next(self._it)
        w = batch["_worker"]
        if w != self._batches % self._workers:  # round-robin is what makes resume exact
            raise RuntimeError(f"batch {self._batches} came from loader worker {w}, expected "
                               f"{self._batches % self._workers}: batches must arrive in order")
        pos = batch["_pos"]
        positions, mix = ([pos], 0) if isinstance(pos, int) else (list(pos["sources"]), int(pos["mix"]))
        self._states[w] = {"positions": positions, "mix": mix, "read": batch["_read"], "skipped": batch["_skipped"]}
        self._batches += 1
        if self._recycle and batch["_buf"] >= 0:  # the batch RECYCLE_HOLD before this one is done with
            self._held.append((w, batch["_buf"]))
            while len(self._held) > RECYCLE_HOLD:
                self.dataset.free[self._held.popleft()] = 1
        # -- fault threshold over this rank's workers
        stats = self.stats()
        read, skipped = stats["read"], stats["skipped"]
        if read >= MIN_READ_FOR_FAULT_CHECK and skipped > self.dataset.max_skip_fraction * read and self.fault is None:
            self.fault = skip_error(read, skipped, self.dataset.max_skip_fraction, f"on rank {self.world.rank}")
            if self.raise_on_fault:
                raise self.fault
        return batch

    def close(self) -> None:
        """Stop the worker processes (they are also stopped when the loader is garbage collected)."""
        self._it, self._loader = None, None

    # -- bookkeeping -----------------------------------------------------------------------
    @property
    def batches(self) -> int:
        """Batches handed out since the start of training (including before a resume)."""
        return self._batches

    def stats(self) -> dict[str, int]:
        """Samples read and skipped on this rank (summed over workers, cumulative over resumes)."""
        return {"read": sum(s["read"] for s in self._states), "skipped": sum(s["skipped"] for s in self._states)}

    def _fingerprint(self) -> dict[str, Any]:
        d = self.dataset
        return {"world_size": self.world.world_size, "rank": self.world.rank, "num_workers": self.num_workers,
                "batch_size": d.batch_size, "seed": d.seed, "shuffle_buffer": d.shuffle_buffer,
                "resampled": d.resampled, "weights": [round(float(w), 12) for w in d.weights],
                "sources": [{"name": s.name, "shards": s.num_shards, "samples": s.num_samples} for s in d.sources]}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue with the exact next batch (see :meth:`load_state_dict`)."""
        sd = {"version": STATE_VERSION, **self._fingerprint(), "batches": self._batches}
        sd["positions"] = [self.dataset.pos_value(s["positions"], s["mix"]) for s in self._states]
        sd["read"] = [s["read"] for s in self._states]
        sd["skipped"] = [s["skipped"] for s in self._states]
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` before the first batch; settings must match the saved run.

        Raises :class:`ConfigError` naming the mismatching key (world size, workers, batch size,
        seed, shuffle buffer, resampling, mixture weights or the shard sets).
        """
        if self._it is not None:
            raise RuntimeError("TrainLoader.load_state_dict must be called before the first batch")
        if sd.get("version") != STATE_VERSION:
            raise ConfigError(f"loader state version {sd.get('version')!r} is not {STATE_VERSION}: "
                              f"this checkpoint was written by another tldist version")
        mine = self._fingerprint()
        for key, value in mine.items():
            saved = sd.get(key)
            if key == "sources" and saved is not None:  # names may change (moved data); sizes may not
                value = [(s["shards"], s["samples"]) for s in value]
                saved = [(s["shards"], s["samples"]) for s in saved]
            if saved != value:
                raise ConfigError(
                    f"cannot resume the data loader: '{key}' was {saved!r} in the checkpoint but is {value!r} "
                    f"now; resume with the same world size and data settings (data.num_workers, "
                    f"data.batch_size, data.seed, data.shuffle_buffer, data.train...) or start a new run")
        self._batches = int(sd["batches"])
        self._states = []
        for pos, read, skipped in zip(sd["positions"], sd["read"], sd["skipped"]):
            positions, mix = ([int(pos)], 0) if isinstance(pos, int) else (list(pos["sources"]), int(pos["mix"]))
            self._states.append({"positions": positions, "mix": mix, "read": int(read), "skipped": int(skipped)})


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
        self._stats: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._stats = {}
        n = 0
        for batch in self._loader:
            self._stats[batch["_worker"]] = (batch["_read"], batch["_skipped"])
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
        return {"read": sum(r for r, _ in self._stats.values()), "skipped": sum(s for _, s in self._stats.values())}


# ---------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------

def load_source(location: str, pattern: Optional[str] = None) -> tuple[SourceSpec, Manifest]:
    """Manifest at ``location`` -> (SourceSpec, Manifest). Missing local shards raise DataError."""
    manifest = load_manifest(location)
    urls = resolve_shard_urls(manifest, pattern or None)
    return SourceSpec(str(location), tuple(urls), tuple(s.num_samples for s in manifest.shards)), manifest


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


def _check(cfg: DataConfig) -> None:
    if cfg.batch_size <= 0:
        raise ConfigError(f"config key 'data.batch_size' has bad value {cfg.batch_size}: must be > 0")
    if cfg.num_workers < 0:
        raise ConfigError(f"config key 'data.num_workers' has bad value {cfg.num_workers}: must be >= 0")
    if cfg.decode not in ("pil", "torchvision", "nvjpeg"):
        raise ConfigError(f"config key 'data.decode' has bad value {cfg.decode!r}: choose pil, torchvision or nvjpeg")
    check_augment(cfg)


def build_train_loader(cfg: DataConfig, world: World, *, image_size: int, interpolation: str = "bilinear",
                       mean: Sequence[float] = IMAGENET_MEAN, prefetch_factor: int = 2, recycle_batches: bool = False,
                       raise_on_fault: bool = True) -> TrainLoader:
    """Infinite, exactly resumable training loader for this rank (see :class:`TrainLoader`).

    With ``recycle_batches`` the workers refill a batch's shared-memory image buffer once
    :data:`RECYCLE_HOLD` later batches have been handed out, sparing a fresh allocation per
    batch: only for consumers that are done with a batch by then (the training loop is;
    ``clone()`` an image tensor to keep it longer). With ``raise_on_fault=False`` crossing
    ``data.max_skip_fraction`` sets :attr:`TrainLoader.fault` instead of raising, for callers
    that stop all ranks together (the training loop).

    ``data.auto_augment`` / ``data.color_jitter`` run in the workers after crop + flip (``mean``, the
    model's normalization mean in 0..1 units, is the policies' fill colour, as in timm);
    ``data.random_erasing`` adds per-sample seeds to each batch (``_erase``) for
    :func:`tldist.data.augment.erase_batch` on the device. Eval loaders never augment.

    Do not pass it to ``accelerator.prepare``. Raises :class:`DataError` for missing manifests
    or local shards and :class:`ConfigError` for inconsistent ``data.*`` settings.
    """
    _check(cfg)
    if not cfg.train:
        raise ConfigError("config key 'data.train' is empty: list at least one shard set, e.g. data.train=[shards/train]")
    if cfg.train_weights and len(cfg.train_weights) != len(cfg.train):
        raise ConfigError(f"config key 'data.train_weights' has {len(cfg.train_weights)} values for "
                          f"{len(cfg.train)} data.train entries: give one weight per entry")
    if any(w <= 0 for w in cfg.train_weights):
        raise ConfigError(f"config key 'data.train_weights' has bad value {cfg.train_weights}: weights must be > 0")
    if cfg.train_urls and len(cfg.train_urls) != len(cfg.train):
        raise ConfigError(f"config key 'data.train_urls' has {len(cfg.train_urls)} patterns for "
                          f"{len(cfg.train)} data.train entries: give one per entry")
    if cfg.resampled and cfg.samples_per_epoch <= 0:
        raise ConfigError("config key 'data.samples_per_epoch' must be > 0 when data.resampled=true")
    # -- manifests -> sources; class lists merged by name
    loaded = [load_source(loc, cfg.train_urls[i] if cfg.train_urls else None) for i, loc in enumerate(cfg.train)]
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
    dataset = TrainDataset(sources, weights=weights, num_classes=[m.num_classes for m in manifests], label_maps=maps,
                           rank=world.rank, world_size=world.world_size, num_workers=cfg.num_workers, seed=cfg.seed,
                           shuffle_buffer=cfg.shuffle_buffer, resampled=cfg.resampled, batch_size=cfg.batch_size,
                           transform=transform, decoder=cfg.decode, max_skip_fraction=cfg.max_skip_fraction,
                           random_erasing=cfg.random_erasing)
    epoch_samples = cfg.samples_per_epoch or sum(s.num_samples for s in sources)
    return TrainLoader(dataset, world=world, num_workers=cfg.num_workers, epoch_samples=epoch_samples,
                       classes=classes, source_names=[str(t) for t in cfg.train], pin_memory=cfg.pin_memory,
                       prefetch_factor=prefetch_factor, recycle_batches=recycle_batches,
                       raise_on_fault=raise_on_fault)


def build_eval_loader(cfg: DataConfig, world: World, *, image_size: int, interpolation: str = "bilinear",
                      crop_pct: float = EVAL_CROP_PCT, location: Optional[str] = None,
                      classes: Optional[list[str]] = None, prefetch_factor: int = 2) -> EvalLoader:
    """Eval loader for ``location`` (default ``cfg.val``): each val sample once across ranks x workers.

    Images: resize to ``floor(image_size / crop_pct)`` with ``interpolation``, center-crop
    ``image_size`` (:func:`~tldist.data.transforms.build_eval_transform`; pass the model's
    ``ModelInfo.crop_pct``). ``cfg.val_urls`` applies only to ``cfg.val``. With ``classes`` (the
    model's class list: ``train_loader.classes``, trainer.json or model.json ``classes``) val labels
    are remapped to it by name; the set may hold any subset of them, in any order. Raises
    :class:`DataError` for missing manifests or local shards, or val classes the model does not know.
    """
    _check(cfg)
    if location is None:
        if not cfg.val:
            raise ConfigError("config key 'data.val' is not set: give a validation shard set to evaluate")
        location, pattern = cfg.val, cfg.val_urls
    else:
        pattern = cfg.val_urls if location == cfg.val else None
    source, manifest = load_source(location, pattern)
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
