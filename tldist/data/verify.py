"""Check a shard set against its manifest: per-shard counts, image decoding, labels, keys.

Shards are streamed with :func:`tldist.data.retry.open_shard` (local paths, ``http(s)://``, ``pipe:`` and
``s3://`` URLs alike) and read member by member with :mod:`tarfile`, grouping members into samples by
the WebDataset rule (key = path up to the first dot of the file name).
"""

from __future__ import annotations

import hashlib
import tarfile
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from tldist.data.labels import DEFAULT_RULE, LabelError, LabelRule
from tldist.data.manifest import IMAGE_EXTS, load_manifest, resolve_shard_urls
from tldist.data.retry import open_shard
from tldist.data.transforms import DECODERS, decode_error, decode_image
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


def _check_label(parts: dict[str, bytes], num_classes: int, rule: LabelRule) -> tuple[Optional[int], list[str]]:
    """``(class index or None, problems)`` of a sample's label read by the manifest's rule."""
    if not rule.labelled:
        return None, []
    try:
        label = rule.label(parts)
    except LabelError as e:
        return None, [str(e)]
    if not 0 <= label < num_classes:
        where = ".cls" if rule.member == "cls" else f"label ({rule.spec})"
        return None, [f"{where} is {label}, outside 0..{num_classes - 1}"]
    return label, []


def _check_sample(parts: dict[str, bytes], num_classes: int, decoders: Sequence[str],
                  rule: LabelRule = DEFAULT_RULE) -> tuple[Optional[int], list[str]]:
    errors: list[str] = []
    if rule.image == DEFAULT_RULE.image:  # tldist's own layout: exactly one image member
        images = [e for e in parts if e in _IMAGE_EXTS]
        if len(images) != 1:
            errors.append(f"expected one image member, found {images or 'none'} among {sorted(parts)}")
    else:  # an indexed set: the first member its manifest names (others, e.g. masks, are not the image)
        images = [e for e in rule.image if e in parts][:1]
        if not images:
            errors.append(f"no image member (looked for {', '.join(rule.image)}; found {sorted(parts)})")
    for ext in images:
        failed = []
        for decoder in decoders:  # the training loader's own decoding, per data.decode value
            try:
                decode_image(parts[ext], decoder)
            except Exception as e:  # PIL's and torchvision's errors vary by format
                failed.append(f"data.decode={decoder}: {decode_error(e)[:200]}")
        if failed:
            errors.append(f".{ext} does not decode ({'; '.join(failed)})")
    label, problems = _check_label(parts, num_classes, rule)
    return label, errors + problems


def verify_shards(location: str | Path, *, urls: Optional[str] = None, decode: bool = True,
                  decoders: Sequence[str] = DECODERS, max_problems: int = 1000) -> VerifyReport:
    """Read every shard of the set at ``location`` (a manifest location) and check it.

    Checks per-shard sample counts against the manifest, that each sample has exactly one
    image member and a ``.cls`` in range (for a set made by ``tldist shards index``: the image and label
    its manifest's ``meta.labels`` names, :mod:`tldist.data.labels`), and that keys are unique. Each image is decoded
    with :func:`~tldist.data.transforms.decode_image` for every one of ``decoders`` (the
    ``data.decode`` values; default both), exactly as training does; ``decode=False`` skips
    that. ``urls`` is an optional brace pattern replacing the manifest's shard locations.
    Raises :class:`DataError` only when the manifest itself is unusable, :class:`ConfigError`
    for an unknown decoder.
    """
    if isinstance(decoders, str) or not decoders or any(d not in DECODERS for d in decoders):
        raise ConfigError(f"decoders {decoders!r}: give a non-empty list of {', '.join(DECODERS)}")
    manifest = load_manifest(location)
    rule = manifest.label_rule
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
    keys = KeyLog()
    for index, (info, url) in enumerate(zip(manifest.shards, shard_urls)):
        name = info.name
        report.expected[name] = info.num_samples
        report.found[name] = 0
        if "://" not in url and not url.startswith("pipe:") and not Path(url).is_file():
            add(name, "", f"shard file '{url}' is missing")
            continue
        try:
            with closing(open_shard(url)) as stream:
                for key, parts in _samples(stream):
                    report.found[name] += 1
                    keys.add(key, index)
                    if decode:
                        label, errors = _check_sample(parts, manifest.num_classes, decoders, rule)
                    else:
                        label, errors = _check_label(parts, manifest.num_classes, rule)
                    for msg in errors:
                        add(name, key, msg)
                    if label is not None:
                        report.label_counts[label] = report.label_counts.get(label, 0) + 1
        except (tarfile.TarError, OSError, EOFError, ValueError, DataError) as e:
            add(name, "", f"unreadable after {report.found[name]} samples ({type(e).__name__}: {e})")
        if report.found[name] != info.num_samples:
            add(name, "", f"manifest says {info.num_samples} samples, shard holds {report.found[name]}")
    for key, shards in keys.duplicates(lambda i: _samples_keys(shard_urls[i])):
        names = [manifest.shards[i].name for i in shards]
        add(names[-1], key, f"duplicate key (also in {', '.join(dict.fromkeys(names[:-1]))})")
    return report


class KeyLog:
    """Sample keys seen, in 12 bytes per sample (a 64-bit hash and the shard's index, in growing numpy
    blocks) instead of a dict of strings (100+ bytes per sample): enough to find duplicate keys over a whole
    set. Only shards holding a repeated hash are read again, to name the keys."""

    def __init__(self) -> None:
        self._hashes: list[np.ndarray] = []
        self._shards: list[np.ndarray] = []
        self._h: list[int] = []
        self._s: list[int] = []

    def add(self, key: str, shard: int) -> None:
        self._h.append(int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little", signed=True))
        self._s.append(shard)
        if len(self._h) >= 65536:
            self._flush()

    def _flush(self) -> None:
        if self._h:
            self._hashes.append(np.asarray(self._h, dtype=np.int64))
            self._shards.append(np.asarray(self._s, dtype=np.int32))
            self._h, self._s = [], []

    def duplicates(self, keys_of) -> list[tuple[str, list[int]]]:
        """``(key, [shard index of each occurrence])`` for every key seen more than once; ``keys_of(shard)``
        lists a shard's keys again (called only for shards holding a repeated hash)."""
        self._flush()
        if not self._hashes:
            return []
        h = np.concatenate(self._hashes)
        h.sort()  # in place: 8 bytes per key at the peak, besides the blocks
        repeated = h[1:][h[1:] == h[:-1]]
        del h
        if not len(repeated):
            return []
        suspects = set(np.unique(repeated).tolist())
        wanted = np.fromiter(suspects, dtype=np.int64)
        shards: set[int] = set()
        for hb, sb in zip(self._hashes, self._shards):
            shards.update(sb[np.isin(hb, wanted)].tolist())
        where: dict[str, list[int]] = {}
        for shard in sorted(shards):
            for key in keys_of(shard):
                digest = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little", signed=True)
                if digest in suspects:
                    where.setdefault(key, []).append(shard)
        return [(k, v) for k, v in where.items() if len(v) > 1]


def _samples_keys(url: str) -> list[str]:
    try:
        with closing(open_shard(url)) as stream:
            return [key for key, _ in _samples(stream)]
    except (tarfile.TarError, OSError, EOFError, ValueError, DataError):
        return []
