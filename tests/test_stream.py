"""Per-slot split, block shuffle, seek and raw reading (tldist.data.stream) on real tar shards."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from tldist.data.manifest import Manifest, ShardInfo
from tldist.data.stream import (SlotStream, SourceSpec, mixed_records, mixture_choices, range_segments, read_shard,
                                shard_order, slot_range)
from tldist.errors import ConfigError

COUNTS = [37, 23, 50, 11, 29]  # uneven on purpose: 150 samples in 5 shards


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), ((i * 37) % 256, (i * 91) % 256, 60)).save(buf, "JPEG")
    return buf.getvalue()


def write_set(root: Path, counts, split="train") -> SourceSpec:
    """Write shards with the given sample counts (keys ``s<shard>_<i>``) and their manifest."""
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for s, n in enumerate(counts):
        name = f"{split}-{s:06d}.tar"
        with wds.TarWriter(str(root / name)) as w:
            for i in range(n):
                w.write({"__key__": f"s{s}_{i:04d}", "jpg": _jpeg(i), "cls": str(i % 3)})
        shards.append(ShardInfo(name, n))
    Manifest(split, ["a", "b", "c"], shards).save(root)
    return SourceSpec(str(root), tuple(str(root / s.name) for s in shards), tuple(counts))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> SourceSpec:
    return write_set(tmp_path_factory.mktemp("stream"), COUNTS)


def keys(records) -> list:
    return [r.key for _, r in records]


def take(it, n):
    return [next(it) for _ in range(n)]


def test_slot_split_every_sample_once_per_epoch(source):
    S = 4  # 2 ranks x 2 workers
    sizes = [SlotStream(source, i, S, seed=3, block_size=8).length for i in range(S)]
    assert sum(sizes) == 150 and max(sizes) - min(sizes) <= 1
    all_keys = {f"s{s}_{i:04d}" for s, n in enumerate(COUNTS) for i in range(n)}
    orders = set()
    for epoch in range(3):
        seen = Counter()
        for slot in range(S):
            st = SlotStream(source, slot, S, seed=3, block_size=8)
            recs = take(st.records(epoch * st.length), st.length)
            assert [p for p, _ in recs] == list(range(epoch * st.length, (epoch + 1) * st.length))
            assert all(r.ok for _, r in recs)
            seen.update(keys(recs))
        assert set(seen) == all_keys and set(seen.values()) == {1}
        orders.add(tuple(shard_order(5, 3, epoch)))
    assert len(orders) > 1  # shard order changes per stream-epoch


def test_block_shuffle_permutes_within_blocks(source):
    st = SlotStream(source, 1, 3, seed=0, block_size=10)
    shuffled = keys(take(st.records(0), st.length))
    sequential = keys(take(SlotStream(source, 1, 3, seed=0, block_size=1).records(0), st.length))
    assert shuffled != sequential
    for b in range(0, st.length, 10):
        assert sorted(shuffled[b:b + 10]) == sorted(sequential[b:b + 10])


@pytest.mark.parametrize("resampled", [False, True])
def test_seek_equals_tail(source, resampled):
    st = SlotStream(source, 2, 4, seed=7, block_size=9, resampled=resampled)
    n = st.length  # 37 or 38
    full = take(st.records(0), 3 * n + 5)
    for p in [1, 8, 9, 10, n - 1, n, n + 17, 2 * n + 3]:
        tail = take(st.records(p), 3 * n + 5 - p)
        assert [(q, r.key) for q, r in tail] == [(q, r.key) for q, r in full[p:]], p


def test_resampled_is_deterministic_and_covers_shards(source):
    a = keys(take(SlotStream(source, 0, 2, seed=1, block_size=16, resampled=True).records(0), 300))
    b = keys(take(SlotStream(source, 0, 2, seed=1, block_size=16, resampled=True).records(0), 300))
    c = keys(take(SlotStream(source, 1, 2, seed=1, block_size=16, resampled=True).records(0), 300))
    assert a == b and a != c
    assert len({k.split("_")[0] for k in a}) >= 3


def test_range_skips_shards_without_opening(tmp_path):
    spec = write_set(tmp_path, [10, 10, 10])
    Path(spec.urls[0]).write_bytes(b"garbage, never opened")
    segs = range_segments(spec.counts, [0, 1, 2], 13, 25)
    assert segs == [(1, 3, 7), (2, 0, 5)]
    recs = [r for shard, skip, n in segs for r in read_shard(spec.urls[shard], skip, n)]
    assert [r.key for r in recs] == [f"s1_{i:04d}" for i in range(3, 10)] + [f"s2_{i:04d}" for i in range(5)]
    assert all(r.ok and set(r.fields) == {"jpg", "cls"} for r in recs)


def test_truncated_and_missing_shards_yield_failed_records(tmp_path):
    spec = write_set(tmp_path, [12])
    path = Path(spec.urls[0])
    with tarfile.open(path) as tf:
        member = next(m for m in tf.getmembers() if m.name == "s0_0007.jpg")
    path.write_bytes(path.read_bytes()[:member.offset_data + 10])  # cut inside sample 7's image
    recs = list(read_shard(str(path), 2, 10))
    assert len(recs) == 10
    # members are written sorted (.cls before .jpg): sample 7 keeps its label but lost its image,
    # so it comes out as an incomplete record (the decoder rejects it); 8..11 are failed records
    assert [r.key for r in recs if r.ok] == [f"s0_{i:04d}" for i in range(2, 8)]
    assert set(recs[5].fields) == {"cls"}
    assert sum(not r.ok for r in recs) == 4 and "unexpected end" in recs[-1].error
    # cut exactly at a member boundary (no end-of-archive blocks): the tar just ends early
    spec = write_set(tmp_path / "b", [12])
    path = Path(spec.urls[0])
    with tarfile.open(path) as tf:
        member = next(m for m in tf.getmembers() if m.name == "s0_0009.cls")
    path.write_bytes(path.read_bytes()[:member.offset])
    recs = list(read_shard(str(path), 0, 12))
    assert [r.key for r in recs if r.ok] == [f"s0_{i:04d}" for i in range(9)] and len(recs) == 12
    missing = list(read_shard(str(tmp_path / "nope.tar"), 0, 4))
    assert len(missing) == 4 and not any(r.ok for r in missing) and "nope.tar" in missing[0].url


def test_mixture_choices_seek_and_weights(source):
    ref = list(zip(range(10000), mixture_choices([3, 1], 0, 5)))
    assert [c for _, c in zip(range(50), mixture_choices([3, 1], 0, 5, start=5000))] == [c for _, c in ref[5000:5050]]
    frac = sum(c == 0 for _, c in ref) / len(ref)
    assert abs(frac - 0.75) < 0.02
    streams = [SlotStream(source, 0, 2, seed=0, block_size=8, source_index=i) for i in range(2)]
    full = take(mixed_records(streams, [0.5, 0.5], 0, 0, [0, 0]), 120)
    # resume from the state after 47 draws: per-source positions + mixture counter
    pos = [0, 0]
    for s, p, _ in full[:47]:
        pos[s] = p + 1
    tail = take(mixed_records(streams, [0.5, 0.5], 0, 0, pos, 47), 73)
    assert [(s, p, r.key) for s, p, r in tail] == [(s, p, r.key) for s, p, r in full[47:]]


def test_too_few_samples_for_slots(source):
    assert slot_range(150, 3, 4) == (112, 150)
    with pytest.raises(ConfigError, match="num_workers"):
        SlotStream(SourceSpec("tiny", ("x.tar",), (3,)), 0, 4, seed=0, block_size=4)


def test_unreadable_shards_are_named_by_url_and_reason(tmp_path, caplog, monkeypatch):
    """An unreachable shard's log lines name its URL and curl's reason; never "sample 'None'" and
    never "the manifest lists more" (the samples were not missing from the shard: it was never read)."""
    import logging
    import socket

    from conftest import serve_http
    from test_pipeline import SIZE, cfg
    from tldist.data import stream
    from test_pipeline import write_set as write_pipeline_set

    from tldist.data.pipeline import build_train_loader
    from tldist.errors import DataError
    from tldist.world import World

    write_pipeline_set(tmp_path / "s", [12, 12])
    (tmp_path / "empty").mkdir()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with serve_http(tmp_path / "empty") as url:  # a server without the shards: 404
        cases = {
            f"{url}/train-{{000000..000001}}.tar": "curl exited with status 22: the server answered with an HTTP error",
            f"http://127.0.0.1:{port}/train-{{000000..000001}}.tar": "curl exited with status 7: could not connect",
        }
        for pattern, why in cases.items():
            caplog.clear()
            monkeypatch.setattr(stream, "_throttle", stream.Throttle())  # its first warnings are always shown
            ld = build_train_loader(cfg([tmp_path / "s"], num_workers=0, train_urls=[pattern]), World(0, 1),
                                    image_size=SIZE)
            with caplog.at_level(logging.WARNING, logger="tldist.data"):
                with pytest.raises(DataError, match="failed to load"):
                    next(ld)
            ld.close()
            shard = pattern.replace("{000000..000001}", "000000")
            assert f"shard {shard} cannot be read ({why}" in caplog.text
            assert f"skipping an unread sample of shard {shard}: the shard cannot be read ({why}" in caplog.text
            assert "'None'" not in caplog.text and "manifest lists more" not in caplog.text
    recs = list(read_shard("pipe:exit 3", 0, 2))  # a pipe: command that fails
    assert [r.describe() for r in recs] == ["an unread sample"] * 2
    assert recs[0].error == "the shard cannot be read ('exit 3' exited with status 3)"
    spec = write_set(tmp_path / "short", [12])  # a shard that really holds fewer samples than listed
    path = Path(spec.urls[0])
    with tarfile.open(path) as tf:
        member = next(m for m in tf.getmembers() if m.name == "s0_0009.cls")
    path.write_bytes(path.read_bytes()[:member.offset])
    assert list(read_shard(str(path), 0, 12))[-1].error == \
        "the shard is shorter than its manifest entry: it ends after 9 samples, the manifest counts at least 12"
