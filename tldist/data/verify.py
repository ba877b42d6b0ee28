"""Check a shard set against its manifest: per-shard counts, image decoding, labels, keys.

Shards are streamed with :func:`webdataset.gopen` (local paths, ``http(s)://`` and ``pipe:``
URLs alike) and read member by member with :mod:`tarfile`, grouping members into samples by
the WebDataset rule (key = path up to the first dot of the file name).
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import webdataset as wds

from tldist.data.manifest import IMAGE_EXTS, load_manifest, resolve_shard_urls
from tldist.data.transforms import DECODERS, decode_image
from tldist.errors import ConfigError, DataError

_IMAGE_EXTS = set(IMAGE_EXTS)


@dataclass
class Problem:
    """One finding: the shard (file name), the sample key ('' for shard-level) and what is wrong."""

    shard: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.shard}: {self.key}: {self.message}" if self.key else f"{self.shard}: {self.message}"


@dataclass
class VerifyReport:
    """Result of :func:`verify_shards`."""

    location: str
    num_classes: int = 0
    expected: dict[str, int] = field(default_factory=dict)
    """Samples per shard according to the manifest."""
    found: dict[str, int] = field(default_factory=dict)
    """Samples per shard actually read (complete or not)."""
    problems: list[Problem] = field(default_factory=list)
    label_counts: dict[int, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def num_samples(self) -> int:
        return sum(self.found.values())

    def summary(self) -> str:
        """One line: location, shards, samples found/expected, problems."""
        state = "ok" if self.ok else f"{len(self.problems)} problem(s)"
        return (f"{self.location}: {len(self.expected)} shards, {self.num_samples}/{sum(self.expected.values())} "
                f"samples, {self.num_classes} classes: {state}")


def _samples(stream) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group tar members into ``(key, {ext: bytes})`` in WebDataset fashion."""
    key: Optional[str] = None
    parts: dict[str, bytes] = {}
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for m in tar:
            if not m.isfile():
                continue
            dirname, _, base = m.name.rpartition("/")
            if "." not in base or base.startswith("."):
                continue
            stem, ext = base.split(".", 1)
            k = f"{dirname}/{stem}" if dirname else stem
            f = tar.extractfile(m)
            data = f.read() if f is not None else b""
            if k != key:
                if key is not None:
                    yield key, parts
                key, parts = k, {}
            parts[ext.lower()] = data
    if key is not None:
        yield key, parts


def _check_sample(parts: dict[str, bytes], num_classes: int,
                  decoders: Sequence[str]) -> tuple[Optional[int], list[str]]:
    errors: list[str] = []
    label = None
    images = [e for e in parts if e in _IMAGE_EXTS]
    if len(images) != 1:
        errors.append(f"expected one image member, found {images or 'none'} among {sorted(parts)}")
    for ext in images:
        failed = []
        for decoder in decoders:  # the training loader's own decoding, per data.decode value
            try:
                decode_image(parts[ext], decoder)
            except Exception as e:  # PIL's and torchvision's errors vary by format
                failed.append(f"data.decode={decoder}: {type(e).__name__}: {str(e).strip()[:200]}")
        if failed:
            errors.append(f".{ext} does not decode ({'; '.join(failed)})")
    raw = parts.get("cls")
    if raw is None:
        errors.append("no .cls member")
    else:
        try:
            label = int(raw.decode().strip())
        except (UnicodeDecodeError, ValueError):
            errors.append(f".cls is {raw[:20]!r}, not an integer")
        else:
            if not 0 <= label < num_classes:
                errors.append(f".cls is {label}, outside 0..{num_classes - 1}")
                label = None
    return label, errors


def verify_shards(location: str | Path, *, urls: Optional[str] = None, decode: bool = True,
                  decoders: Sequence[str] = DECODERS, max_problems: int = 1000) -> VerifyReport:
    """Read every shard of the set at ``location`` (a manifest location) and check it.

    Checks per-shard sample counts against the manifest, that each sample has exactly one
    image member and a ``.cls`` in range, and that keys are unique. Each image is decoded
    with :func:`~tldist.data.transforms.decode_image` for every one of ``decoders`` (the
    ``data.decode`` values; default both), exactly as training does; ``decode=False`` skips
    that. ``urls`` is an optional brace pattern replacing the manifest's shard locations.
    Raises :class:`DataError` only when the manifest itself is unusable, :class:`ConfigError`
    for an unknown decoder.
    """
    if isinstance(decoders, str) or not decoders or any(d not in DECODERS for d in decoders):
        raise ConfigError(f"decoders {decoders!r}: give a non-empty list of {', '.join(DECODERS)}")
    manifest = load_manifest(location)
    report = VerifyReport(location=str(location), num_classes=manifest.num_classes)

    def add(shard: str, key: str, msg: str) -> None:
        if len(report.problems) < max_problems:
            report.problems.append(Problem(shard, key, msg))
        elif len(report.problems) == max_problems:
            report.problems.append(Problem(shard, "", "too many problems; stopped listing"))

    try:
        shard_urls = resolve_shard_urls(manifest, urls)
    except DataError:  # report every missing shard instead of failing on the first
        shard_urls = manifest.shard_urls()
    seen: dict[str, str] = {}
    for info, url in zip(manifest.shards, shard_urls):
        name = info.name
        report.expected[name] = info.num_samples
        report.found[name] = 0
        if "://" not in url and not url.startswith("pipe:") and not Path(url).is_file():
            add(name, "", f"shard file '{url}' is missing")
            continue
        try:
            with wds.gopen(url, "rb") as stream:
                for key, parts in _samples(stream):
                    report.found[name] += 1
                    if key in seen:
                        add(name, key, f"duplicate key (also in {seen[key]})")
                    seen[key] = name
                    if decode:
                        label, errors = _check_sample(parts, manifest.num_classes, decoders)
                    else:
                        label, errors = None, []
                        raw = parts.get("cls", b"")
                        label = int(raw) if raw.strip().isdigit() else None
                    for msg in errors:
                        add(name, key, msg)
                    if label is not None:
                        report.label_counts[label] = report.label_counts.get(label, 0) + 1
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            add(name, "", f"unreadable after {report.found[name]} samples ({type(e).__name__}: {e})")
        if report.found[name] != info.num_samples:
            add(name, "", f"manifest says {info.num_samples} samples, shard holds {report.found[name]}")
    return report
