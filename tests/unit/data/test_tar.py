"""tldist.data.tar: the header parser agrees with ``tarfile`` on every kind of archive shards come in."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from tldist.data.tar import iter_members

LONG = "d" * 90 + "/" + "n" * 95 + ".jpg"  # > 100 bytes: ustar prefix, pax path or GNU long name


def make_tar(members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT, extra_dir: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if extra_dir:
            info = tarfile.TarInfo("somedir")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class NoSeek(io.RawIOBase):
    """A pipe-like stream: no seek, and reads return at most 700 bytes."""

    def __init__(self, data: bytes):
        self.buf = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self.buf.read(700 if n is None or n < 0 else min(n, 700))


MEMBERS = [("a.jpg", b"\xff\xd8" + bytes(range(256)) * 7), ("a.cls", b"3"), ("__meta__", b"meta"),
           ("b.jpg", b""), ("b.cls", b"1"), (LONG, b"x" * 513), ("ünï.cls", b"2")]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
@pytest.mark.parametrize("wrap", [io.BytesIO, NoSeek])
def test_same_members_as_tarfile(fmt, wrap):
    members = [m for m in MEMBERS if not (fmt == tarfile.USTAR_FORMAT and not m[0].isascii())]
    data = make_tar(members, fmt)
    expected = [(n, d) for n, d in members if not n.startswith("__")]
    assert list(iter_members(wrap(data))) == expected
    picked = list(iter_members(wrap(data), select=lambda n: n.endswith(".cls")))
    assert picked == [(n, d) for n, d in expected if n.endswith(".cls")]


def test_large_member_size_in_base256():
    header = bytearray(make_tar([("big.bin", b"")], tarfile.GNU_FORMAT, extra_dir=False)[:512])
    size = 3
    header[124:136] = b"\x80" + size.to_bytes(11, "big")
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    archive = bytes(header) + b"abc".ljust(512, b"\0") + bytes(1024)
    assert list(iter_members(io.BytesIO(archive))) == [("big.bin", b"abc")]


def test_compressed_shard_falls_back_to_tarfile():
    data = gzip.compress(make_tar(MEMBERS[:2]))
    assert list(iter_members(NoSeek(data))) == MEMBERS[:2]


def test_truncated_and_corrupt_archives_raise():
    data = make_tar(MEMBERS[:2], extra_dir=False)
    got = []
    with pytest.raises(tarfile.ReadError, match="cut off"):
        for member in iter_members(io.BytesIO(data[:600])):  # inside a.jpg's data
            got.append(member)
    assert got == []
    assert list(iter_members(io.BytesIO(data))) == MEMBERS[:2]
    second_header = 512 + ((len(MEMBERS[0][1]) + 511) // 512) * 512
    corrupt = bytearray(data)
    corrupt[second_header + 3] ^= 0x41
    out = []
    with pytest.raises(tarfile.ReadError, match="checksum"):
        for member in iter_members(io.BytesIO(bytes(corrupt))):
            out.append(member)
    assert out == MEMBERS[:1]  # the member before the damage still comes through


def test_empty_stream_and_end_blocks_only():
    assert list(iter_members(io.BytesIO(b""))) == []
    assert list(iter_members(io.BytesIO(bytes(1024)))) == []


def _block(info: tarfile.TarInfo, data: bytes = b"") -> bytes:
    return info.tobuf(format=tarfile.USTAR_FORMAT) + data + bytes(-len(data) % 512)


def _pax_header(**records: str) -> bytes:
    body = b""
    for key, value in records.items():
        rec = f" {key}={value}\n".encode()
        n = len(rec) + len(str(len(rec) + 1))  # the length counts its own digits (short records here)
        body += str(n).encode() + rec
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, len(body)
    return _block(info, body)


def test_pax_size_applies_to_the_next_member_only():
    """Two pax headers in a row (the first with a size record): the size belongs to the file after both."""
    member = tarfile.TarInfo("short.cls")  # its own size field says 0; the pax record says 3
    archive = _pax_header(size="3") + _pax_header(path="long/name.cls") + _block(member) + b"abc".ljust(512, b"\0")
    archive += _block(_info("next.cls", 1), b"7") + bytes(1024)
    expected = [("long/name.cls", b"abc"), ("next.cls", b"7")]
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:  # the reference reading
        assert [(m.name, tar.extractfile(m).read()) for m in tar] == expected
    assert list(iter_members(io.BytesIO(archive))) == expected


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    return info


def test_signed_checksums_are_accepted():
    """Old tars summed header bytes as signed chars; tarfile accepts that, so does the parser."""
    plain = _block(_info("a.cls", 1), b"1")
    odd = bytearray(_block(_info("\u00fc.cls", 1), b"2"))  # a name byte > 127
    signed = sum(b - 256 if b > 127 else b for b in odd[:148] + b" " * 8 + odd[156:512])
    odd[148:156] = b"%06o\0 " % signed
    archive = plain + bytes(odd) + bytes(1024)
    assert list(iter_members(io.BytesIO(archive))) == [("a.cls", b"1"), ("\u00fc.cls", b"2")]
