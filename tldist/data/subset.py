"""Seeded, stratified ``k`` labels-per-class subsets of a shard set, written as real shard sets.

Used by ``tldist study`` (label-budget studies) and ``tldist shards subset``. Two passes over the
source shards: the first reads only the ``.cls`` members (image bytes are seeked over) to list every
sample's class; the second copies the chosen samples' bytes unchanged through the shard writer
(:func:`tldist.data.writer.write_shards`), so the subset is an ordinary shard set with a manifest.

Selection: for class ``c`` the sample keys are sorted and permuted with
``numpy.random.default_rng([seed, c])``; the first ``k`` are kept. The same seed therefore gives the
same keys, and for one seed the subset of a smaller ``k`` is contained in that of a larger ``k``
(the permutation's prefix), which keeps label-budget curves comparable across ``k``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np

from tldist.data.manifest import IMAGE_EXTS, MANIFEST_NAME, Manifest, load_manifest, resolve_shard_urls
from tldist.errors import DataError, UserError

if TYPE_CHECKING:
    from tldist.data.sources import Sample

log = logging.getLogger("tldist.data")


def label_index(src_location: str | Path) -> tuple[Manifest, dict[int, list[str]]]:
    """The source manifest and ``{class index: sorted sample keys}``, read from the ``.cls`` members only.

    Raises :class:`DataError` naming the shard when a sample has no readable label or a label outside
    the manifest's classes.
    """
    from webdataset.gopen import gopen
    from webdataset.tariterators import base_plus_ext

    from tldist.data.tar import iter_members

    manifest = load_manifest(src_location)
    by_class: dict[int, list[str]] = {}
    for url in resolve_shard_urls(manifest):
        stream = gopen(url, "rb")
        try:
            for name, data in iter_members(stream, lambda n: n.endswith(".cls")):
                key = base_plus_ext(name)[0]
                try:
                    label = int(data.decode().strip())
                except (UnicodeDecodeError, ValueError):
                    raise DataError(f"sample '{key}' of shard {url} has label {data[:20]!r}, not an integer; "
                                    "check the set with 'tldist shards verify'") from None
                if not 0 <= label < manifest.num_classes:
                    raise DataError(f"sample '{key}' of shard {url} has label {label}, not in "
                                    f"0..{manifest.num_classes - 1} of its manifest")
                by_class.setdefault(label, []).append(key)
        finally:
            stream.close()
    return manifest, {c: sorted(keys) for c, keys in sorted(by_class.items())}


def choose_keys(by_class: dict[int, list[str]], classes: list[str], labels_per_class: int, seed: int) -> set[str]:
    """The ``labels_per_class`` keys of every class chosen for ``seed`` (see the module docstring).

    Raises :class:`UserError` naming the first class that has fewer samples than asked (a class of the
    manifest without samples counts as 0), with the largest ``k`` every class allows.
    """
    if isinstance(labels_per_class, bool) or not isinstance(labels_per_class, int) or labels_per_class < 1:
        raise UserError(f"labels per class {labels_per_class!r} is invalid: use an integer >= 1")
    counts = {c: len(by_class.get(c, [])) for c in range(len(classes))}
    short = [c for c, n in counts.items() if n < labels_per_class]
    if short:
        c = short[0]
        raise UserError(f"labels per class {labels_per_class} is more than class '{classes[c]}' has "
                        f"({counts[c]} samples{f'; {len(short)} classes are short' if len(short) > 1 else ''}); "
                        f"use k <= {min(counts.values())} or 'all'")
    chosen: set[str] = set()
    for c in range(len(classes)):
        keys = by_class[c]
        order = np.random.default_rng([int(seed), c]).permutation(len(keys))
        chosen.update(keys[i] for i in order[:labels_per_class])
    return chosen


def subset_matches(out_dir: str | Path, src_location: str | Path, labels_per_class: int, seed: int) -> Optional[Manifest]:
    """The manifest of ``out_dir`` when it already holds this exact subset (same source, ``k`` and seed)."""
    if not (Path(out_dir) / MANIFEST_NAME).is_file():
        return None
    try:
        m = load_manifest(out_dir)
    except DataError:
        return None
    want = {"source": _source_id(src_location), "labels_per_class": labels_per_class, "seed": seed}
    got = m.meta.get("subset", {})
    return m if {k: got.get(k) for k in want} == want else None


def _source_id(location: str | Path) -> str:
    text = str(location)
    return text if "://" in text else str(Path(text).expanduser().resolve())


def samples_by_key(manifest: Manifest, labels: dict[str, int], *, missing: str) -> Iterator["Sample"]:
    """Stream ``manifest``'s shards once and yield the samples whose keys are in ``labels``, with those
    labels, image bytes as stored (for :func:`~tldist.data.writer.write_shards`). Stops once all are
    found; raises :class:`DataError` "<N> <missing>" when some never come (the shards changed, or
    unreadable records), and when a chosen sample has no image member."""
    from tldist.data.sources import Sample
    from tldist.data.stream import read_shard

    found = 0
    for url, info in zip(resolve_shard_urls(manifest), manifest.shards):
        for rec in read_shard(url, 0, info.num_samples):
            if not rec.ok or rec.key not in labels:
                continue
            ext = next((e for e in IMAGE_EXTS if e in rec.fields), None)
            if ext is None:
                raise DataError(f"sample '{rec.key}' of shard {url} has no image member")
            yield Sample(rec.key, rec.fields[ext], ext, labels[rec.key], f"{url}:{rec.key}")
            found += 1
            if found == len(labels):
                return
    raise DataError(f"{len(labels) - found} {missing}")


def write_label_subset(src_location: str | Path, out_dir: str | Path, labels_per_class: int, seed: int, *,
                       max_count: int = 10000) -> Manifest:
    """Write exactly ``labels_per_class`` samples of every class of ``src_location`` to ``out_dir``.

    ``src_location``: a shard set (directory, ``manifest.json`` or URL). The chosen samples keep their
    keys and image bytes; the manifest keeps the source's class list and records
    ``meta.subset = {source, labels_per_class, seed, num_samples}``. A directory that already holds this
    subset is reused as it is (returned without reading the source again). Raises :class:`UserError`
    naming the class and its count when a class has fewer than ``labels_per_class`` samples (refused,
    never capped, so every class of a study cell has the same budget), :class:`DataError` for
    unreadable sources.
    """
    from tldist.data.sources import Sample, SampleSource
    from tldist.data.writer import write_shards

    existing = subset_matches(out_dir, src_location, labels_per_class, seed)
    if existing is not None:
        return existing
    manifest, by_class = label_index(src_location)
    chosen = choose_keys(by_class, manifest.classes, labels_per_class, seed)
    labels = {key: c for c, keys in by_class.items() for key in keys if key in chosen}

    def generate() -> Iterator[Sample]:
        yield from samples_by_key(manifest, labels, missing=f"chosen samples could not be read again from "
                                  f"'{src_location}'; check it with 'tldist shards verify'")

    info = {"type": "label-subset", "source": _source_id(src_location)}
    meta = {"subset": {"source": _source_id(src_location), "labels_per_class": labels_per_class, "seed": seed,
                       "num_samples": len(labels)}}
    written = write_shards(SampleSource(len(labels), generate, info), out_dir, manifest.split or "train",
                           list(manifest.classes), max_count=max_count, max_size=None, check="none", meta=meta)
    log.info("label subset: %d per class x %d classes (seed %d) of %s -> %s", labels_per_class,
             len(manifest.classes), seed, src_location, out_dir)
    return written
