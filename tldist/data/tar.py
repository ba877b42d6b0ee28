"""Member-by-member reading of WebDataset tar shards, without ``tarfile``'s per-member cost.

Python's ``tarfile`` builds a ``TarInfo`` object through several layers of interpreter code
for every member; with two members per sample (``.jpg`` + ``.cls``) that was ~15% of a loader
worker's time on 224 px JPEGs (cProfile, ``bench/loader.py`` data). Shards are plain tar
streams, so this module parses the 512-byte headers itself: ustar names with their prefix,
pax ``path``/``size`` records, GNU long names, numeric fields in octal or base-256, and the
header checksum. Anything else (a compressed ``.tar.gz`` shard, an unknown header) is handed
to ``tarfile`` through WebDataset's iterator, with the bytes already read put back in front.

Errors (truncated data, a corrupt header) raise ``tarfile.ReadError`` (``ValueError`` for a
malformed number); callers count the shard's missing samples as failed (see
:func:`tldist.data.stream.read_shard`). Sparse members (``tar -S``) are not supported: their
samples are counted as failed, never silently misread.
"""

from __future__ import annotations

import re
import tarfile
from typing import BinaryIO, Callable, Iterator, Optional

BLOCK = 512
_ZERO = bytes(BLOCK)
_META = re.compile(r"__[^/]*__($|/)")  # WebDataset's metadata members, skipped like it does
_REGULAR = (b"0", b"\0", b"7")
_SKIP_CHUNK = 1 << 20


def iter_members(stream: BinaryIO, select: Optional[Callable[[str], bool]] = None) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of each regular file in the tar ``stream``, in archive order.

    ``select(name)``, when given, is asked before a member's bytes are read; members it
    rejects are skipped (seeked over when the stream can seek). Directories, links and
    WebDataset ``__meta__`` members are passed over.
    """
    head = _read(stream, BLOCK)
    if head and head != _ZERO and (len(head) < BLOCK or not _checksum_ok(head)):
        yield from _via_tarfile(_Replay(head, stream), select)  # not a plain tar (e.g. gzip): tarfile decides
        return
    yield from _plain(stream, head, select)


def _plain(stream: BinaryIO, header: bytes, select) -> Iterator[tuple[str, bytes]]:
    long_name: Optional[str] = None  # from a preceding GNU 'L' or pax header
    pax_size: Optional[int] = None
    while True:
        if not header or header == _ZERO:  # end of archive (or a stream without end blocks)
            return
        if len(header) < BLOCK:
            raise tarfile.ReadError("unexpected end of data inside a tar header")
        if not _checksum_ok(header):
            raise tarfile.ReadError("bad checksum in a tar header (corrupt or not a tar file)")
        kind = header[156:157]
        meta = kind in (b"x", b"L", b"g", b"K")  # headers that describe, or sit between, members
        size = pax_size if pax_size is not None and not meta else _number(header[124:136])
        padded = -(-size // BLOCK) * BLOCK
        if kind in (b"x", b"L"):  # per-member pax records / GNU long name: they describe the next member
            data = _read_exact(stream, size)
            _skip(stream, padded - size)
            if kind == b"L":
                long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            else:
                records = _pax(data)
                long_name = records.get("path", long_name)
                pax_size = int(records["size"]) if "size" in records else pax_size
            header = _read(stream, BLOCK)
            continue
        name = long_name if long_name is not None else _name(header)
        long_name, pax_size = None, None
        wanted = (kind in _REGULAR and not _META.match(name) and (select is None or select(name)))
        if wanted:
            data = _read_exact(stream, size)
            _skip(stream, padded - size)
            yield name, data
        else:
            _skip(stream, padded)
        header = _read(stream, BLOCK)


def _via_tarfile(stream, select) -> Iterator[tuple[str, bytes]]:
    from webdataset.tariterators import tar_file_iterator

    for member in tar_file_iterator(stream, select_files=select):
        yield member["fname"], member["data"]


class _Replay:
    """A read-only stream that first returns ``head``, then the rest of ``stream``."""

    def __init__(self, head: bytes, stream: BinaryIO):
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(n)
        if n is None or n < 0:
            out, self.head = self.head + self.stream.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out + (self.stream.read(n - len(out)) if len(out) < n else b"")


def _read(stream: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes: fewer only at the end of the stream (pipes and HTTP return short reads)."""
    buf = stream.read(n)
    if len(buf) == n or not buf:
        return buf
    parts = [buf]
    got = len(buf)
    while got < n:
        more = stream.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = _read(stream, n)
    if len(data) < n:
        raise tarfile.ReadError(f"unexpected end of data: a tar member is cut off after {len(data)} of {n} bytes")
    return data


def _skip(stream: BinaryIO, n: int) -> None:
    """Pass over ``n`` bytes (seek on files; read and drop on pipes and HTTP). The end of the
    stream inside padding is not an error: the member itself was complete."""
    if n <= 0:
        return
    seekable = getattr(stream, "seekable", None)
    if seekable is not None and seekable():
        stream.seek(n, 1)
        return
    while n > 0:
        chunk = stream.read(min(n, _SKIP_CHUNK))
        if not chunk:
            return
        n -= len(chunk)


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = _number(header[148:156])
    except ValueError:
        return False
    # the checksum is the byte sum with its own 8-byte field counted as spaces; some old tars
    # summed signed bytes, which tarfile also accepts
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32
    if stored == unsigned:
        return True
    high = sum(1 for b in header[:148] if b > 127) + sum(1 for b in header[156:] if b > 127)
    return stored == unsigned - 256 * high


def _number(field: bytes) -> int:
    """A numeric header field: NUL/space-terminated octal, or GNU base-256 (high bit set)."""
    if field[0] == 0x80:
        return int.from_bytes(field[1:], "big")
    if field[0] & 0x80:
        raise ValueError("negative base-256 number in a tar header")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":  # ustar splits long paths into prefix + name
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax(data: bytes) -> dict[str, str]:
    """pax extended-header records: ``"<len> <key>=<value>\\n"`` each."""
    records, i = {}, 0
    while i < len(data):
        space = data.find(b" ", i)
        if space < 0:
            break
        length = int(data[i:space])
        if length <= 0:
            raise tarfile.ReadError("bad pax record length")
        key, _, value = data[space + 1:i + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        i += length
    return records
