"""The manifest's sparse seek index (``offsets``): ``read_shard`` starts at the nearest indexed sample, locally
(``seek``) and over HTTP (a Range request), and gives the very records of a plain read from the start."""

from __future__ import annotations

import dataclasses
import http.server
import os
import re
from pathlib import Path

import pytest

from helpers import make_shard_set, serve_http
from tldist.data import stream as stream_mod
from tldist.data.pipeline import load_source
from tldist.data.stream import PartitionStream, read_shard

SKIPS = [0, 1, 2, 63, 64, 65, 100, 127, 128, 129, 149]


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """``SimpleHTTPRequestHandler`` (which ignores Range) plus ``Range: bytes=N-`` -> 206 Partial Content."""

    ranges: list = []  # (path, first byte) of every Range request served

    def log_message(self, *args) -> None:
        pass

    def send_head(self):
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if m is None:
            return super().send_head()
        path = self.translate_path(self.path)
        try:
            f = open(path, "rb")
        except OSError:
            self.send_error(404, "File not found")
            return None
        size = os.fstat(f.fileno()).st_size
        start = int(m.group(1))
        if start >= size:
            f.close()
            self.send_error(416, "Range Not Satisfiable")
            return None
        f.seek(start)
        self.ranges.append((self.path, start))
        self.send_response(206)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        return f


class PlainHandler(http.server.SimpleHTTPRequestHandler):
    """Python's own file server: answers a Range request with the whole file (200), as some servers do."""

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """300 samples in 2 shards of 150 written by tldist's writer: a seek index entry every 64 samples."""
    root = tmp_path_factory.mktemp("seek")
    make_shard_set(root / "train", split="train", n=300, shards=2)
    spec, manifest = load_source(str(root / "train"))
    assert [list(map(list, o)) for o in spec.offsets] == [s.offsets for s in manifest.shards]
    assert [[i for i, _ in o] for o in spec.offsets] == [[0, 64, 128], [0, 64, 128]]
    return root, spec


@pytest.fixture
def opened(monkeypatch):
    """The byte offset of every shard stream read_shard opens."""
    offsets = []
    real = stream_mod.open_shard

    def recording(url, offset=0):
        offsets.append(offset)
        return real(url, offset)

    monkeypatch.setattr(stream_mod, "open_shard", recording)
    return offsets


def _keys_and_bytes(recs):
    return [(r.key, r.fields) for r in recs]


def test_local_seek_gives_the_records_of_a_plain_read(indexed, opened):
    _, spec = indexed
    for shard in (0, 1):
        url, offsets = spec.urls[shard], spec.offsets[shard]
        for skip in SKIPS:
            take = min(20, 150 - skip)
            opened.clear()
            plain = list(read_shard(url, skip, take))
            assert opened == [0]
            opened.clear()
            seeking = list(read_shard(url, skip, take, offsets=offsets))
            assert _keys_and_bytes(seeking) == _keys_and_bytes(plain), (shard, skip)
            assert all(r.ok for r in seeking) and len(seeking) == take
            # it started at the byte offset of the nearest indexed sample at or before skip
            nearest = max(i for i, _ in offsets if i <= skip)
            assert opened == [dict(offsets)[nearest]], (skip, opened)
    assert spec.offsets[0][1][1] > 0


def test_a_partition_stream_reads_the_same_with_and_without_the_index(indexed, opened):
    _, spec = indexed
    plain = dataclasses.replace(spec, offsets=())
    for part, parts in ((1, 3), (4, 7)):
        a = PartitionStream(spec, part, parts, seed=1, block=16)
        b = PartitionStream(plain, part, parts, seed=1, block=16)
        for start in (0, 5, a.length + 30):
            ra, rb = a.records(start), b.records(start)
            assert [(p, r.key) for p, r in (next(ra) for _ in range(90))] == \
                [(p, r.key) for p, r in (next(rb) for _ in range(90))]
    assert any(o > 0 for o in opened)  # partitions start mid-shard: the index was used


def test_http_range_seek_gives_the_records_of_a_plain_read(indexed, opened):
    root, spec = indexed
    RangeHandler.ranges = []
    with serve_http(root, RangeHandler) as url:
        for shard in (0, 1):
            name = Path(spec.urls[shard]).name
            remote = f"{url}/train/{name}"
            for skip in (1, 64, 100, 149):
                take = min(20, 150 - skip)
                local = list(read_shard(spec.urls[shard], skip, take))
                over_http = list(read_shard(remote, skip, take, offsets=spec.offsets[shard]))
                assert _keys_and_bytes(over_http) == _keys_and_bytes(local), (shard, skip)
    # a Range request for each read past sample 63, starting at its indexed byte offset
    expect = [(f"/train/{Path(spec.urls[s]).name}", dict(spec.offsets[s])[i])
              for s in (0, 1) for i in (0, 64, 64, 128) if i]
    assert RangeHandler.ranges == expect


def test_http_seek_on_a_server_without_range_support_still_reads_the_right_samples(indexed):
    """A server that ignores Range sends the whole shard (200): the reader must not take its first samples for
    the ones at the seek offset."""
    root, spec = indexed
    with serve_http(root, PlainHandler) as url:
        remote = f"{url}/train/{Path(spec.urls[0]).name}"
        for skip in (64, 100, 130):
            local = list(read_shard(spec.urls[0], skip, 10))
            over_http = list(read_shard(remote, skip, 10, offsets=spec.offsets[0]))
            assert [r.key for r in over_http] == [r.key for r in local], skip
            assert all(r.ok for r in over_http)
