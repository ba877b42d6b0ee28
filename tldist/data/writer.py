"""Write samples into WebDataset tar shards plus the ``manifest.json`` that describes them.

Layout: ``<out_dir>/<split>-000000.tar``... each sample stored as ``<key>.<ext>`` (the image
bytes as given) and ``<key>.cls`` (the class index in ASCII). Shards are written under
temporary names and renamed only when every shard is complete; the manifest is written
last and atomically, so a crashed write never leaves a manifest describing partial shards.
Sources (image folders, CSV lists, torchvision datasets) live in :mod:`tldist.data.sources`;
the planned, parallel writer that image folders and CSV lists go through is :mod:`tldist.data.ingest`,
which uses the checks defined here.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import webdataset as wds

import tldist
from tldist.data.manifest import MANIFEST_NAME, SEEK_EVERY, STORED_EXTS, Manifest, ShardInfo, load_manifest
from tldist.data.sources import SOURCE_IMAGE_EXTS, Sample, encode_image, normalize_ext
from tldist.data.transforms import DECODERS, decode_error, decode_image, open_image
from tldist.errors import ConfigError, DataError
from tldist.paths import check_output_dir, make_output_dir

log = logging.getLogger("tldist.data")

_KEY_OK = re.compile(r"^[A-Za-z0-9_-]{1,90}$")
_SPLIT_OK = re.compile(r"^[A-Za-z0-9_-]+$")
CHECKS = ("header", "decode", "verify", "none")
DEFAULT_CHECK = "header"
"""Reads format, size and mode and checks the file is complete (JPEG end marker, PNG ``IEND``, WebP
RIFF length); other formats are decoded with PIL. It catches what ``decode`` catches on truncated and
garbage files at a fraction of the cost, but not corrupt data inside a complete file (BENCHMARKS.md)."""
_HEADER_FORMATS = {"JPEG", "MPO", "PNG", "WEBP"}


class SkipSample(Exception):
    """A sample whose image cannot be used; the writer skips and counts it. Object addresses
    (``<_io.BytesIO object at 0x7f...>``) are cut from the message, so it is the same in every run."""

    def __init__(self, message: str):
        super().__init__(re.sub(r" object at 0x[0-9a-fA-F]+", " object", message))


def header_problem(data: bytes) -> str:
    """Why ``data`` fails the cheap ``--check header`` test, or ``''`` when it passes.

    PIL reads the header only (format, size, mode; no pixels); JPEG must end with the EOI
    marker (trailing NUL padding allowed), PNG with an ``IEND`` chunk, WebP must be as long as
    its RIFF header says. Formats without such an end mark (BMP, TIFF, PPM) are fully decoded.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (w, h) = im.format, im.size  # an unknown mode or bad header raises in open()
            if fmt not in _HEADER_FORMATS:
                im.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return f"cannot read header: {decode_error(e)}"
    if w < 1 or h < 1:
        return f"image is {w}x{h} px"
    if fmt in ("JPEG", "MPO") and not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return "truncated JPEG (no end-of-image marker)"
    if fmt == "PNG" and b"IEND" not in data[-32:]:
        return "truncated PNG (no IEND chunk)"
    if fmt == "WEBP" and int.from_bytes(data[4:8], "little") + 8 > len(data):
        return "truncated WebP (shorter than its RIFF length)"
    return ""


def prepare_image(s: Sample, reencode: Optional[str], quality: int, max_side: int, check: str,
             decoders: Sequence[str]) -> tuple[bytes, str]:
    """Check (and optionally re-encode/resize) one sample's image; return ``(bytes, ext)``.

    ``check='header'`` runs :func:`header_problem`; ``check='decode'`` runs :func:`~tldist.data.transforms.decode_image` with each of
    ``decoders``, exactly as the training loader will. A re-encode stores the pixels that
    decoding gives (EXIF orientation applied, 8-bit), without the orientation tag. A format other than
    :data:`~tldist.data.manifest.STORED_EXTS` (BMP, TIFF, PPM/PGM, GIF...) is always re-encoded, to
    lossless PNG unless ``reencode`` names another format, so every sample has a standard member name.
    """
    from PIL import Image

    if s.error:
        raise SkipSample(s.error)
    if not s.data:
        raise SkipSample("empty image data")
    if check == "header":
        problem = header_problem(s.data)
        if problem:
            raise SkipSample(problem)
    if check == "decode":
        for decoder in decoders:
            try:
                decode_image(s.data, decoder)
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError...; torchvision RuntimeError
                raise SkipSample(f"cannot decode with {decoder}: {decode_error(e)}") from None
    odd = s.ext not in STORED_EXTS
    if not reencode and not max_side and check != "verify" and not odd:
        return s.data, s.ext
    try:
        if not reencode and not odd:
            with Image.open(io.BytesIO(s.data)) as im:
                if check == "verify":
                    im.verify()  # structure only; size comes from the header read by open
                if not max_side or max(im.size) <= max_side:
                    return s.data, s.ext
        img = open_image(s.data)
    except (ConfigError, DataError):
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise SkipSample(f"cannot decode: {decode_error(e)}") from None
    # resizing and encoding a decoded image cannot fail on bad bytes: an error here is not skipped
    if max_side > 0 and max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    fmt = reencode or (s.ext if s.ext in ("jpg", "png", "webp") else "png")
    return encode_image(img, fmt, quality), normalize_ext(fmt)


def check_key(key: Any, origin: str, seen: Optional[set[str]]) -> None:
    """Raise :class:`DataError` unless ``key`` is tar-safe and not in ``seen``; add it to ``seen`` (None: the form
    only)."""
    if not isinstance(key, str) or not _KEY_OK.match(key):
        raise DataError(f"sample key {key!r} ({origin}) must be 1-90 letters, digits, '_' or '-'")
    if seen is None:
        return
    if key in seen:
        raise DataError(f"duplicate sample key '{key}' ({origin}); keys must be unique in a shard set")
    seen.add(key)


def check_sample(s: Sample, num_classes: int) -> str:
    """Raise :class:`DataError` for a label outside ``0..num_classes-1`` or an unknown extension;
    return the normalized extension."""
    if isinstance(s.label, bool) or not isinstance(s.label, int) or not 0 <= s.label < num_classes:
        raise DataError(f"sample '{s.key}' ({s.origin}) has label {s.label!r}, not in 0..{num_classes - 1}")
    ext = normalize_ext(s.ext)
    if ext not in SOURCE_IMAGE_EXTS:
        raise DataError(f"sample '{s.key}' ({s.origin}) has extension '{s.ext}'; use one of "
                        f"{sorted(SOURCE_IMAGE_EXTS)}")
    return ext


def check_options(split: str, classes: list[str], max_count: Optional[int], max_size: Optional[float],
                   min_shards: int, reencode: Optional[str], quality: int, max_side: int, check: str,
                   decoders: Sequence[str]) -> None:
    if not split or not _SPLIT_OK.match(split):
        raise ConfigError(f"split name '{split}' must be non-empty letters, digits, '_' or '-' (it names the shard files)")
    if not classes:
        raise DataError("no classes given; a shard set needs at least one class name")
    if max_count is not None and max_count < 1:
        raise ConfigError(f"max_count must be >= 1 samples per shard, got {max_count}")
    if max_size is not None and max_size < 1:
        raise ConfigError(f"max_size must be >= 1 byte per shard, got {max_size}")
    if min_shards < 1:
        raise ConfigError(f"min_shards must be >= 1, got {min_shards}")
    if reencode is not None and normalize_ext(reencode) not in ("jpg", "png", "webp"):
        raise ConfigError(f"reencode must be 'jpg', 'png' or 'webp', got '{reencode}'")
    if not 1 <= quality <= 100:
        raise ConfigError(f"quality must be in 1..100, got {quality}")
    if max_side < 0:
        raise ConfigError(f"max_side must be >= 0 (0 keeps the size), got {max_side}")
    if check not in CHECKS:
        raise ConfigError(f"check must be one of {CHECKS}, got '{check}'")
    bad = [d for d in decoders if d not in DECODERS] if not isinstance(decoders, str) else [decoders]
    if bad or not decoders:
        raise ConfigError(f"decoders {bad or list(decoders)!r}: give a non-empty list of {', '.join(DECODERS)}")


def prepare_out(out_dir: Path, split: str) -> None:
    """Refuse an output path that is (or lies under) a file, or a directory holding another split's shard set."""
    check_output_dir(out_dir, "output")
    if (out_dir / MANIFEST_NAME).is_file():
        try:
            old_split = load_manifest(out_dir).split
        except DataError:
            old_split = split
        if old_split != split:
            raise DataError(f"'{out_dir}' already holds the '{old_split}' shard set; write '{split}' to its own directory")


def skip_reason(line: str) -> str:
    """The kind of a skip message ``'<origin>: <why> (<detail>)'`` ('truncated JPEG', 'cannot decode with
    pil'...): the ``skipped_reasons`` counts of a manifest's ``meta``, printed by ``tldist shards``."""
    parts = line.split(": ")
    return (parts[1] if len(parts) > 1 else parts[0]).split(" (")[0][:60]


def write_shards(samples: Iterable[Sample], out_dir: str | Path, split: str, classes: list[str], *,
                 max_count: Optional[int] = 10000, max_size: Optional[float] = 500e6, min_shards: int = 1,
                 reencode: Optional[str] = None, quality: int = 90, max_side: int = 0, check: str = DEFAULT_CHECK,
                 decoders: Sequence[str] = DECODERS, meta: Optional[dict[str, Any]] = None) -> Manifest:
    """Write ``samples`` as ``<out_dir>/<split>-%06d.tar`` shards and ``<out_dir>/manifest.json``.

    A shard is closed once it holds ``max_count`` samples or at least ``max_size`` payload
    bytes (it may exceed that by one sample); when ``samples`` has a length, ``max_count``
    is lowered so there are at least ``min_shards`` shards. Images are stored as given unless
    ``reencode`` ('jpg'/'png') or ``max_side`` (longest side, px) asks for a re-encode, which
    stores the decoded pixels (EXIF orientation applied, 8-bit) and no orientation tag, so
    kept and re-encoded images decode alike. ``check`` says how each image is tested:
    'header' (default) is :func:`header_problem`, 'decode' runs the training loader's :func:`~tldist.data.transforms.decode_image` with
    each of ``decoders`` (data.decode values; default both), 'verify' only PIL's structural
    check, 'none' nothing; unreadable ones are skipped with a warning and counted in
    ``meta['skipped']``; no usable sample at all raises :class:`DataError`. One directory holds one split; stale shards of an
    earlier write of that split are removed.
    """
    out_dir = Path(out_dir)
    reencode = normalize_ext(reencode) if reencode else None
    check_options(split, classes, max_count, max_size, min_shards, reencode, quality, max_side, check, decoders)
    decoders = list(decoders)
    prepare_out(out_dir, split)
    make_output_dir(out_dir, "output")
    count_cap = max_count or 2**62
    if min_shards > 1 and hasattr(samples, "__len__") and len(samples) > 0:
        count_cap = min(count_cap, max(1, math.ceil(len(samples) / min_shards)))
    pattern = str(out_dir).replace("%", "%%") + f"/{split}-%06d.tar"
    handles: dict[str, Any] = {}
    counts: dict[str, int] = {}
    offsets: dict[str, list[list[int]]] = {}  # the sparse seek index (ShardInfo.offsets) of each shard
    ends: dict[str, int] = {}  # byte offset where the last sample written to a shard ended

    def opener(fname: str):
        handles[fname] = open(fname + ".partial", "wb")
        counts[fname] = 0
        return handles[fname]

    seen: set[str] = set()
    skipped: list[str] = []
    class_counts = [0] * len(classes)
    reencoded: Counter = Counter()
    try:
        with wds.ShardWriter(pattern, maxcount=count_cap, maxsize=max_size or float("inf"), verbose=0,
                             opener=opener, post=lambda fname: handles[fname].close(), encoder=False, mtime=0) as sink:
            for s in samples:
                check_key(s.key, s.origin, seen)
                ext = check_sample(s, len(classes))
                try:
                    data, ext = prepare_image(Sample(s.key, s.data, ext, s.label, s.origin, s.error),
                                         reencode, quality, max_side, check, decoders)
                except SkipSample as e:
                    skipped.append(f"{s.origin or s.key}: {e}")
                    if len(skipped) <= 20:
                        log.warning("skipping %s: %s", s.origin or s.key, e)
                    continue
                if ext != normalize_ext(s.ext):
                    reencoded[f"{normalize_ext(s.ext)} -> {ext}"] += 1
                sink.write({"__key__": s.key, ext: data, "cls": str(s.label).encode()})
                index = counts[sink.fname]  # the shard the sample went to (write() opens the next one first)
                if index % SEEK_EVERY == 0:
                    offsets.setdefault(sink.fname, []).append([index, ends.get(sink.fname, 0)])
                ends[sink.fname] = sink.tarstream.tarstream.offset  # tarfile's position: the next member starts here
                counts[sink.fname] += 1
                class_counts[s.label] += 1
        written = [f for f in sorted(counts) if counts[f] > 0]
        if not written:
            raise DataError(f"no usable samples for '{out_dir}' ({len(skipped)} skipped"
                            + (f", e.g. {skipped[0]}" if skipped else "") + "); check the source")
    except BaseException:
        for f, h in handles.items():
            h.close()
            Path(f + ".partial").unlink(missing_ok=True)
        raise
    if len(skipped) > 20:
        log.warning("skipped %d unreadable images in total for '%s'", len(skipped), out_dir)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # from here until the new manifest exists, no manifest describes the dir
    for f in counts:
        if counts[f] > 0:
            os.replace(f + ".partial", f)
        else:
            Path(f + ".partial").unlink(missing_ok=True)
    names = {Path(f).name for f in written}
    for stale in out_dir.glob(f"{split}-*.tar"):
        if re.fullmatch(rf"{re.escape(split)}-\d{{6}}\.tar", stale.name) and stale.name not in names:
            stale.unlink()
    full_meta: dict[str, Any] = {
        "tldist_version": tldist.__version__,
        "source": dict(getattr(samples, "info", None) or {"type": "custom"}),
        "writer": {"max_count": max_count, "max_size": max_size, "min_shards": min_shards, "reencode": reencode,
                   "quality": quality, "max_side": max_side, "check": check,
                   "decoders": decoders if check == "decode" else []},
        "skipped": len(skipped),
        "skipped_examples": skipped[:10],
        "skipped_reasons": dict(sorted(Counter(skip_reason(line) for line in skipped).items())),
        "class_counts": class_counts,
        "reencoded": dict(sorted(reencoded.items())),
    }
    full_meta.update(meta or {})
    manifest = Manifest(split=split, classes=list(classes),
                        shards=[ShardInfo(Path(f).name, counts[f], offsets=offsets.get(f, [])) for f in written],
                        meta=full_meta, base=str(out_dir))
    manifest.save(out_dir / MANIFEST_NAME)
    return manifest
