"""Planned, parallel and restartable shard writing (``tldist shards ... --workers N``).

1. **Plan.** The source's (seeded) sample order is cut into shards up front: a shard closes at
   ``max_count`` samples (lowered so there are ``min_shards``) or once the *source* bytes of
   its samples reach ``max_size`` (file sizes from ``stat``; a re-encode changes the stored
   size, so that bound is then approximate). A skipped image leaves its shard one smaller; a
   shard left empty is dropped. Each shard gets a digest of its samples (key, origin, source
   bytes) and of the write options.
2. **Write.** Each shard is written whole by one process: ``workers`` processes on this
   machine, and shard ``k`` goes to ``rank = k % world`` when the plan is split over SLURM
   array tasks or launcher ranks. It goes to ``<out>/.ingest/<name>`` with a record
   ``<name>.json`` (digest, samples, sha256 of the tar, skipped files). Tar members carry
   mtime 0, so every byte follows from the plan: the result is identical at any ``workers``
   and ``world``.
3. **Resume.** A rerun keeps each staged shard whose record has the plan's digest and whose
   tar still hashes to the recorded sha256; the others are written again.
4. **Merge.** Once every shard has a record, :func:`merge` moves the tars into ``<out>``,
   deletes stale shards of an earlier write and writes ``manifest.json`` last, atomically;
   until then an earlier complete set in ``<out>`` stays readable.
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
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Optional, Sequence

import tldist
from tldist.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, load_manifest
from tldist.data.sources import Sample, SampleSource, normalize_ext
from tldist.data.transforms import DECODERS
from tldist.data.writer import (DEFAULT_CHECK, _check_options, _prepare, _prepare_out, _Skip, check_key,
                                 check_sample)
from tldist.errors import DataError

log = logging.getLogger("tldist.data")

STAGE_DIR = ".ingest"
PLAN_NAME = "plan.json"
SKIPPED_NAME = "skipped.txt"


@dataclass
class PlannedShard:
    name: str
    start: int
    """First position (in the source order) of the shard's samples."""
    end: int
    """One past its last position."""
    digest: str
    """sha256 of the write options and the shard's (key, origin, source bytes) list."""


def _as_source(samples: Any) -> SampleSource:
    """A source with ``get``/``describe``; a list of :class:`Sample` is wrapped."""
    if getattr(samples, "get", None) is not None and getattr(samples, "describe", None) is not None:
        return samples
    if isinstance(samples, (list, tuple)):
        items = list(samples)
        return SampleSource(len(items), lambda: iter(items), {"type": "custom"}, get=items.__getitem__,
                            describe=lambda pos: (items[pos].key, items[pos].origin, len(items[pos].data or b"")))
    raise DataError(f"the parallel writer needs a sized source with random access (image folder, CSV, "
                    f"torchvision or a list of samples), got {type(samples).__name__}")


def plan_shards(source: SampleSource, split: str, options: dict[str, Any], *, max_count: Optional[int],
                max_size: Optional[float], min_shards: int) -> list[PlannedShard]:
    """Cut ``source``'s order into shards (see the module doc); checks keys are valid and unique."""
    n = len(source)
    if n == 0:
        raise DataError(f"no samples to write for split '{split}'; check the source")
    cap = max_count or 2**62
    if min_shards > 1:
        cap = min(cap, max(1, math.ceil(n / min_shards)))
    limit = max_size or float("inf")
    head = json.dumps(options, sort_keys=True).encode()
    shards: list[PlannedShard] = []
    seen: set[str] = set()
    start, count, size, h = 0, 0, 0, hashlib.sha256(head)
    for pos in range(n):
        key, origin, nbytes = source.describe(pos)
        check_key(key, origin, seen)
        h.update(f"{key}\0{origin}\0{nbytes}\n".encode())
        count, size = count + 1, size + max(nbytes, 0)
        if count >= cap or size >= limit or pos == n - 1:
            shards.append(PlannedShard(f"{split}-{len(shards):06d}.tar", start, pos + 1, h.hexdigest()))
            start, count, size, h = pos + 1, 0, 0, hashlib.sha256(head)
    return shards


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
    bytes are those of ``tarfile`` in ``USTAR_FORMAT`` with the same fields (tests/test_ingest.py).
    Readers: :mod:`tldist.data.tar`, ``tarfile``, WebDataset, GNU tar.
    """

    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def _put(self, b: bytes) -> None:
        self.h.update(b)
        self.f.write(b)

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
    rec = _read_json(stage / f"{shard.name}.json")
    if not rec or rec.get("digest") != shard.digest:
        return None
    if rec["count"] == 0:
        return rec
    tar = stage / shard.name
    if not tar.is_file() or tar.stat().st_size != rec["bytes"]:
        return None
    return rec if not full_check or _sha256(tar) == rec["sha256"] else None


def _write_shard(k: int) -> dict[str, Any]:
    job = _JOB
    shard: PlannedShard = job["shards"][k]
    stage: Path = job["stage"]
    kept = _finished(stage, shard)
    if kept is not None:
        _advance(shard.end - shard.start)
        return {**kept, "kept": True}
    (stage / f"{shard.name}.json").unlink(missing_ok=True)
    source, o = job["source"], job["options"]
    partial = stage / f"{shard.name}.partial"
    count, skipped = 0, []
    with open(partial, "wb") as f:
        out = _TarOut(f)
        for pos in range(shard.start, shard.end):
            s: Sample = source.get(pos)
            ext = check_sample(s, job["num_classes"])
            try:
                data, ext = _prepare(Sample(s.key, s.data, ext, s.label, s.origin, s.error), o["reencode"],
                                     o["quality"], o["max_side"], o["check"], o["decoders"])
            except _Skip as e:
                skipped.append(f"{s.origin or s.key}: {e}")
            else:
                out.add(f"{s.key}.{ext}", data)
                out.add(f"{s.key}.cls", str(s.label).encode())
                count += 1
            _advance(1)
        out.close(f.tell())
    rec = {"digest": shard.digest, "count": count, "skipped": skipped, "sha256": None, "bytes": 0}
    if count:
        rec.update(sha256=out.h.hexdigest(), bytes=partial.stat().st_size)
        os.replace(partial, stage / shard.name)
    else:
        partial.unlink()
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

    Options are those of :func:`~tldist.data.writer.write_shards`. ``workers`` processes write
    this rank's shards; with ``world > 1`` this call writes only shards ``k % world == rank``
    and returns ``None`` (run :func:`merge` once all ranks are done); else it merges and returns
    the manifest. ``progress`` shows a tqdm bar with images/s and ETA on stderr.
    """
    global _COUNTER
    out_dir = Path(out_dir)
    reencode = normalize_ext(reencode) if reencode else None
    _check_options(split, classes, max_count, max_size, min_shards, reencode, quality, max_side, check, decoders)
    if workers < 1 or world < 1 or not 0 <= rank < world:
        raise DataError(f"need workers >= 1 and 0 <= rank < world, got workers={workers} rank={rank} world={world}")
    source = _as_source(samples)
    _prepare_out(out_dir, split)
    writer = {"max_count": max_count, "max_size": max_size, "min_shards": min_shards, "reencode": reencode,
              "quality": quality, "max_side": max_side, "check": check,
              "decoders": list(decoders) if check == "decode" else []}
    opts = {"reencode": reencode, "quality": quality, "max_side": max_side, "check": check, "decoders": list(decoders)}
    shards = plan_shards(source, split, {"classes": list(classes), **writer, "version": tldist.__version__},
                         max_count=max_count, max_size=max_size, min_shards=min_shards)
    stage = out_dir / STAGE_DIR
    stage.mkdir(parents=True, exist_ok=True)
    full_meta = {"tldist_version": tldist.__version__, "source": dict(getattr(samples, "info", None) or {"type": "custom"}),
                 "writer": writer, **(meta or {})}
    plan = {"split": split, "classes": list(classes), "meta": full_meta, "shards": [asdict(s) for s in shards]}
    if _read_json(stage / PLAN_NAME) != plan:
        _write_json(stage / PLAN_NAME, plan)
    mine = [k for k in range(len(shards)) if k % world == rank]
    ctx = get_context("fork")
    _COUNTER = ctx.Value("q", 0)
    _JOB.update(shards=shards, stage=stage, source=source, options=opts, num_classes=len(classes))
    bar = None
    try:
        total = sum(shards[k].end - shards[k].start for k in mine)
        desc = split if world == 1 else f"{split} part {rank}/{world}"
        if workers == 1 or len(mine) <= 1:
            bar = _Progress(total, desc, progress)
            records = [_write_shard(k) for k in mine]
        else:
            pool = ProcessPoolExecutor(min(workers, len(mine)), mp_context=ctx, initializer=_init_worker)
            try:
                futures = [pool.submit(_write_shard, k) for k in mine]
                bar = _Progress(total, desc, progress)
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
        log.info("resumed '%s': kept %d of %d finished shards, wrote %d", out_dir, kept, len(mine), len(mine) - kept)
    if world > 1:
        return None
    return merge(out_dir)


def merge(out_dir: str | Path) -> Manifest:
    """Turn the staged parts of a planned write into the shard set: every planned shard must have
    a record; moves the tars into ``out_dir``, removes stale shards, writes the manifest last."""
    out_dir = Path(out_dir)
    stage = out_dir / STAGE_DIR
    plan = _read_json(stage / PLAN_NAME)
    if plan is None:
        raise DataError(f"no write plan at '{stage / PLAN_NAME}': nothing to merge; run 'tldist shards' first")
    shards = [PlannedShard(**s) for s in plan["shards"]]
    records = [_finished(stage, s, full_check=False) for s in shards]
    missing = [s.name for s, r in zip(shards, records) if r is None]
    if missing:
        raise DataError(f"'{out_dir}': {len(missing)} of {len(shards)} shards are not written yet (e.g. {missing[:3]}); "
                        "run the remaining parts (or rerun the write: it resumes) before merging")
    split = plan["split"]
    written = [(s, r) for s, r in zip(shards, records) if r["count"] > 0]
    skipped = [line for r in records for line in r["skipped"]]
    if not written:
        raise DataError(f"no usable samples for '{out_dir}' ({len(skipped)} skipped"
                        + (f", e.g. {skipped[0]}" if skipped else "") + "); check the source")
    for line in skipped[:20]:
        log.warning("skipped %s", line)
    if len(skipped) > 20:
        log.warning("skipped %d unreadable images in total for '%s' (all listed in %s)", len(skipped), out_dir,
                    out_dir / SKIPPED_NAME)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # no manifest describes the dir until the new one exists
    for s, _ in written:
        os.replace(stage / s.name, out_dir / s.name)
    names = {s.name for s, _ in written}
    for stale in out_dir.glob(f"{split}-*.tar"):
        if stale.name not in names and stale.name[len(split) + 1:-4].isdigit():
            stale.unlink()
    if skipped:
        (out_dir / SKIPPED_NAME).write_text("".join(f"{line}\n" for line in skipped))
    else:
        (out_dir / SKIPPED_NAME).unlink(missing_ok=True)
    meta = dict(plan["meta"])
    meta.update(skipped=len(skipped), skipped_examples=skipped[:10], skipped_reasons=dict(sorted(Counter(
        _reason(line) for line in skipped).items())))
    manifest = Manifest(split=split, classes=plan["classes"], shards=[ShardInfo(s.name, r["count"]) for s, r in written],
                        meta=meta, base=str(out_dir))
    manifest.save(out_dir / MANIFEST_NAME)
    shutil.rmtree(stage, ignore_errors=True)
    return manifest


def _reason(line: str) -> str:
    """The kind of a skip message ('truncated JPEG', 'cannot decode with pil'...), for the summary."""
    parts = line.split(": ")
    return (parts[1] if len(parts) > 1 else parts[0]).split(" (")[0][:60]
