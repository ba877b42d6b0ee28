"""Sample sources for the shard writer: image-folder trees, CSV/TSV lists and torchvision datasets.

Every source returns ``(classes, samples)``: the class names (position = class index) and a
lazy, sized, re-iterable :class:`SampleSource` whose order is deterministic. By default the
order is a seeded permutation, so consecutive samples (and therefore shards) mix classes.
Image bytes are passed through unchanged unless the writer is asked to re-encode them.
"""

from __future__ import annotations

import csv
import difflib
import inspect
import io
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from tldist.data.manifest import IMAGE_EXTS
from tldist.errors import ConfigError, DataError

log = logging.getLogger("tldist.data")

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


def normalize_ext(ext: str) -> str:
    """Lower-case extension without the dot, with aliases folded (``JPEG`` -> ``jpg``, ``tif`` -> ``tiff``)."""
    ext = ext.lower().lstrip(".")
    return {"jpeg": "jpg", "jpe": "jpg", "tif": "tiff"}.get(ext, ext)


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
    from tldist.data.transforms import to_8bit

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


def scan_imagefolder(root: str | Path, classes: Optional[list[str]] = None, *,
                     keep_empty_classes: bool = False) -> tuple[list[str], list[tuple[Path, int, str]]]:
    """List ``root/<class>/**/<image>`` like torchvision's ImageFolder: sorted classes and files.

    Returns ``(classes, [(path, label, relative path)])``. ``classes`` forces the class list
    (e.g. a val tree must use the train tree's classes); forced classes without images here
    are logged as a warning. A class folder found here that holds no images (only
    ``.DS_Store``, say) raises :class:`DataError` naming it, unless ``keep_empty_classes``,
    which keeps it as a class with a warning.
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
    exts = {normalize_ext(e) for e in IMAGE_EXTS}
    items: list[tuple[Path, int, str]] = []
    for label, name in enumerate(classes):
        cdir = root / name
        if not cdir.is_dir():
            continue
        files = sorted(p for p in cdir.rglob("*") if p.is_file() and normalize_ext(p.suffix) in exts
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        items += [(p, label, p.relative_to(root).with_suffix("").as_posix()) for p in files]
    if not items:
        raise DataError(f"image folder '{root}' holds no images with extensions {', '.join(IMAGE_EXTS)}")
    empty = sorted(set(classes) - {classes[it[1]] for it in items})
    if empty and not forced and not keep_empty_classes:
        raise DataError(f"image folder '{root}' has {len(empty)} class folder(s) with no images: {empty[:10]}; "
                        "remove them, or keep them as classes with --keep-empty-classes")
    if empty:
        log.warning("image folder '%s' has no images for %d of %d classes: %s", root, len(empty), len(classes),
                    empty[:20])
    return classes, items


def samples_from_imagefolder(root: str | Path, *, split: str = "train", val_fraction: float = 0.0,
                             seed: int = 0, classes: Optional[list[str]] = None, shuffle: bool = True,
                             keep_empty_classes: bool = False) -> tuple[list[str], SampleSource]:
    """Samples of a class-subdirectory tree (classes sorted, extensions from IMAGE_EXTS, any case).

    With ``val_fraction > 0`` the tree is split per class with a seeded stratified split and
    ``split`` ('train' or 'val') picks the part; calling twice gives disjoint, complementary sets.
    Empty class folders are refused unless ``keep_empty_classes`` (see :func:`scan_imagefolder`).
    """
    classes, items = scan_imagefolder(root, classes, keep_empty_classes=keep_empty_classes)
    order = _ordered(_select([it[1] for it in items], split, val_fraction, seed, f"'{root}'"), shuffle, seed, split)
    info = {"type": "imagefolder", "root": str(Path(root).resolve()), "split": split,
            "val_fraction": val_fraction, "seed": seed, "shuffle": shuffle}
    return classes, _file_source(items, order, info)


def _read_csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read CSV '{path}': {e}") from None
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    counts = {d: first.count(d) for d in ("\t", ",", ";")}
    delim = max(counts, key=counts.get) if any(counts.values()) else ","
    reader = csv.reader(io.StringIO(text), delimiter=delim)
    return [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]


def samples_from_csv(path: str | Path, root: Optional[str | Path] = None, *, classes: Optional[list[str]] = None,
                     split: str = "train", val_fraction: float = 0.0, seed: int = 0,
                     shuffle: bool = True) -> tuple[list[str], SampleSource]:
    """Samples listed in a CSV/TSV file of ``path,label`` rows (delimiter sniffed, header optional).

    Labels are class names or integer indices (not mixed). Without ``classes``, names give
    sorted unique classes and integers give ``'0'..'max'``; classes no row uses (a gap in the
    integers, an unused name in ``classes``) are logged as a warning. Relative paths resolve
    against ``root`` or the CSV's directory. With ``val_fraction > 0`` the rows are split per
    class with a seeded stratified split and ``split`` ('train' or 'val') picks the part, as
    for image folders. Bad rows and missing files raise :class:`DataError` naming the file,
    line and value.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CSV file '{path}' does not exist")
    base = Path(root) if root is not None else path.parent
    rows = _read_csv_rows(path)
    if rows and len(rows[0][1]) >= 2 and not _is_int(rows[0][1][1]) and (
            rows[0][1][0].strip().lower() in _HEADER_PATH or rows[0][1][1].strip().lower() in _HEADER_LABEL):
        rows = rows[1:]
    if not rows:
        raise DataError(f"CSV '{path}' lists no samples; expected rows of 'path,label'")
    for line, row in rows:
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{path}:{line}: expected 'path,label', got {row!r}")
    names = [r[1].strip() for _, r in rows]
    given = classes is not None
    int_mode = not given and all(_is_int(n) for n in names)
    if classes is None:
        if int_mode:
            classes = [str(i) for i in range(max(int(n) for n in names) + 1)]
        else:
            classes = sorted({n for n in names if not _is_int(n)})
    index = {c: i for i, c in enumerate(classes)}
    items: list[tuple[Path, int, str]] = []
    for (line, row), name in zip(rows, names):
        if name in index:
            label = index[name]
        elif _is_int(name) and (given or int_mode):
            label = int(name)
            if not 0 <= label < len(classes):
                raise DataError(f"{path}:{line}: label {label} is out of range for {len(classes)} classes")
        elif _is_int(name):
            raise DataError(f"{path}:{line}: label '{name}' is an integer but other rows use class names; "
                            "use one kind throughout or pass the class list")
        else:
            raise DataError(f"{path}:{line}: unknown class '{name}'; known: {classes[:10]}")
        rel = row[0].strip()
        file = Path(rel) if Path(rel).is_absolute() else base / rel
        if normalize_ext(file.suffix) not in {normalize_ext(e) for e in IMAGE_EXTS}:
            raise DataError(f"{path}:{line}: '{rel}' is not an image file name (extensions: {', '.join(IMAGE_EXTS)})")
        if not file.is_file():
            hint = " (if line 1 is a header, name its columns 'path,label')" if line == rows[0][0] else ""
            raise DataError(f"{path}:{line}: image '{rel}' not found at '{file}'{hint}")
        items.append((file, label, Path(rel).with_suffix("").as_posix()))
    unused = sorted(set(range(len(classes))) - {it[1] for it in items})
    if unused:
        log.warning("CSV '%s' has no rows for %d of %d classes: %s%s", path, len(unused), len(classes),
                    [classes[i] for i in unused[:20]], "" if given else " (integer labels with gaps)")
    chosen = _select([it[1] for it in items], split, val_fraction, seed, f"'{path}'")
    order = _ordered(chosen, shuffle, seed, f"csv/{split}" if val_fraction else "csv")
    info = {"type": "csv", "path": str(path.resolve()), "root": str(base.resolve()), "split": split,
            "val_fraction": val_fraction, "seed": seed, "shuffle": shuffle}
    return classes, _file_source(items, order, info)


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
