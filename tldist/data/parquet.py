"""Parquet files with an image column as a shard source (``tldist shards parquet``), the Hub's image form.

The Hugging Face Hub serves image datasets (ImageNet-1k among them) as parquet files whose image column is a
struct ``{"bytes": binary, "path": string}`` (the ``datasets`` ``Image`` feature) and whose label column is an
int (a ``ClassLabel``, its names kept in the file's ``huggingface`` schema metadata) or a string. A plain
binary image column works too.

:func:`parquet_source` gives a :class:`~tldist.data.sources.SampleSource` with random access over the rows of
``files`` in order (file by file, row group by row group), so the planned writer
(:func:`tldist.data.ingest.write_planned`) writes the shards with ``workers`` processes, byte-identical for
any number of them and resumable. Rows are read a row group at a time (only the image and label columns), so
memory holds one row group, never a whole file. Class names: ``classes`` (``--classes FILE``), else the
label column's ``ClassLabel`` names from the metadata, else ``"0"``...``"max"`` for int labels or the sorted
names for string labels. A row with a null image or label becomes a skipped sample (counted, listed in
``skipped.txt``). pyarrow is the ``parquet`` extra, imported when a parquet source is made.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from tldist.data.sources import Sample, SampleSource, normalize_ext
from tldist.errors import ConfigError, DataError

KEY_WIDTH = 9
"""Sample keys are the row's position in the source order, zero-padded to this many digits."""
_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF8", "gif"), (b"BM", "bmp"),
          (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"))


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("reading parquet needs pyarrow: pip install 'tldist[parquet]'") from None
    return pq


def image_ext(data: bytes, path: str = "") -> str:
    """The image format of ``data`` from its magic bytes (``jpg``, ``png``, ``webp``...), else from ``path``'s
    extension, else ``png`` (the writer then re-encodes what is not a stored format, or skips what does not
    decode)."""
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    suffix = os.path.splitext(path)[1]
    return normalize_ext(suffix) if suffix else "png"


class ParquetRows:
    """Random access to ``(image bytes, image path, label)`` of the rows of several parquet files.

    Opens files lazily per process (a forked writer worker opens its own) and keeps the last row group read.
    """

    def __init__(self, files: Sequence[str], image_column: str, label_column: str):
        pq = _pyarrow()
        self.files, self.image_column, self.label_column = [str(f) for f in files], image_column, label_column
        self.starts: list[tuple[int, int, int]] = []  # (first global row, file index, row group)
        row = 0
        self.schema_meta: dict[str, Any] = {}
        for fi, f in enumerate(self.files):
            try:
                meta = pq.ParquetFile(f).metadata
                schema = pq.read_schema(f)
            except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
                raise DataError(f"'{f}' is not a readable parquet file ({e})") from None
            for col in (image_column, label_column):
                if col and col not in schema.names:
                    flag = "--image-column" if col == image_column else "--label-column"
                    raise DataError(f"parquet file '{f}' has no column '{col}' (it has {', '.join(schema.names)}); "
                                    f"name the right one with {flag}")
            if fi == 0 and schema.metadata and b"huggingface" in schema.metadata:
                try:
                    self.schema_meta = json.loads(schema.metadata[b"huggingface"])
                except ValueError:
                    self.schema_meta = {}
            for rg in range(meta.num_row_groups):
                n = meta.row_group(rg).num_rows
                if n:
                    self.starts.append((row, fi, rg))
                    row += n
        self.num_rows = row
        self.file_first = {}
        """File index -> global position of its first row."""
        for start, fi, _ in reversed(self.starts):
            self.file_first[fi] = start
        self._pid, self._open = -1, {}
        self._cached: Optional[tuple[int, list, list]] = None  # (index into starts, images, labels)

    def __len__(self) -> int:
        return self.num_rows

    def labels(self) -> Iterator[Any]:
        """Every row's raw label, in order (reads the label column only)."""
        pq = _pyarrow()
        for f in self.files:
            table = pq.read_table(f, columns=[self.label_column])
            yield from table.column(0).to_pylist()

    def label_names(self) -> Optional[list[str]]:
        """The label column's ``ClassLabel`` names from the Hub's schema metadata, if any."""
        features = (self.schema_meta.get("info") or {}).get("features") or {}
        feat = features.get(self.label_column) if isinstance(features, dict) else None
        names = feat.get("names") if isinstance(feat, dict) else None
        return [str(n) for n in names] if isinstance(names, list) and names else None

    def _file(self, fi: int):
        if self._pid != os.getpid():
            self._pid, self._open, self._cached = os.getpid(), {}, None
        if fi not in self._open:
            self._open[fi] = _pyarrow().ParquetFile(self.files[fi])
        return self._open[fi]

    def row(self, pos: int) -> tuple[Optional[bytes], str, Any]:
        """``(image bytes or None, image path or '', raw label)`` of row ``pos`` of the concatenation."""
        k = self._group_of(pos)
        if self._cached is None or self._cached[0] != k or self._pid != os.getpid():
            first, fi, rg = self.starts[k]
            table = self._file(fi).read_row_group(rg, columns=[self.image_column, self.label_column])
            self._cached = (k, table.column(self.image_column).to_pylist(), table.column(self.label_column).to_pylist())
        first = self.starts[k][0]
        image, label = self._cached[1][pos - first], self._cached[2][pos - first]
        path = ""
        if isinstance(image, dict):  # the datasets Image feature: {"bytes": ..., "path": ...}
            path = str(image.get("path") or "")
            image = image.get("bytes")
        return image, path, label

    def _group_of(self, pos: int) -> int:
        lo, hi = 0, len(self.starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.starts[mid][0] <= pos:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def origin(self, pos: int) -> str:
        """``file:row`` of row ``pos``, for messages."""
        fi = self.starts[self._group_of(pos)][1]
        return f"{self.files[fi]}:{pos - self.file_first[fi]}"


def parquet_source(files: Sequence[str], *, image_column: str = "image", label_column: str = "label",
                   classes: Optional[list[str]] = None) -> tuple[list[str], SampleSource]:
    """``(class names, source)`` of the rows of ``files`` (see the module docstring).

    Raises :class:`DataError` naming the file and column when a column is missing or the labels mix
    indices and names, or an int label is outside ``classes``; :class:`ConfigError` when pyarrow is missing.
    """
    if not files:
        raise ConfigError("give at least one parquet file")
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise DataError(f"parquet file '{missing[0]}' does not exist")
    rows = ParquetRows(files, image_column, label_column)
    if len(rows) == 0:
        raise DataError(f"the parquet files hold no rows (first: '{files[0]}')")
    values = [v for v in rows.labels() if v is not None]
    kinds = {type(v) for v in values}
    if not values:
        raise DataError(f"column '{label_column}' of the parquet files holds no labels (all null)")
    if kinds - {int, str} or kinds == {int, str}:
        raise DataError(f"column '{label_column}' holds {', '.join(sorted(k.__name__ for k in kinds))} values; "
                        "labels must be class indices (int) or class names (string)")
    by_name = kinds == {str}
    names = classes or (None if by_name else rows.label_names())
    if by_name:
        names = names or sorted(set(values))
    else:
        top = max(values)
        if names is None:
            names = [str(i) for i in range(top + 1)]
        elif top >= len(names) or min(values) < 0:
            bad = top if top >= len(names) else min(values)
            raise DataError(f"column '{label_column}' holds label {bad}, outside the {len(names)} class names; "
                            "give all class names with --classes")
    index = {n: i for i, n in enumerate(names)}

    def get(pos: int) -> Sample:
        image, path, raw = rows.row(pos)
        key, origin = f"{pos:0{KEY_WIDTH}d}", rows.origin(pos)
        if image is None:
            return Sample(key, b"", "png", 0, origin, f"column '{image_column}' is null")
        if raw is None:
            return Sample(key, image, image_ext(image, path), 0, origin, f"column '{label_column}' is null")
        label = index.get(str(raw)) if by_name else int(raw)
        if label is None:
            return Sample(key, image, image_ext(image, path), 0, origin,
                          f"class name {str(raw)[:60]!r} is not in --classes")
        return Sample(key, bytes(image), image_ext(image, path), label, origin)

    def describe(pos: int) -> tuple[str, str, int]:
        return f"{pos:0{KEY_WIDTH}d}", rows.origin(pos), -1

    info = {"type": "parquet", "files": [str(f) for f in files][:20], "image_column": image_column,
            "label_column": label_column, "rows": len(rows)}
    source = SampleSource(len(rows), lambda: (get(i) for i in range(len(rows))), info, get=get, describe=describe)
    return list(names), source
