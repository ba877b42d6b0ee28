"""Seeded, stratified ``k`` labels-per-class subsets of a shard set, written as real shard sets.

Used by ``tldist study`` (label-budget studies) and ``tldist shards subset``. Two streamed passes over the
source shards: the first reads only the label members (image bytes are seeked over) and keeps, per class,
the ``k`` keys chosen so far; the second copies the chosen samples' bytes unchanged through the shard writer
(:func:`tldist.data.writer.write_shards`), so the subset is an ordinary shard set with a manifest. Memory is
O(classes x k), not O(samples): nothing per sample is held.

Selection: each sample gets the priority ``blake2b("<seed>/<class>/<key>")`` (64 bits); class ``c`` keeps its
``k`` samples of smallest priority, a seeded uniform choice that does not depend on the shard order (a
bottom-k sample, as in reservoir sampling with keyed priorities). The same seed therefore gives the same
keys, and for one seed the subset of a smaller ``k`` is contained in that of a larger ``k``, which keeps
label-budget curves comparable across ``k``.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import tarfile
from pathlib import Path
from typing import Iterator, Optional

from webdataset.tariterators import base_plus_ext

from tldist.data.labels import LabelError
from tldist.data.manifest import MANIFEST_NAME, Manifest, load_manifest, resolve_shard_urls
from tldist.data.retry import open_shard
from tldist.data.sources import Sample, SampleSource, normalize_ext
from tldist.data.stream import range_segments, read_shard
from tldist.data.tar import iter_members
from tldist.data.writer import write_shards
from tldist.errors import DataError, UserError
from tldist.paths import check_output_dir

log = logging.getLogger("tldist.data")


def priority(seed: int, label: int, key: str) -> int:
    """The seeded selection priority of a sample (smaller is chosen first; see the module docstring)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{label}/{key}".encode(), digest_size=8).digest(), "big")


def scan_labels(src_location: str | Path, *, keep: int = 0,
                seed: int = 0) -> tuple[Manifest, list[int], dict[int, list[str]]]:
    """Stream the label members (``.cls``, or the ``.json``/``.txt`` its manifest names:
    :attr:`~tldist.data.manifest.Manifest.label_rule`) of the set at ``src_location`` once.

    Returns ``(manifest, samples per class, {class: its keep keys of smallest priority, in priority order}``);
    memory O(classes x keep). Raises :class:`DataError` naming the shard when a sample has no readable label
    or a label outside the manifest's classes (samples an index counted as unusable, ``meta.unusable``, are
    passed over), or when the set has no labels at all.
    """
    manifest = load_manifest(src_location)
    rule = manifest.label_rule
    if not rule.labelled:
        raise DataError(f"'{src_location}' has no labels (indexed with --label none): a labels-per-class subset "
                        "needs labelled samples")
    tolerate = bool(manifest.meta.get("unusable"))

    def is_label(name: str) -> bool:
        ext = base_plus_ext(name)[1]
        return ext is not None and ext.lower() == rule.member

    counts = [0] * manifest.num_classes
    heaps: dict[int, list[tuple[int, str]]] = {}  # per class: max-heap (negated priority) of the keep smallest
    for url in resolve_shard_urls(manifest):
        stream = open_shard(url)
        try:
            for name, data in iter_members(stream, is_label):
                key = base_plus_ext(name)[0]
                try:
                    label = rule.label({rule.member: data})
                except LabelError as e:
                    if tolerate:
                        continue
                    raise DataError(f"sample '{key}' of shard {url}: {e}; check the set with 'tldist shards verify'") \
                        from None
                if not 0 <= label < manifest.num_classes:
                    if tolerate:
                        continue
                    raise DataError(f"sample '{key}' of shard {url} has label {label}, not in "
                                    f"0..{manifest.num_classes - 1} of its manifest")
                counts[label] += 1
                if keep:
                    heap = heaps.setdefault(label, [])
                    item = (-priority(seed, label, key), key)
                    if len(heap) < keep:
                        heapq.heappush(heap, item)
                    elif item > heap[0]:
                        heapq.heapreplace(heap, item)
        except (OSError, ValueError, tarfile.TarError) as e:  # cut download, failed pipe: command, bad tar
            reason = getattr(stream, "failure", None) or f"{type(e).__name__}: {e}"
            raise DataError(f"shard {url} could not be read to its end ({reason}); check the set with "
                            "'tldist shards verify'") from None
        finally:
            try:
                stream.close()
            except OSError:  # raised above when a read reached it; after the tar's end blocks, every label was read
                pass
    chosen = {c: [k for _, k in sorted(heap, reverse=True)] for c, heap in sorted(heaps.items())}
    return manifest, counts, chosen


def check_labels_per_class(counts: list[int], classes: list[str], labels_per_class: int) -> None:
    """Raise :class:`UserError` when ``labels_per_class`` is not an integer >= 1, or names the first class that has
    fewer samples (``counts``, per class; a class without samples counts as 0), with the largest ``k`` every
    class allows."""
    if isinstance(labels_per_class, bool) or not isinstance(labels_per_class, int) or labels_per_class < 1:
        raise UserError(f"labels per class {labels_per_class!r} is invalid: use an integer >= 1")
    short = [c for c, n in enumerate(counts) if n < labels_per_class]
    if short:
        c = short[0]
        raise UserError(f"labels per class {labels_per_class} is more than class '{classes[c]}' has "
                        f"({counts[c]} samples{f'; {len(short)} classes are short' if len(short) > 1 else ''}); "
                        f"use k <= {min(counts)} or 'all'")


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


def samples_by_key(manifest: Manifest, labels: dict[str, int], *, missing: str, start: int = 0,
                   end: Optional[int] = None) -> Iterator[Sample]:
    """Stream ``manifest``'s shards once (or the samples ``[start, end)`` of its manifest order, seeking with
    its seek index) and yield the samples whose keys are in ``labels``, with those labels, image bytes as
    stored (for :func:`~tldist.data.writer.write_shards`). Stops once all are found; raises
    :class:`DataError` "<N> <missing>" when some never come (the shards changed, or unreadable records), and
    when a chosen sample has no image member."""

    found, rule = 0, manifest.label_rule
    end = manifest.num_samples if end is None else end
    urls = resolve_shard_urls(manifest)
    counts = [s.num_samples for s in manifest.shards]
    for shard, skip, take in range_segments(counts, range(len(counts)), start, end):
        url = urls[shard]
        for rec in read_shard(url, skip, take, offsets=manifest.shards[shard].offsets):
            if not rec.ok or rec.key not in labels:
                continue
            try:
                ext, data = rule.image_member(rec.fields)
            except LabelError:
                raise DataError(f"sample '{rec.key}' of shard {url} has no image member") from None
            yield Sample(rec.key, data, normalize_ext(ext), labels[rec.key], f"{url}:{rec.key}")
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

    check_output_dir(out_dir, "output")  # before reading the source: not a file, nor under one
    existing = subset_matches(out_dir, src_location, labels_per_class, seed)
    if existing is not None:
        return existing
    if isinstance(labels_per_class, bool) or not isinstance(labels_per_class, int) or labels_per_class < 1:
        check_labels_per_class([], [], labels_per_class)  # raises: before reading the source
    manifest, counts, chosen = scan_labels(src_location, keep=labels_per_class, seed=seed)
    check_labels_per_class(counts, manifest.classes, labels_per_class)
    labels = {key: c for c, keys in chosen.items() for key in keys}

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
