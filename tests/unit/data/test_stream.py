"""The topology-free global sample order (tldist.data.stream) on real tar shards: canonical partitions,
block shuffle, O(1) seek, resampled visits, mixtures, the global layout, and raw reading."""

from __future__ import annotations

import io
import itertools
import math
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from tldist.data import stream as stream_mod
from tldist.data.manifest import Manifest, ShardInfo
from tldist.data.stream import (MIXTURE_CHUNK, GlobalLayout, MixtureCursor, PartitionReader, PartitionStream,
                                SourceSpec, chunk_shares, partition_bounds, range_segments, read_shard, shard_order)
from tldist.errors import ConfigError

COUNTS = [37, 23, 50, 11, 29]  # uneven on purpose: 150 samples in 5 shards
ALL_KEYS = {f"s{s}_{i:04d}" for s, n in enumerate(COUNTS) for i in range(n)}


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), ((i * 37) % 256, (i * 91) % 256, 60)).save(buf, "JPEG")
    return buf.getvalue()


def write_set(root: Path, counts, split="train", prefix="s") -> SourceSpec:
    """Write shards with the given sample counts (keys ``<prefix><shard>_<i>``) and their manifest."""
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for s, n in enumerate(counts):
        name = f"{split}-{s:06d}.tar"
        with wds.TarWriter(str(root / name)) as w:
            for i in range(n):
                w.write({"__key__": f"{prefix}{s}_{i:04d}", "jpg": _jpeg(i), "cls": str(i % 3)})
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


def part_stream(source, part, parts, *, seed=3, block=8, **kw) -> PartitionStream:
    return PartitionStream(source, part, parts, seed=seed, block=block, **kw)


@pytest.fixture
def counted_reads(monkeypatch):
    """Counts the records :func:`read_shard` produces (every raw record a stream reads goes through it)."""
    produced = Counter()
    real = stream_mod.read_shard

    def counting(url, skip, take, **kw):
        for rec in real(url, skip, take, **kw):
            produced[url] += 1
            yield rec

    monkeypatch.setattr(stream_mod, "read_shard", counting)
    return produced


# ------------------------------------------------------------------ partitions
@pytest.mark.parametrize("total,parts", [(150, 6), (150, 7), (150, 150), (241, 240), (5, 1), (1000, 3)])
def test_partition_bounds_cut_contiguous_near_equal_ranges(total, parts):
    bounds = [partition_bounds(total, c, parts) for c in range(parts)]
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(bounds[c][1] == bounds[c + 1][0] for c in range(parts - 1))  # contiguous, no gap, no overlap
    lengths = [hi - lo for lo, hi in bounds]
    assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)  # longer ones first
    assert sum(lengths) == total


def test_partition_bounds_values():
    assert partition_bounds(150, 3, 7) == (66, 87)  # divmod(150, 7) = (21, 3): parts 0-2 hold 22, 3-6 hold 21
    assert partition_bounds(150, 0, 7) == (0, 22) and partition_bounds(150, 6, 7) == (129, 150)


def test_every_sample_once_per_stream_epoch(source):
    C = 6
    streams = [part_stream(source, c, C) for c in range(C)]
    assert [s.length for s in streams] == [25] * 6
    orders = set()
    for epoch in range(3):
        seen = Counter()
        for st in streams:
            recs = take(st.records(epoch * st.length), st.length)
            assert [p for p, _ in recs] == list(range(epoch * st.length, (epoch + 1) * st.length))
            assert all(r.ok for _, r in recs)
            seen.update(keys(recs))
        assert set(seen) == ALL_KEYS and set(seen.values()) == {1}
        orders.add(tuple(shard_order(5, 3, epoch)))
    assert len(orders) > 1  # the shard order changes per stream-epoch


def test_partition_is_a_contiguous_range_of_the_epochs_shard_order(source):
    """Partition c of stream-epoch k holds samples [lo, hi) of the shards concatenated in epoch k's order."""
    C = 7
    for epoch in (0, 1):
        concat = [f"s{s}_{i:04d}" for s in shard_order(5, 3, epoch) for i in range(COUNTS[s])]
        for c in range(C):
            st = part_stream(source, c, C)
            lo, hi = partition_bounds(150, c, C)
            assert sorted(keys(take(st.records(epoch * st.length), st.length))) == sorted(concat[lo:hi])


def test_block_shuffle_permutes_within_blocks(source):
    st = part_stream(source, 1, 3, seed=0, block=10)  # 50 samples: 5 blocks
    shuffled = keys(take(st.records(0), st.length))
    sequential = keys(take(part_stream(source, 1, 3, seed=0, block=1).records(0), st.length))
    assert shuffled != sequential
    for b in range(0, st.length, 10):
        assert sorted(shuffled[b:b + 10]) == sorted(sequential[b:b + 10])
    # each stream-epoch shuffles its blocks with its own permutations
    patterns = []
    for epoch in (0, 1, 2):
        seq = keys(take(part_stream(source, 1, 3, seed=0, block=1).records(epoch * st.length), st.length))
        shuf = keys(take(st.records(epoch * st.length), st.length))
        patterns.append([seq.index(k) for k in shuf])
    assert len({tuple(p) for p in patterns}) == 3


@pytest.mark.parametrize("resampled", [False, True])
def test_seek_equals_tail(source, resampled):
    st = part_stream(source, 2, 4, seed=7, block=9, resampled=resampled)
    n = st.length  # 37
    V = st.visit_length if resampled else n
    total = 3 * max(n, V) + 5
    full = take(st.records(0), total)
    assert [p for p, _ in full] == list(range(total))
    for p in sorted({1, 8, 9, 10, n - 1, n, n + 17, 2 * n + 3, V - 1, V, V + 1, 2 * V + 9}):
        tail = take(st.records(p), total - p)
        assert [(q, r.key) for q, r in tail] == [(q, r.key) for q, r in full[p:]], p


@pytest.mark.parametrize("resampled", [False, True])
def test_far_seek_reads_one_block(source, resampled, counted_reads):
    """O(1) seek: a position a billion samples in reads at most the block(s) it needs, and equals the tail of a
    stream started at the beginning of that block's stream-epoch (resampled: visit)."""
    st = part_stream(source, 3, 6, seed=11, block=8, resampled=resampled)
    unit = st.visit_length if resampled else st.length
    p = 10**9 * unit + 13
    got = take(st.records(p), 5)
    assert sum(counted_reads.values()) <= 2 * st.block, counted_reads  # the block of p (and the next one)
    assert [q for q, _ in got] == list(range(p, p + 5))
    start = p - p % unit
    ref = take(st.records(start), 18)
    assert [(q, r.key) for q, r in got] == [(q, r.key) for q, r in ref[13:]]


def test_too_few_samples_or_no_block_is_a_config_error():
    with pytest.raises(ConfigError, match="data.partitions"):
        PartitionStream(SourceSpec("tiny", ("x.tar",), (3,)), 0, 4, seed=0, block=4)
    with pytest.raises(ConfigError, match="block"):
        PartitionStream(SourceSpec("tiny", ("x.tar",), (30,)), 0, 4, seed=0, block=0)


# ------------------------------------------------------------------ resampled mode
def test_resampled_is_deterministic_and_differs_per_partition(source):
    a = keys(take(part_stream(source, 0, 2, seed=1, block=16, resampled=True).records(0), 300))
    b = keys(take(part_stream(source, 0, 2, seed=1, block=16, resampled=True).records(0), 300))
    c = keys(take(part_stream(source, 1, 2, seed=1, block=16, resampled=True).records(0), 300))
    assert a == b and a != c
    assert len({k.split("_")[0] for k in a}) >= 3


def test_resampled_visits_draw_shards_by_sample_count(source):
    """Visit v starts at shard visit_shard(v), drawn with replacement with probability count / total."""
    st = part_stream(source, 0, 6, seed=5, block=8, resampled=True)
    n = 20000
    drawn = Counter(st.visit_shard(v) for v in range(n))
    for shard, count in enumerate(COUNTS):
        # a binomial proportion over 20000 draws has sd < 0.0036: 0.02 is a loose bound
        assert abs(drawn[shard] / n - count / 150) < 0.02, (shard, drawn[shard] / n, count / 150)
    assert st.visit_shard(12345) == st.visit_shard(12345)  # pure function of the visit


def test_a_resampled_visit_reads_V_samples_from_the_start_of_its_shard(source):
    st = part_stream(source, 1, 6, seed=2, block=8, resampled=True)
    V = st.visit_length
    assert V % st.block == 0 and V >= 150 // 5
    manifest_order = [f"s{s}_{i:04d}" for s in range(5) for i in range(COUNTS[s])]
    starts = [sum(COUNTS[:s]) for s in range(5)]
    for v in (0, 1, 2, 57):
        first = starts[st.visit_shard(v)]
        expect = [manifest_order[(first + j) % 150] for j in range(V)]  # continues into the next shards, wraps
        got = keys(take(st.records(v * V), V))
        assert sorted(got) == sorted(expect), v


# ------------------------------------------------------------------ raw reading
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


def test_a_partition_over_a_missing_shard_keeps_its_positions(tmp_path):
    """Every shard yields exactly its manifest count of records, readable or not: positions never drift."""
    spec = write_set(tmp_path, [10, 10, 10])
    Path(spec.urls[1]).unlink()
    st = part_stream(spec, 0, 1, seed=0, block=4)
    recs = take(st.records(0), 30)
    assert [p for p, _ in recs] == list(range(30))
    assert sum(not r.ok for _, r in recs) == 10
    assert {r.key for _, r in recs if r.ok} == {f"s{s}_{i:04d}" for s in (0, 2) for i in range(10)}


# ------------------------------------------------------------------ mixtures
def test_chunk_shares_round_weights_by_largest_remainder():
    assert chunk_shares([3, 1]) == [3072, 1024]
    assert chunk_shares([1, 1, 1], 10) == [4, 3, 3] and sum(chunk_shares([0.2, 0.3, 0.5], 7)) == 7
    assert chunk_shares([1, 1e-6], 100) == [100, 0]  # a weight below 1/chunk may get no draw


def test_mixture_cursor_follows_its_weights_and_seeks(source):
    n = 3 * MIXTURE_CHUNK + 100
    ref = [next(c) for c in [MixtureCursor([0.75, 0.25], seed=5, part=2)] for _ in range(n)]
    # each full chunk holds exactly its share of each source
    for k in range(3):
        chunk = ref[k * MIXTURE_CHUNK:(k + 1) * MIXTURE_CHUNK]
        assert sum(s == 0 for s, _ in chunk) == 3072
    # each source's positions are 0, 1, 2, ...: nothing skipped, nothing read twice
    for s in (0, 1):
        assert [pos for src, pos in ref if src == s] == list(range(sum(src == s for src, _ in ref)))
    for p in (1, 4095, 4096, 4097, 5000, 3 * MIXTURE_CHUNK + 3):
        cur = MixtureCursor([0.75, 0.25], seed=5, part=2, start=p)
        assert [next(cur) for _ in range(min(60, n - p))] == ref[p:p + 60], p
    other = MixtureCursor([0.75, 0.25], seed=5, part=3)
    assert [next(other) for _ in range(200)] != ref[:200]  # partitions mix independently


def test_partition_reader_seeks_in_a_mixture(tmp_path, source):
    second = write_set(tmp_path / "b", [40, 33], prefix="b")
    streams = [part_stream(source, 1, 3, seed=0, block=8), part_stream(second, 1, 3, seed=0, block=8, source_index=1)]
    reader = PartitionReader(streams, [0.6, 0.4], seed=0, part=1)
    full = [reader.at(p) for p in range(160)]  # crosses both sources' stream-epochs (50 and 24 samples)
    assert {s for s, _, _ in full} == {0, 1}
    assert all(r.key.startswith("s" if s == 0 else "b") for s, _, r in full)
    for start in (0, 47, 120):
        fresh = PartitionReader(streams, [0.6, 0.4], seed=0, part=1)
        got = [fresh.at(p) for p in range(start, 160)]
        assert [(s, pos, r.key) for s, pos, r in got] == [(s, pos, r.key) for s, pos, r in full[start:]], start
    sparse = PartitionReader(streams, [0.6, 0.4], seed=0, part=1)  # the draws in between are passed over
    for p in (3, 10, 11, 90):
        s, pos, rec = sparse.at(p)
        assert (s, pos, rec.key) == (full[p][0], full[p][1], full[p][2].key)
    # the substitutes of a draw, nearest first: the rest of its shuffle block in emission order (wrapping
    # around), then the records of its partition stream after that block
    for p in (17, 130):
        s, pos, rec = reader.at(p)
        subs = [r.key for r in itertools.islice(reader.substitutes(), 40)]
        n = streams[s].length
        epoch, off = divmod(pos, n)
        base = epoch * n + off // 8 * 8
        size = min(8, n - off // 8 * 8)
        block = keys(take(streams[s].records(base), size))  # emission order
        j = block.index(rec.key)
        assert subs[:size - 1] == block[j + 1:] + block[:j]
        assert subs[size - 1:] == keys(take(streams[s].records(base + size), 40 - (size - 1)))
        fresh = PartitionReader(streams, [0.6, 0.4], seed=0, part=1)
        fresh.at(p)
        assert [r.key for r in itertools.islice(fresh.substitutes(), 40)] == subs  # the same on any reader


# ------------------------------------------------------------------ the global layout
def _owners(C, world, workers, batch, micros, origin=0):
    """{global sample: (rank, worker, micro, row)} over every rank and worker of a layout."""
    owners = {}
    for r in range(world):
        lay = GlobalLayout(partitions=C, world=world, rank=r, workers=workers, batch=batch, origin=origin)
        for m in range(micros):
            rows = []
            for w in range(workers):
                for row, part, draw in lay.rows(m, w):
                    t = lay.sample(m * batch + row)
                    assert (part, draw) == (t % C, t // C)
                    assert t not in owners, f"sample {t} read twice"
                    owners[t] = (r, w, m, row)
                    rows.append(row)
            assert sorted(rows) == list(range(batch))  # each row of each micro-batch filled exactly once
    return owners


@pytest.mark.parametrize("C,world,workers,batch,origin", [
    (12, 2, 2, 8, 0), (240, 4, 3, 4, 0), (240, 1, 2, 16, 48), (10, 4, 1, 5, 7), (9, 2, 4, 3, 0), (7, 3, 2, 4, 5),
])
def test_every_global_sample_read_by_exactly_one_rank_and_worker(C, world, workers, batch, origin):
    micros = 6
    owners = _owners(C, world, workers, batch, micros, origin)
    assert sorted(owners) == list(range(origin, origin + micros * batch * world))
    for r in range(world):
        lay = GlobalLayout(partitions=C, world=world, rank=r, workers=workers, batch=batch, origin=origin)
        by_part = {}
        for t, (rank, w, _, _) in owners.items():
            if rank == r:
                assert by_part.setdefault(t % C, w) == w  # a partition's draws on a rank: one loader worker
                assert lay.worker_of(t % C) == w


@pytest.mark.parametrize("origin", [0, 48, 7])
def test_same_samples_per_global_step_on_any_topology(origin):
    """Global batch 16: (1 rank, b16), (2, b8), (2 ranks x 2 workers, b8), (4, b4) put the same global samples
    in every step, and in the same global order (row i of rank r is sample i*W + r of the step)."""
    C, G = 240, 16
    steps = []
    for world, workers, batch in [(1, 1, 16), (2, 1, 8), (2, 2, 8), (4, 1, 4), (4, 3, 4)]:
        owners = _owners(C, world, workers, batch, micros=5, origin=origin)
        per_step = [[None] * G for _ in range(5)]
        for t, (r, _, m, row) in owners.items():
            per_step[m][row * world + r] = t
        steps.append(per_step)
    expect = [list(range(origin + j * G, origin + (j + 1) * G)) for j in range(5)]
    assert all(s == expect for s in steps)


def test_read_factor_when_the_world_does_not_divide_the_partitions():
    assert GlobalLayout(240, 4, 0, 2, 8).read_factor() == 1
    assert GlobalLayout(240, 7, 0, 2, 8).read_factor() == 7  # gcd(7, 240) = 1: every rank reads every partition
    assert GlobalLayout(10, 4, 0, 1, 5).read_factor() == 2
    assert math.gcd(240, 16) == 16 and GlobalLayout(240, 16, 3, 1, 2).read_factor() == 1


# ------------------------------------------------------------------ unreadable shards in a loader
def test_unreadable_shards_are_named_by_url_and_reason(tmp_path, caplog, monkeypatch):
    """An unreachable shard's log lines name its URL and curl's reason; never "sample 'None'" and
    never "the manifest lists more" (the samples were not missing from the shard: it was never read)."""
    import logging
    import socket

    from helpers import PIPELINE_SIZE as SIZE, pipeline_cfg as cfg, serve_http, write_pipeline_set
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
            monkeypatch.setattr(stream_mod, "_throttle", stream_mod.Throttle())  # its first warnings are always shown
            ld = build_train_loader(cfg([tmp_path / "s"], num_workers=0, train_urls=[pattern]), World(0, 1),
                                    image_size=SIZE)
            with caplog.at_level(logging.WARNING, logger="tldist.data"):
                # nothing of the set can be read: the first sample finds no readable substitute in its block
                with pytest.raises(DataError, match="could be read|failed to load"):
                    next(ld)
            ld.close()
            text = caplog.text
            assert f"cannot be read ({why}" in text
            assert "skipping an unread sample of shard http://127.0.0.1:" in text
            assert f"the shard cannot be read ({why}" in text
            assert "'None'" not in text and "manifest lists more" not in text
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
