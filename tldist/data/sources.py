"""Sample sources for the shard writer: image-folder trees, CSV/TSV lists and torchvision datasets.

Every source returns ``(classes, samples)``: the class names (position = class index) and the samples.
Image folders and CSV lists are :class:`Listing` objects: their files are *listed* (names and labels only,
class folder by class folder; no ``stat``, no image read) in a canonical order, as often as the writer needs,
so a writer part holds only its own share (:mod:`tldist.data.ingest`). Other sources are a lazy, sized
:class:`SampleSource` whose order is deterministic. Image bytes are passed through unchanged unless the
writer is asked to re-encode them.
"""

from __future__ import annotations

import csv
import difflib
import inspect
import io
import logging
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from tldist.data.transforms import to_8bit
from tldist.errors import ConfigError, DataError

log = logging.getLogger("tldist.data")

SOURCE_IMAGE_EXTS = frozenset({
    "jpg", "jfif", "jpe", "mpo", "png", "apng", "webp", "bmp", "dib", "gif", "tiff", "ppm", "pgm", "pbm", "pnm",
    "tga", "icb", "vda", "vst", "ico", "cur", "pcx", "sgi", "rgb", "rgba", "bw", "ras", "psd", "qoi", "jp2", "j2k",
    "jpc", "jpf", "jpx", "j2c", "avif", "avifs", "dds", "blp", "xbm", "xpm"})
"""Source file extensions (after :func:`normalize_ext`) read as images: the raster formats Pillow opens by
itself (``PIL.Image.registered_extensions()`` minus documents, video, scientific containers and formats
that need external tools: pdf, eps, mpeg, fits, hdf5, grib, wmf...). Formats other than
:data:`~tldist.data.manifest.STORED_EXTS` are re-encoded to PNG when written."""
_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]+")
_HEADER_PATH = {"path", "file", "filename", "filepath", "file_path", "image", "img", "image_path", "name"}
_HEADER_LABEL = {"label", "labels", "class", "class_name", "classname", "target", "y", "category"}


@dataclass
class Sample:
    """One record of a shard set."""

    key: str
    """Unique within the set; letters, digits, ``_`` and ``-`` only (no dots: WebDataset splits on them)."""
    data: bytes
    """Encoded image bytes, stored as they are."""
    ext: str
    """Image extension (``jpg``, ``png``...); see :func:`normalize_ext`."""
    label: int
    """Class index."""
    origin: str = ""
    """Where the sample came from (file path, dataset index), for messages."""
    error: str = ""
    """Set by a source that could not read the sample; the writer skips it and counts it."""


class SampleSource:
    """A lazy, sized, re-iterable sequence of :class:`Sample` with a description for manifest meta."""

    def __init__(self, length: int, generate: Callable[[], Iterator[Sample]], info: dict[str, Any],
                 get: Optional[Callable[[int], Sample]] = None,
                 describe: Optional[Callable[[int], tuple[str, str, int]]] = None):
        self._length = length
        self._generate = generate
        self.info = info
        """Provenance recorded as ``meta.source`` in the manifest."""
        self.get = get
        """Optional random access: ``get(pos)`` is the sample at position ``pos`` of the order."""
        self.describe = describe
        """Optional ``describe(pos)`` -> ``(key, origin, stored bytes or -1)`` without reading the image
        (the parallel writer plans shards from it; see :mod:`tldist.data.ingest`)."""

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[Sample]:
        return iter(self._generate())


@dataclass(frozen=True)
class Entry:
    """One listed sample: its key, where it comes from, and what :meth:`Listing.load` needs (picklable)."""

    key: str
    origin: str
    ref: Any


class Listing:
    """A source whose samples can be listed (keys, origins, labels; no ``stat``, no image read) in a canonical
    order, as often as needed, holding at most one class folder's names at a time.

    ``shuffle``: whether the writer mixes the samples (a seeded hash order, :mod:`tldist.data.ingest`) or keeps
    the listed order. ``seed`` keys that order (and the val split). ``info`` is recorded as ``meta.source``;
    it is complete after one full pass of :meth:`entries` (e.g. the files left out, counted by reason).
    """

    info: dict[str, Any]
    shuffle: bool = True
    seed: int = 0

    def entries(self) -> Iterator[Entry]:
        raise NotImplementedError

    def load(self, entry: Entry) -> Sample:
        """The sample of ``entry`` with its image bytes (an unreadable file gives an error sample)."""
        raise NotImplementedError

    def size(self, entry: Entry) -> int:
        """Stored bytes of ``entry``'s image (one ``stat``), -1 when unknown."""
        return -1

    def __iter__(self) -> Iterator[Sample]:
        return (self.load(e) for e in self.entries())

    def __len__(self) -> int:
        if getattr(self, "_length", None) is None:
            self._length = sum(1 for _ in self.entries())
        return self._length


def _files_under(directory: str) -> list[str]:
    """Every file under ``directory`` (recursively, following links to files but not into linked directories,
    like ``Path.rglob("**")``), as paths relative to it, in the order of ``sorted(Path(directory).rglob("*"))``
    (component by component); entry types come from ``readdir`` (no ``stat``). Plain strings: a
    14M-file tree is listed in minutes, not hours of ``pathlib``."""
    out: list[str] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            with os.scandir(os.path.join(directory, rel) if rel else directory) as it:
                for e in it:
                    name = f"{rel}/{e.name}" if rel else e.name
                    if e.is_dir(follow_symlinks=False):
                        stack.append(name)
                    elif e.is_file():
                        out.append(name)
        except OSError:
            continue
    out.sort(key=lambda r: r.split("/"))
    return out


def _left_out(rel: str) -> str:
    """:func:`left_out_reason` for a path relative to the tree's root, as a string (the listing's fast path)."""
    ext = os.path.splitext(rel)[1]
    shown = ext.lower() or "(no extension)"
    if rel.startswith(".") or "/." in rel:
        return f"hidden ({shown})"
    if normalize_ext(ext) not in SOURCE_IMAGE_EXTS:
        return f"not an image format ({shown})"
    return ""


def _read_file(path: str, key: str, label: int) -> Sample:
    try:
        data, error = Path(path).read_bytes(), ""
    except OSError as e:
        data, error = b"", f"cannot read: {e.strerror or e}"
    return Sample(key, data, normalize_ext(Path(path).suffix), label, path, error)


class ImageFolderListing(Listing):
    """``root/<class>/**/<image>`` listed class by class (see :func:`samples_from_imagefolder`)."""

    def __init__(self, root: Path, classes: list[str], *, forced: bool, split: str, val_fraction: float, seed: int,
                 shuffle: bool, keep_empty_classes: bool):
        self.root, self.classes, self.forced = root, classes, forced
        self.split, self.val_fraction, self.seed, self.shuffle = split, val_fraction, seed, shuffle
        self.keep_empty_classes = keep_empty_classes
        self.info = {"type": "imagefolder", "root": str(root.resolve()), "split": split,
                     "val_fraction": val_fraction, "seed": seed, "shuffle": shuffle}
        self._checked = False
        if val_fraction and split not in ("train", "val"):
            raise ConfigError(f"with a val fraction the split of '{root}' must be 'train' or 'val', got '{split}'")

    def entries(self) -> Iterator[Entry]:
        index, left_out, per_class = 0, Counter(), []
        root = str(self.root)
        for label, name in enumerate(self.classes):
            cdir = os.path.join(root, name)
            files: list[str] = []
            if os.path.isdir(cdir):
                for rel in _files_under(cdir):
                    reason = _left_out(f"{name}/{rel}")
                    if reason:
                        left_out[reason] += 1
                    else:
                        files.append(f"{name}/{rel}")
            per_class.append(len(files))
            keep = range(len(files))
            if self.val_fraction:  # the stratified split of this class alone (stratified_split's rule and seed)
                rest, picked = stratified_split([label] * len(files), self.val_fraction, self.seed)
                keep = picked if self.split == "val" else rest
            for j in keep:
                rel = files[j]
                path = os.path.join(root, rel)
                yield Entry(safe_key(index + j, os.path.splitext(rel)[0]), path, (path, label))
            index += len(files)
        if not self._checked:  # once, after the first full listing
            self._checked = True
            self._check(left_out, per_class, index)

    def _check(self, left_out: Counter, per_class: list[int], total: int) -> None:
        self.info["left_out"] = dict(sorted(left_out.items()))
        if left_out:
            log.warning("image folder '%s': %d file(s) left out: %s", self.root, sum(left_out.values()),
                        ", ".join(f"{n} {why}" for why, n in sorted(left_out.items())))
        if not total:
            raise DataError(f"image folder '{self.root}' holds no images (extensions read: "
                            f"{', '.join(sorted(SOURCE_IMAGE_EXTS))})")
        empty = [c for c, n in zip(self.classes, per_class) if n == 0]
        if empty and not self.forced and not self.keep_empty_classes:
            raise DataError(f"image folder '{self.root}' has {len(empty)} class folder(s) with no images: {empty[:10]}; "
                            "remove them, or keep them as classes with --keep-empty-classes")
        if empty:
            log.warning("image folder '%s' has no images for %d of %d classes: %s", self.root, len(empty),
                        len(self.classes), empty[:20])

    def load(self, entry: Entry) -> Sample:
        path, label = entry.ref
        return _read_file(path, entry.key, label)

    def size(self, entry: Entry) -> int:
        return _size(entry.ref[0])


def normalize_ext(ext: str) -> str:
    """Lower-case extension without the dot, with aliases folded (``JPEG`` -> ``jpg``, ``tif`` -> ``tiff``)."""
    ext = ext.lower().lstrip(".")
    return {"jpeg": "jpg", "jpe": "jpg", "jfif": "jpg", "tif": "tiff"}.get(ext, ext)


def safe_key(index: int, name: str = "", width: int = 7) -> str:
    """A tar-safe unique key: the zero-padded ``index`` plus a sanitised tail of ``name`` (max 60 chars)."""
    tail = _KEY_BAD.sub("_", name).strip("_")[-60:]
    return f"{index:0{width}d}_{tail}" if tail else f"{index:0{width}d}"


def encode_image(img, fmt: str = "png", quality: int = 90) -> bytes:
    """Encode a PIL image as ``png``, ``jpg`` or ``webp`` bytes (``quality`` for the lossy two).

    Modes the format cannot hold, or that the decoders would read differently, are first
    brought to 8-bit L/RGB by :func:`tldist.data.transforms.to_8bit` (16-bit -> high byte,
    alpha dropped), the rule training's decoding applies, never by PIL's clipping ``convert``.
    PNG keeps RGB, RGBA, L, LA, 1, P and 16-bit gray as they are; both decoders read those alike.
    """
    fmt = normalize_ext(fmt)
    buf = io.BytesIO()
    if fmt == "jpg":
        to_8bit(img).save(buf, format="JPEG", quality=quality)
    elif fmt == "png":
        if img.mode not in ("RGB", "RGBA", "L", "LA", "I;16", "1", "P"):
            img = to_8bit(img)
        img.save(buf, format="PNG")
    elif fmt == "webp":
        if img.mode not in ("RGB", "RGBA"):
            img = to_8bit(img)
        img.save(buf, format="WEBP", quality=quality)
    else:
        raise ConfigError(f"cannot encode images as '{fmt}'; use 'png' or 'jpg'")
    return buf.getvalue()


def stratified_split(labels: Sequence[int], fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Split indices into ``(rest, picked)`` with ``fraction`` of every class picked, seeded.

    Each class with at least two samples gets at least one picked and one left (when
    ``fraction > 0``); a class with one sample stays in ``rest``. Both lists are sorted.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"split fraction must be in [0, 1), got {fraction}")
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    rest: list[int] = []
    picked: list[int] = []
    for y, idx in sorted(by_class.items()):
        k = round(len(idx) * fraction)
        if fraction > 0 and len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        elif len(idx) < 2:
            k = 0
        order = list(idx)
        random.Random(f"{seed}/{y}").shuffle(order)
        picked += order[:k]
        rest += order[k:]
    return sorted(rest), sorted(picked)


def _select(labels: list[int], split: str, val_fraction: float, seed: int, what: str) -> list[int]:
    """Indices of ``split`` ('train' or 'val') under a seeded stratified split, or all when no split."""
    if not val_fraction:
        return list(range(len(labels)))
    if split not in ("train", "val"):
        raise ConfigError(f"with a val fraction the split of {what} must be 'train' or 'val', got '{split}'")
    rest, picked = stratified_split(labels, val_fraction, seed)
    return picked if split == "val" else rest


def _ordered(indices: list[int], shuffle: bool, seed: int, split: str) -> list[int]:
    if shuffle:
        indices = list(indices)
        random.Random(f"{seed}/order/{split}").shuffle(indices)
    return indices


def _file_samples(items: list[tuple[Path, int, str]], order: list[int]) -> Iterator[Sample]:
    """Read files lazily; unreadable ones become error samples that the writer skips."""
    for i in order:
        path, label, rel = items[i]
        try:
            data = path.read_bytes()
            error = ""
        except OSError as e:
            data, error = b"", f"cannot read: {e.strerror or e}"
        yield Sample(safe_key(i, rel), data, normalize_ext(path.suffix), label, str(path), error)


def _file_source(items: list[tuple[Path, int, str]], order: list[int], info: dict[str, Any]) -> SampleSource:
    def describe(pos: int) -> tuple[str, str, int]:
        path, _, rel = items[order[pos]]
        return safe_key(order[pos], rel), str(path), _size(path)

    return SampleSource(len(order), lambda: _file_samples(items, order), info,
                        get=lambda pos: next(_file_samples(items, [order[pos]])), describe=describe)


def scan_imagefolder(root: str | Path, classes: Optional[list[str]] = None, *, keep_empty_classes: bool = False,
                     left_out: Optional[Counter] = None) -> tuple[list[str], list[tuple[Path, int, str]]]:
    """List ``root/<class>/**/<image>`` like torchvision's ImageFolder: sorted classes and files.

    Returns ``(classes, [(path, label, relative path)])``. Image files are those with an extension of
    :data:`SOURCE_IMAGE_EXTS` (any case); every other file is left out and counted in ``left_out`` by
    reason and extension (``"not an image format (.txt)"``, ``"hidden (.DS_Store)"``), with a warning.
    ``classes`` forces the class list (e.g. a val tree must use the train tree's classes); forced classes
    without images here are logged as a warning. A class folder found here that holds no images (only
    ``.DS_Store``, say) raises :class:`DataError` naming it, unless ``keep_empty_classes``, which keeps it
    as a class with a warning.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder '{root}' does not exist or is not a directory")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise DataError(f"image folder '{root}' has no class subdirectories; expected '{root}/<class>/<image>'")
    forced = classes is not None
    if classes is None:
        classes = found
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise DataError(f"image folder '{root}' has class directories {unknown[:5]} not among the classes {classes[:10]}...")
    items: list[tuple[Path, int, str]] = []
    skipped: Counter = Counter()
    for label, name in enumerate(classes):
        cdir = root / name
        if not cdir.is_dir():
            continue
        files = []
        for p in sorted(cdir.rglob("*")):
            if not p.is_file():
                continue
            reason = left_out_reason(p, root)
            if reason:
                skipped[reason] += 1
            else:
                files.append(p)
        items += [(p, label, p.relative_to(root).with_suffix("").as_posix()) for p in files]
    if left_out is not None:
        left_out.update(skipped)
    if skipped:
        log.warning("image folder '%s': %d file(s) left out: %s", root, sum(skipped.values()),
                    ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())))
    if not items:
        raise DataError(f"image folder '{root}' holds no images (extensions read: "
                        f"{', '.join(sorted(SOURCE_IMAGE_EXTS))})")
    empty = sorted(set(classes) - {classes[it[1]] for it in items})
    if empty and not forced and not keep_empty_classes:
        raise DataError(f"image folder '{root}' has {len(empty)} class folder(s) with no images: {empty[:10]}; "
                        "remove them, or keep them as classes with --keep-empty-classes")
    if empty:
        log.warning("image folder '%s' has no images for %d of %d classes: %s", root, len(empty), len(classes),
                    empty[:20])
    return classes, items


def left_out_reason(path: Path, root: Path) -> str:
    """Why the file ``path`` of an image tree is not a sample (``''`` when it is one): hidden, or not an
    image format (:data:`SOURCE_IMAGE_EXTS`), with its extension."""
    ext = path.suffix.lower() or "(no extension)"
    if any(part.startswith(".") for part in path.relative_to(root).parts):
        return f"hidden ({ext})"
    if normalize_ext(path.suffix) not in SOURCE_IMAGE_EXTS:
        return f"not an image format ({ext})"
    return ""


def imagefolder_classes(root: str | Path, classes: Optional[list[str]] = None) -> list[str]:
    """The class list of an image-folder tree: its sorted, non-hidden subdirectories (one ``readdir``), or
    ``classes`` when given (a val tree uses the train tree's). Raises :class:`DataError` naming the folder when
    it is missing, has no class folders, or has class folders that are not among ``classes``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder '{root}' does not exist or is not a directory")
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not found:
        raise DataError(f"image folder '{root}' has no class subdirectories; expected '{root}/<class>/<image>'")
    if classes is None:
        return found
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise DataError(f"image folder '{root}' has class directories {unknown[:5]} not among the classes {classes[:10]}...")
    return list(classes)


def samples_from_imagefolder(root: str | Path, *, split: str = "train", val_fraction: float = 0.0,
                             seed: int = 0, classes: Optional[list[str]] = None, shuffle: bool = True,
                             keep_empty_classes: bool = False) -> tuple[list[str], ImageFolderListing]:
    """Samples of a class-subdirectory tree (classes sorted, :data:`SOURCE_IMAGE_EXTS`, any case), as a
    :class:`Listing`: files left out are counted by reason and extension in its ``info["left_out"]`` (the
    manifest's ``meta.source``) once listed.

    With ``val_fraction > 0`` each class is split with a seeded stratified split (:func:`stratified_split`)
    and ``split`` ('train' or 'val') picks the part; calling twice gives disjoint, complementary sets.
    Empty class folders are refused unless ``keep_empty_classes`` (see :func:`scan_imagefolder`); forced
    ``classes`` without images here are logged as a warning.
    """
    names = imagefolder_classes(root, classes)
    return names, ImageFolderListing(Path(root), names, forced=classes is not None, split=split,
                                     val_fraction=val_fraction, seed=seed, shuffle=shuffle,
                                     keep_empty_classes=keep_empty_classes)


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """``(line number, fields)`` of the non-blank rows of the CSV/TSV file ``path``, streamed; the delimiter
    (tab, comma or semicolon) is the one the first non-blank line holds most of. Raises :class:`DataError` when
    the file cannot be read or decoded."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            first = next((ln for ln in f if ln.strip()), "")
            counts = {d: first.count(d) for d in ("\t", ",", ";")}
            delim = max(counts, key=counts.get) if any(counts.values()) else ","
            f.seek(0)
            reader = csv.reader(f, delimiter=delim)
            for row in reader:
                if any(c.strip() for c in row):
                    yield reader.line_num, row
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read CSV '{path}': {e}") from None


class CsvListing(Listing):
    """The images listed in a ``path,label`` CSV/TSV file (see :func:`samples_from_csv`).

    The file is read (streamed) once here to find the classes and check every row's form, keeping one label per
    row (4 bytes) for the stratified split; :meth:`entries` streams it again. Image files are not looked at
    until a writer part takes them (:meth:`size`: a missing file is a :class:`DataError` naming its line).
    """

    def __init__(self, path: Path, base: Path, classes: Optional[list[str]], *, split: str, val_fraction: float,
                 seed: int, shuffle: bool):
        self.path, self.base, self.split, self.seed, self.shuffle = path, base, split, seed, shuffle
        self.info = {"type": "csv", "path": str(path.resolve()), "root": str(base.resolve()), "split": split,
                     "val_fraction": val_fraction, "seed": seed, "shuffle": shuffle}
        header, names_seen, max_int, all_int, n = None, set(), -1, True, 0
        self.skip_line: Optional[int] = None  # a header row
        for line, row in _csv_rows(path):
            if header is None:
                header = line
                if len(row) >= 2 and not _is_int(row[1]) and (row[0].strip().lower() in _HEADER_PATH
                                                               or row[1].strip().lower() in _HEADER_LABEL):
                    self.skip_line = line
                    continue
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise DataError(f"{path}:{line}: expected 'path,label', got {row!r}")
            name = row[1].strip()
            if _is_int(name):
                max_int = max(max_int, int(name))
            else:
                all_int = False
                names_seen.add(name)
            n += 1
        if not n:
            raise DataError(f"CSV '{path}' lists no samples; expected rows of 'path,label'")
        given = classes is not None
        self.int_mode = not given and all_int
        if classes is None:
            classes = [str(i) for i in range(max_int + 1)] if self.int_mode else sorted(names_seen)
        self.classes, self.given = list(classes), given
        self.index = {c: i for i, c in enumerate(self.classes)}
        labels = np.empty(n, dtype=np.int32)
        self.first_data_line = None
        for j, (line, row, label, _) in enumerate(self._rows()):
            labels[j] = label
            if j == 0:
                self.first_data_line = line
        unused = sorted(set(range(len(self.classes))) - set(np.unique(labels).tolist()))
        if unused:
            log.warning("CSV '%s' has no rows for %d of %d classes: %s%s", path, len(unused), len(self.classes),
                        [self.classes[i] for i in unused[:20]], "" if given else " (integer labels with gaps)")
        self.in_split: Optional[np.ndarray] = None
        if val_fraction:
            if split not in ("train", "val"):
                raise ConfigError(f"with a val fraction the split of '{path}' must be 'train' or 'val', got '{split}'")
            rest, picked = stratified_split(labels.tolist(), val_fraction, seed)
            self.in_split = np.zeros(n, dtype=bool)
            self.in_split[picked if split == "val" else rest] = True

    def _rows(self) -> Iterator[tuple[int, list[str], int, str]]:
        """``(line, fields, label, relative path)`` of every sample row, checked (not the files)."""
        for line, row in _csv_rows(self.path):
            if line == self.skip_line:
                continue
            name = row[1].strip()
            if name in self.index:
                label = self.index[name]
            elif _is_int(name) and (self.given or self.int_mode):
                label = int(name)
                if not 0 <= label < len(self.classes):
                    raise DataError(f"{self.path}:{line}: label {label} is out of range for {len(self.classes)} classes")
            elif _is_int(name):
                raise DataError(f"{self.path}:{line}: label '{name}' is an integer but other rows use class names; "
                                "use one kind throughout or pass the class list")
            else:
                raise DataError(f"{self.path}:{line}: unknown class '{name}'; known: {self.classes[:10]}")
            rel = row[0].strip()
            if normalize_ext(Path(rel).suffix) not in SOURCE_IMAGE_EXTS:
                raise DataError(f"{self.path}:{line}: '{rel}' is not an image file name (extensions: "
                                f"{', '.join(sorted(SOURCE_IMAGE_EXTS))})")
            yield line, row, label, rel

    def entries(self) -> Iterator[Entry]:
        for j, (line, _, label, rel) in enumerate(self._rows()):
            if self.in_split is not None and not self.in_split[j]:
                continue
            file = Path(rel) if Path(rel).is_absolute() else self.base / rel
            yield Entry(safe_key(j, Path(rel).with_suffix("").as_posix()), str(file), (str(file), label, line, rel))

    def load(self, entry: Entry) -> Sample:
        """The sample; a file the CSV names that does not exist is a :class:`DataError` naming the line (a
        wrong path, not damaged data)."""
        path, label, _, _ = entry.ref
        sample = _read_file(path, entry.key, label)
        if sample.error and not Path(path).exists():
            self.size(entry)  # raises, naming the line
        return sample

    def size(self, entry: Entry) -> int:
        path, _, line, rel = entry.ref
        try:
            return Path(path).stat().st_size
        except OSError:
            hint = " (if line 1 is a header, name its columns 'path,label')" if line == self.first_data_line else ""
            raise DataError(f"{self.path}:{line}: image '{rel}' not found at '{path}'{hint}") from None


def samples_from_csv(path: str | Path, root: Optional[str | Path] = None, *, classes: Optional[list[str]] = None,
                     split: str = "train", val_fraction: float = 0.0, seed: int = 0,
                     shuffle: bool = True) -> tuple[list[str], CsvListing]:
    """Samples listed in a CSV/TSV file of ``path,label`` rows (delimiter sniffed, header optional), as a
    :class:`Listing`.

    Labels are class names or integer indices (not mixed). Without ``classes``, names give
    sorted unique classes and integers give ``'0'..'max'``; classes no row uses (a gap in the
    integers, an unused name in ``classes``) are logged as a warning. Relative paths resolve
    against ``root`` or the CSV's directory. With ``val_fraction > 0`` the rows are split per
    class with a seeded stratified split and ``split`` ('train' or 'val') picks the part, as
    for image folders. Bad rows raise :class:`DataError` naming the file, line and value; a missing image
    file does when a writer takes it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CSV file '{path}' does not exist")
    listing = CsvListing(path, Path(root) if root is not None else path.parent, classes, split=split,
                         val_fraction=val_fraction, seed=seed, shuffle=shuffle)
    return listing.classes, listing


def _is_int(s: str) -> bool:
    s = s.strip()
    return s.isdigit() or (s.startswith("-") and s[1:].isdigit())


def samples_from_torchvision(name: str, root: str | Path, train: bool = True, download: bool = False, *,
                             encode: str = "png", quality: int = 90, seed: int = 0, shuffle: bool = True,
                             **kwargs: Any) -> tuple[list[str], SampleSource]:
    """Samples of ``torchvision.datasets.<name>`` (CIFAR10, MNIST, ImageFolder, FakeData...).

    ``train`` maps to the class's ``train=`` flag or ``split='train'/'test'``; extra keyword
    arguments go to the constructor. PIL images are encoded as ``encode`` (png or jpg);
    folder datasets pass their files through unchanged. Nothing is downloaded unless asked.
    """
    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if not inspect.isclass(cls):
        near = difflib.get_close_matches(name, [n for n in dir(tvd) if n[:1].isupper()], n=3)
        raise ConfigError(f"torchvision.datasets has no dataset '{name}'" + (f"; did you mean {near}?" if near else ""))
    params = inspect.signature(cls.__init__).parameters
    kw: dict[str, Any] = {}
    if "root" in params:
        kw["root"] = str(root)
    if "train" in params:
        kw["train"] = train
    elif "split" in params and "split" not in kwargs:
        kw["split"] = "train" if train else "test"
    if "download" in params:
        kw["download"] = download
    kw.update(kwargs)
    try:
        ds = cls(**kw)
    except (RuntimeError, OSError, ValueError) as e:
        raise DataError(f"cannot open torchvision dataset {name} at '{root}' ({kw}): {e}"
                        + ("" if download or "download" in str(e) else "; put the files there or pass download=True")) from None
    classes = list(getattr(ds, "classes", None) or [])
    if not classes:
        n = getattr(ds, "num_classes", None)
        targets = getattr(ds, "targets", None)
        targets = getattr(ds, "labels", None) if targets is None else targets
        if n is None and targets is not None:
            n = int(max(int(t) for t in targets)) + 1
        if n is None:
            n = max(int(ds[i][1]) for i in range(len(ds))) + 1
        classes = [str(i) for i in range(int(n))]
    order = _ordered(list(range(len(ds))), shuffle, seed, "train" if train else "test")
    fmt = normalize_ext(encode)
    if fmt not in ("png", "jpg"):
        raise ConfigError(f"encode must be 'png' or 'jpg', got '{encode}'")

    files = getattr(ds, "samples", None) if isinstance(ds, tvd.DatasetFolder) else None

    def one(i: int) -> Sample:
        key, origin = safe_key(i, "", width=8), f"{name}[{i}]"
        if files is not None:
            path, label = files[i]
            try:
                return Sample(key, Path(path).read_bytes(), normalize_ext(Path(path).suffix), int(label), path)
            except OSError as e:
                return Sample(key, b"", "jpg", int(label), path, f"cannot read: {e}")
        try:
            img, label = ds[i]
        except Exception as e:  # a corrupt item must not stop the whole conversion
            return Sample(key, b"", fmt, 0, origin, f"cannot load: {e}")
        if not isinstance(label, int) and not (hasattr(label, "ndim") and label.ndim == 0):
            raise DataError(f"{origin}: target {label!r} is not a class index; {name} is not a classification dataset")
        if not hasattr(img, "save"):
            raise DataError(f"{origin}: item is a {type(img).__name__}, not a PIL image; pass no transform")
        return Sample(key, encode_image(img, fmt, quality), fmt, int(label), origin)

    def generate() -> Iterator[Sample]:
        return (one(i) for i in order)

    def describe(pos: int) -> tuple[str, str, int]:
        i = order[pos]
        if files is not None:
            return safe_key(i, "", width=8), str(files[i][0]), _size(files[i][0])
        return safe_key(i, "", width=8), f"{name}[{i}]", -1

    info = {"type": "torchvision", "name": name, "root": str(root), "train": train, "encode": fmt,
            "seed": seed, "shuffle": shuffle, **{k: v for k, v in kwargs.items() if isinstance(v, (str, int, float, bool))}}
    return classes, SampleSource(len(order), generate, info, get=lambda pos: one(order[pos]), describe=describe)


def _size(path: str | Path) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:
        return -1
