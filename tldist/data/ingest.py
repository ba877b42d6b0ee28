"""Planned, parallel and restartable shard writing (``tldist shards ... --workers N [--part R/W]``).

No part holds or looks at more than its own share of a large tree (ImageNet-21k: 14M files):

1. **Count.** The source is listed (names and labels; no ``stat``, no image read, :class:`~tldist.data.sources.Listing`)
   and each sample's key is hashed, ``blake2b(seed/split/key)``, into one of :data:`VBUCKETS` virtual buckets;
   only the bucket counts are kept. The sample order is the buckets in turn, each in hash order: a seeded
   shuffle that needs no list of all samples (``--no-shuffle`` and sources that are not listings keep their
   own order). Shard ``k`` holds positions ``[k*cap, (k+1)*cap)`` of that order, ``cap = max_count`` (lowered
   so there are ``min_shards``); a shard whose source bytes exceed ``max_size`` is cut into equal pieces.
2. **Own share.** Part ``R`` of ``W`` (SLURM array tasks, launcher ranks) writes shards ``k % W == R``: it lists
   the source again and keeps only the samples of the buckets its shards cover (``stat``-ing only those), so
   its memory grows with its share, not with the tree. ``workers`` processes write its shards, each whole, to
   ``<out>/.ingest/<name>`` with a record (digest of the write options and of the shard's key, origin and
   source bytes; sha256 of each tar; skipped files). Tar members carry mtime 0, so every byte follows from
   the source and the options: the result is identical at any ``workers`` and ``W``.
3. **Resume.** A rerun keeps each staged shard whose record has the same digest and whose tars still hash to
   the recorded sha256; the others are written again.
4. **Merge.** Once every shard has a record, :func:`merge` moves the tars into ``<out>`` (named
   ``<split>-%06d.tar`` in order), deletes stale shards of an earlier write and writes ``manifest.json`` last,
   atomically; until then an earlier complete set in ``<out>`` stays readable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import threading
from collections import Counter
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

import tldist
from tldist.data.manifest import MANIFEST_NAME, SEEK_EVERY, Manifest, ShardInfo
from tldist.data.sources import Entry, Listing, Sample, normalize_ext, samples_from_csv, samples_from_imagefolder
from tldist.data.transforms import DECODERS
from tldist.data.writer import (DEFAULT_CHECK, SkipSample, check_key, check_options, check_sample, prepare_image,
                                prepare_out, skip_reason)
from tldist.errors import ConfigError, DataError
from tldist.paths import make_output_dir

log = logging.getLogger("tldist.data")

STAGE_DIR = ".ingest"
PLAN_NAME = "plan.json"
SKIPPED_NAME = "skipped.txt"


VBUCKETS = 1 << 16
"""Virtual buckets of the hash order (a key's bucket is the top 16 bits of its hash): the counting pass keeps
65,536 integers whatever the source's size."""


def key_hash(seed: int, split: str, key: str) -> int:
    """The 64-bit hash that places sample ``key`` in the shuffled order (bucket: its top 16 bits)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{split}/{key}".encode(), digest_size=8).digest(), "big")


class _SourceListing(Listing):
    """A :class:`SampleSource` (random access) or a list of samples as a listing in its own order."""

    def __init__(self, samples: Any):
        if isinstance(samples, (list, tuple)):
            items = list(samples)
            self._n, self._get = len(items), items.__getitem__
            self._describe = lambda pos: (items[pos].key, items[pos].origin, len(items[pos].data or b""))
            self.info = {"type": "custom"}
        elif getattr(samples, "get", None) is not None and getattr(samples, "describe", None) is not None:
            self._n, self._get, self._describe = len(samples), samples.get, samples.describe
            self.info = dict(samples.info)
        else:
            raise DataError(f"the parallel writer needs a sized source with random access (image folder, CSV, "
                            f"torchvision or a list of samples), got {type(samples).__name__}")
        self.shuffle, self.seed = False, 0

    def entries(self) -> Iterator[Entry]:
        for pos in range(self._n):
            key, origin, nbytes = self._describe(pos)
            yield Entry(key, origin, (pos, nbytes))

    def load(self, entry: Entry) -> Sample:
        return self._get(entry.ref[0])

    def size(self, entry: Entry) -> int:
        return entry.ref[1]


def _as_listing(samples: Any) -> Listing:
    return samples if isinstance(samples, Listing) else _SourceListing(samples)


def _count(listing: Listing, split: str) -> tuple[np.ndarray, int]:
    """Pass 1: samples per virtual bucket (hash order) or the total (listed order); checks key forms."""
    counts = np.zeros(VBUCKETS, dtype=np.int64)
    total = 0
    seen: Optional[set[str]] = None if listing.shuffle else set()  # hash order: duplicates meet in their bucket
    for e in listing.entries():
        check_key(e.key, e.origin, seen)
        if listing.shuffle:
            counts[key_hash(listing.seed, split, e.key) >> 48] += 1
        total += 1
    return counts, total


def _own_entries(listing: Listing, split: str, counts: np.ndarray, cap: int, mine: set[int]) -> dict[int, list[Entry]]:
    """Pass 2: the entries of this part's shards, in order, keyed by shard."""
    own: dict[int, list[Entry]] = {k: [] for k in sorted(mine)}
    if not listing.shuffle:
        for pos, e in enumerate(listing.entries()):
            if pos // cap in mine:
                own[pos // cap].append(e)
        return own
    starts = np.concatenate([[0], np.cumsum(counts)])  # first position of each bucket
    wanted = np.zeros(VBUCKETS, dtype=bool)
    for k in mine:  # the buckets overlapping [k*cap, (k+1)*cap)
        lo, hi = k * cap, min((k + 1) * cap, int(starts[-1]))
        wanted[np.searchsorted(starts, lo, "right") - 1:np.searchsorted(starts, hi - 1, "right")] = True
    by_bucket: dict[int, list[tuple[int, str, Entry]]] = {}
    for e in listing.entries():
        h = key_hash(listing.seed, split, e.key)
        if wanted[h >> 48]:
            by_bucket.setdefault(h >> 48, []).append((h, e.key, e))
    for b in sorted(by_bucket):
        rows = sorted(by_bucket.pop(b), key=lambda r: (r[0], r[1]))
        for j, (_, key, e) in enumerate(rows):
            if j and key == rows[j - 1][1]:
                raise DataError(f"duplicate sample key '{key}' ({e.origin}); keys must be unique")
            k = (int(starts[b]) + j) // cap
            if k in own:
                own[k].append(e)
    return own


@dataclass
class PlannedShard:
    name: str
    """Staged name of the shard (``<split>-%06d.tar``; its pieces ``<split>-%06d-%02d.tar``)."""
    entries: list[Entry]
    """Its samples, in order."""
    digest: str
    """sha256 of the write options and the shard's (key, origin, source bytes) list."""
    pieces: list[tuple[str, int, int]]
    """``(staged tar name, first, end)`` of each piece (cut by ``max_size``)."""


def plan_shard(listing: Listing, split: str, k: int, entries: list[Entry], head: bytes,
               max_size: Optional[float]) -> PlannedShard:
    """Shard ``k``'s digest (one ``stat`` per sample) and its pieces: ``ceil(source bytes / max_size)`` pieces
    of equal sample counts."""
    h = hashlib.sha256(head)
    seen: set[str] = set()
    size = 0
    for e in entries:
        check_key(e.key, e.origin, seen)
        nbytes = listing.size(e)
        h.update(f"{e.key}\0{e.origin}\0{nbytes}\n".encode())
        size += max(nbytes, 0)
    n = len(entries)
    parts = max(1, min(n, math.ceil(size / max_size))) if max_size else 1
    name = f"{split}-{k:06d}"
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    pieces = [(f"{name}.tar" if parts == 1 else f"{name}-{j:02d}.tar", bounds[j], bounds[j + 1]) for j in range(parts)]
    return PlannedShard(f"{name}.tar", entries, h.hexdigest(), pieces)


# -- per-shard work (in this process or a forked worker) --------------------------------------------
_JOB: dict[str, Any] = {}
_COUNTER: Any = None  # multiprocessing.Value: images done, read by the progress bar


def _advance(n: int) -> None:
    with _COUNTER.get_lock():
        _COUNTER.value += n


def _init_worker() -> None:
    """Die with the parent (a ``kill -9`` of the writer must not leave workers writing) and use one
    torch thread per process."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: workers end when their pipe closes
        pass
    import torch

    torch.set_num_threads(1)


class _TarOut:
    """A plain ustar tar stream written member by member, hashed (sha256) as it goes.

    Python's ``tarfile`` spends ~0.3 ms of interpreter code per member building headers, more than
    the rest of an unchecked write; sample keys (<= 90 chars of ``[A-Za-z0-9_-]``) + extension
    always fit the 100-byte ustar name, so the header is packed here directly: mode 0444, owner
    ``bigdata`` (as WebDataset's writer), mtime 0, so the bytes depend on the content only; the
    bytes are those of ``tarfile`` in ``USTAR_FORMAT`` with the same fields (tests/unit/data/test_ingest.py).
    Readers: :mod:`tldist.data.tar`, ``tarfile``, WebDataset, GNU tar.
    """

    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()
        self.offset = 0
        """Bytes written so far: the offset the next member's header will have (for the seek index)."""

    def _put(self, b: bytes) -> None:
        self.h.update(b)
        self.f.write(b)
        self.offset += len(b)

    def add(self, name: str, data: bytes) -> None:
        raw = name.encode("ascii")
        if len(raw) > 100:
            raise DataError(f"tar member name '{name}' is longer than 100 bytes")
        header = bytearray(512)
        header[0:len(raw)] = raw
        header[100:108] = b"0000444\0"
        header[108:116] = header[116:124] = b"0000000\0"
        header[124:136] = b"%011o\0" % len(data)
        header[136:148] = b"00000000000\0"
        header[148:156] = b" " * 8
        header[156:157] = b"0"
        header[257:265] = b"ustar\x0000"
        header[265:272] = header[297:304] = b"bigdata"
        header[148:156] = b"%06o\0 " % sum(header)
        self._put(bytes(header))
        self._put(data)
        if len(data) % 512:
            self._put(bytes(512 - len(data) % 512))

    def close(self, written: int) -> None:
        """End-of-archive blocks, padded to tar's 10240-byte record size."""
        end = 1024 + (-(written + 1024)) % 10240
        self._put(bytes(end))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj: Any) -> None:
    """Atomically (array tasks on several nodes write the same plan.json at once)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _finished(stage: Path, shard: PlannedShard, full_check: bool = True) -> Optional[dict[str, Any]]:
    """The record of a finished staged shard matching the plan, else ``None``."""
    return _finished_record(stage, shard.name, shard.digest, full_check)


def _finished_record(stage: Path, name: str, digest: Optional[str], full_check: bool) -> Optional[dict[str, Any]]:
    rec = _read_json(stage / f"{name}.json")
    if not rec or (digest is not None and rec.get("digest") != digest):
        return None
    for piece in rec["pieces"]:
        if piece["count"] == 0:
            continue
        tar = stage / piece["name"]
        if not tar.is_file() or tar.stat().st_size != piece["bytes"]:
            return None
        if full_check and _sha256(tar) != piece["sha256"]:
            return None
    return rec


def _write_piece(listing: Listing, entries: list[Entry], partial: Path, o: dict[str, Any],
                 num_classes: int) -> dict[str, Any]:
    count, skipped, offsets = 0, [], []
    class_counts = [0] * num_classes
    reencoded: Counter = Counter()
    with open(partial, "wb") as f:
        out = _TarOut(f)
        for e in entries:
            s: Sample = listing.load(e)
            ext = check_sample(s, num_classes)
            try:
                data, ext = prepare_image(Sample(s.key, s.data, ext, s.label, s.origin, s.error), o["reencode"],
                                          o["quality"], o["max_side"], o["check"], o["decoders"])
            except SkipSample as err:
                skipped.append(f"{s.origin or s.key}: {err}")
            else:
                if count % SEEK_EVERY == 0:
                    offsets.append([count, out.offset])
                out.add(f"{s.key}.{ext}", data)
                out.add(f"{s.key}.cls", str(s.label).encode())
                count += 1
                class_counts[s.label] += 1
                if ext != normalize_ext(s.ext):
                    reencoded[f"{normalize_ext(s.ext)} -> {ext}"] += 1
            _advance(1)
        out.close(f.tell())
    return {"count": count, "skipped": skipped, "sha256": out.h.hexdigest() if count else None,
            "bytes": partial.stat().st_size if count else 0, "class_counts": class_counts,
            "reencoded": dict(reencoded), "offsets": offsets}


def _write_shard(k: int) -> dict[str, Any]:
    job = _JOB
    shard: PlannedShard = job["shards"][k]
    stage: Path = job["stage"]
    kept = _finished(stage, shard)
    if kept is not None:
        _advance(len(shard.entries))
        return {**kept, "kept": True}
    (stage / f"{shard.name}.json").unlink(missing_ok=True)
    pieces = []
    for name, lo, hi in shard.pieces:
        partial = stage / f"{name}.partial"
        rec = _write_piece(job["listing"], shard.entries[lo:hi], partial, job["options"], job["num_classes"])
        if rec["count"]:
            os.replace(partial, stage / name)
        else:
            partial.unlink()
        pieces.append({"name": name, **rec})
    rec = {"digest": shard.digest, "pieces": pieces}
    _write_json(stage / f"{shard.name}.json", rec)
    return {**rec, "kept": False}


class _Progress:
    """tqdm bar (images/s, ETA) fed from the shared counter by a polling thread."""

    def __init__(self, total: int, desc: str, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="img", disable=not enabled, smoothing=0.05, dynamic_ncols=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            self.bar.update(_COUNTER.value - self.bar.n)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.bar.update(_COUNTER.value - self.bar.n)
        self.bar.close()


def write_planned(samples: Any, out_dir: str | Path, split: str, classes: list[str], *,
                  max_count: Optional[int] = 10000, max_size: Optional[float] = 500e6, min_shards: int = 1,
                  reencode: Optional[str] = None, quality: int = 90, max_side: int = 0, check: str = DEFAULT_CHECK,
                  decoders: Sequence[str] = DECODERS, meta: Optional[dict[str, Any]] = None, workers: int = 1,
                  rank: int = 0, world: int = 1, progress: bool = False) -> Optional[Manifest]:
    """Write ``samples`` as ``<out_dir>/<split>-%06d.tar`` + ``manifest.json`` by the plan above.

    ``samples``: a :class:`~tldist.data.sources.Listing` (image folders, CSV lists), a sized
    :class:`~tldist.data.sources.SampleSource` with random access, or a list of samples. Options are those of
    :func:`~tldist.data.writer.write_shards`. ``workers`` processes write this part's shards; with
    ``world > 1`` this call writes only shards ``k % world == rank`` and returns ``None`` (run :func:`merge`
    once all parts are done); else it merges and returns the manifest. ``progress`` shows a tqdm bar with
    images/s and ETA on stderr.
    """
    global _COUNTER
    out_dir = Path(out_dir)
    reencode = normalize_ext(reencode) if reencode else None
    check_options(split, classes, max_count, max_size, min_shards, reencode, quality, max_side, check, decoders)
    if workers < 1 or world < 1 or not 0 <= rank < world:
        raise DataError(f"need workers >= 1 and 0 <= rank < world, got workers={workers} rank={rank} world={world}")
    listing = _as_listing(samples)
    prepare_out(out_dir, split)
    writer = {"max_count": max_count, "max_size": max_size, "min_shards": min_shards, "reencode": reencode,
              "quality": quality, "max_side": max_side, "check": check,
              "decoders": list(decoders) if check == "decode" else []}
    opts = {"reencode": reencode, "quality": quality, "max_side": max_side, "check": check, "decoders": list(decoders)}
    counts, total = _count(listing, split)  # pass 1: the whole listing, bucket counts only
    if total == 0:
        raise DataError(f"no samples to write for split '{split}'; check the source")
    cap = max_count or 2**62
    if min_shards > 1:
        cap = min(cap, max(1, math.ceil(total / min_shards)))
    num_shards = math.ceil(total / cap)
    order = "hash" if listing.shuffle else "listed"
    head = json.dumps({"classes": list(classes), **writer, "order": order, "seed": listing.seed,
                       "version": tldist.__version__}, sort_keys=True).encode()
    stage = out_dir / STAGE_DIR
    make_output_dir(stage, "output")
    full_meta = {"tldist_version": tldist.__version__, "source": dict(listing.info), "writer": writer, **(meta or {})}
    plan = {"split": split, "classes": list(classes), "meta": full_meta, "num_shards": num_shards,
            "num_samples": total, "order": order}
    if _read_json(stage / PLAN_NAME) != plan:
        _write_json(stage / PLAN_NAME, plan)
    mine = {k for k in range(num_shards) if k % world == rank}
    own = _own_entries(listing, split, counts, cap, mine)  # pass 2: this part's share only
    shards = {k: plan_shard(listing, split, k, entries, head, max_size) for k, entries in own.items()}
    ctx = get_context("fork")
    _COUNTER = ctx.Value("q", 0)
    _JOB.update(shards=shards, stage=stage, listing=listing, options=opts, num_classes=len(classes))
    bar = None
    try:
        todo = sorted(shards)
        total_mine = sum(len(sh.entries) for sh in shards.values())
        desc = split if world == 1 else f"{split} part {rank}/{world}"
        if workers == 1 or len(todo) <= 1:
            bar = _Progress(total_mine, desc, progress)
            records = [_write_shard(k) for k in todo]
        else:
            pool = ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=_init_worker)
            try:
                futures = [pool.submit(_write_shard, k) for k in todo]
                bar = _Progress(total_mine, desc, progress)
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                failed = [f for f in done if f.exception() is not None]
                if failed:  # shards being written are finished (and kept for a rerun), the rest cancelled
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise failed[0].exception()
                records = [f.result() for f in futures]
            except BaseException:  # Ctrl-C: do not wait for the queued shards
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown()
    finally:
        if bar is not None:
            bar.close()
        _JOB.clear()
    kept = sum(r["kept"] for r in records)
    if kept:
        log.info("resumed '%s': kept %d of %d finished shards, wrote %d", out_dir, kept, len(todo), len(todo) - kept)
    if world > 1:
        return None
    return merge(out_dir)


def merge(out_dir: str | Path) -> Manifest:
    """Turn the staged parts of a planned write into the shard set: every planned shard must have
    a record; moves the tars into ``out_dir``, removes stale shards, writes the manifest last."""
    out_dir = Path(out_dir)
    stage = out_dir / STAGE_DIR
    plan = _read_json(stage / PLAN_NAME)
    if plan is None or "num_shards" not in plan:
        raise DataError(f"no write plan at '{stage / PLAN_NAME}': nothing to merge; run 'tldist shards' first")
    split = plan["split"]
    names = [f"{split}-{k:06d}.tar" for k in range(plan["num_shards"])]
    records = [_finished_record(stage, name, None, full_check=False) for name in names]
    missing = [n for n, r in zip(names, records) if r is None]
    if missing:
        raise DataError(f"'{out_dir}': {len(missing)} of {len(names)} shards are not written yet (e.g. {missing[:3]}); "
                        "run the remaining parts (or rerun the write: it resumes) before merging")
    pieces = [p for r in records for p in r["pieces"]]
    written = [p for p in pieces if p["count"] > 0]
    skipped = [line for p in pieces for line in p["skipped"]]
    if not written:
        raise DataError(f"no usable samples for '{out_dir}' ({len(skipped)} skipped"
                        + (f", e.g. {skipped[0]}" if skipped else "") + "); check the source")
    for line in skipped[:20]:
        log.warning("skipped %s", line)
    if len(skipped) > 20:
        log.warning("skipped %d unreadable images in total for '%s' (all listed in %s)", len(skipped), out_dir,
                    out_dir / SKIPPED_NAME)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # no manifest describes the dir until the new one exists
    final = [f"{split}-{i:06d}.tar" for i in range(len(written))]
    for p, name in zip(written, final):
        os.replace(stage / p["name"], out_dir / name)
    for stale in out_dir.glob(f"{split}-*.tar"):
        if stale.name not in set(final) and stale.name[len(split) + 1:-4].isdigit():
            stale.unlink()
    if skipped:
        (out_dir / SKIPPED_NAME).write_text("".join(f"{line}\n" for line in skipped))
    else:
        (out_dir / SKIPPED_NAME).unlink(missing_ok=True)
    meta = dict(plan["meta"])
    meta.update(skipped=len(skipped), skipped_examples=skipped[:10], skipped_reasons=dict(sorted(Counter(
        skip_reason(line) for line in skipped).items())))
    meta["class_counts"] = [sum(c) for c in zip(*(p["class_counts"] for p in pieces))]
    reencoded: Counter = Counter()
    for p in pieces:
        reencoded.update(p.get("reencoded") or {})
    meta["reencoded"] = dict(sorted(reencoded.items()))
    manifest = Manifest(split=split, classes=plan["classes"],
                        shards=[ShardInfo(name, p["count"], offsets=p.get("offsets") or []) for p, name in zip(written, final)],
                        meta=meta, base=str(out_dir))
    manifest.save(out_dir / MANIFEST_NAME)
    shutil.rmtree(stage, ignore_errors=True)
    return manifest


# ---- image folders and CSV lists ------------------------------------------------------------------
VAL_DIR_NAMES = ("val", "valid", "validation")
"""Names of a tree's validation folder next to ``train/`` (ImageNet's layout: ``train/`` + ``val/``)."""


def imagefolder_layout(root: str | Path) -> Optional[dict[str, Path]]:
    """``{'train': root/train, 'val': root/val}`` when ``root`` holds split trees, else ``None``."""
    root = Path(root)
    train = root / "train"
    val = next((root / n for n in VAL_DIR_NAMES if (root / n).is_dir()), None)
    if train.is_dir() and val is not None and any(p.is_dir() for p in train.iterdir()):
        return {"train": train, "val": val}
    return None


def write_imagefolder(root: str | Path, out_dir: str | Path, *, split: str = "train", val_fraction: float = 0.0,
                      seed: int = 0, shuffle: bool = True, keep_empty_classes: bool = False,
                      **write_kw: Any) -> dict[str, Manifest]:
    """Shard an image-folder tree into ``out_dir/<split>``; one call writes train and val when possible.

    If ``root`` has ``train/`` and ``val/`` trees both are written (val uses train's classes);
    else with ``val_fraction > 0`` a seeded stratified split writes ``train`` and ``val``;
    else the whole tree becomes ``split``. Empty class folders raise :class:`DataError`
    unless ``keep_empty_classes``. Writing is planned, parallel (``workers=N``) and resumable
    (see the module docstring). Returns ``{split: Manifest}``.
    """
    out_dir = Path(out_dir)
    layout = imagefolder_layout(root)
    result: dict[str, Manifest] = {}
    if layout:
        if val_fraction:
            raise ConfigError(f"'{root}' already has train/ and {layout['val'].name}/ trees; drop the val fraction")
        classes, train = samples_from_imagefolder(layout["train"], split="train", seed=seed, shuffle=shuffle,
                                                  keep_empty_classes=keep_empty_classes)
        result["train"] = write_planned(train, out_dir / "train", "train", classes, **write_kw)
        _, val = samples_from_imagefolder(layout["val"], split="val", seed=seed, classes=classes, shuffle=shuffle)
        result["val"] = write_planned(val, out_dir / "val", "val", classes, **write_kw)
        return result
    splits = ("train", "val") if val_fraction else (split,)
    for name in splits:
        classes, samples = samples_from_imagefolder(root, split=name, val_fraction=val_fraction, seed=seed,
                                                    shuffle=shuffle, keep_empty_classes=keep_empty_classes)
        result[name] = write_planned(samples, out_dir / name, name, classes, **write_kw)
    return result


def write_csv(path: str | Path, out_dir: str | Path, *, root: Optional[str | Path] = None,
              classes: Optional[list[str]] = None, split: str = "train", val_fraction: float = 0.0, seed: int = 0,
              shuffle: bool = True, **write_kw: Any) -> dict[str, Manifest]:
    """Shard the images listed in a ``path,label`` CSV into ``out_dir/<split>``.

    With ``val_fraction > 0`` a seeded stratified split of the rows writes ``out_dir/train``
    and ``out_dir/val`` (as :func:`write_imagefolder` does); else all rows become ``split``.
    See :func:`~tldist.data.sources.samples_from_csv` for the file format. Returns ``{split: Manifest}``.
    """
    out_dir = Path(out_dir)
    result: dict[str, Manifest] = {}
    for name in (("train", "val") if val_fraction else (split,)):
        names, samples = samples_from_csv(path, root, classes=classes, split=name, val_fraction=val_fraction,
                                          seed=seed, shuffle=shuffle)
        result[name] = write_planned(samples, out_dir / name, name, names, **write_kw)
    return result
