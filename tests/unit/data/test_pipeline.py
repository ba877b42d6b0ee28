"""Train/eval loaders end to end: real shards, real worker processes, a real local HTTP server.

Ranks are simulated in one process with ``World(rank, world_size, 0)``: nothing here needs a collective, so
the loaders of every rank of a job can be built side by side and their batches put into the global order
(row ``i`` of rank ``r`` in a step is global sample ``i * world + r`` of that step).
"""

from __future__ import annotations

import logging
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from helpers import PIPELINE_SIZE as SIZE, make_shard_set, pipeline_cfg as cfg, serve_http, write_pipeline_set as write_set
from tldist.data import pipeline as pipeline_mod
from tldist.data.pipeline import STATE_VERSION, build_eval_loader, build_train_loader
from tldist.data.stream import PartitionStream
from tldist.errors import ConfigError, DataError
from tldist.world import World


def truncate_in(shard: Path, member: str) -> None:
    """Cut ``shard`` 10 bytes into ``member``'s data (that sample and all later ones are lost)."""
    with tarfile.open(shard) as tf:
        m = next(m for m in tf.getmembers() if m.name == member)
    shard.write_bytes(shard.read_bytes()[:m.offset_data + 10])


def take(loader, n):
    return [next(loader) for _ in range(n)]


def loaders(c, world: int):
    """The train loaders of every rank of a ``world``-rank job."""
    return [build_train_loader(c, World(r, world, 0), image_size=SIZE) for r in range(world)]


def global_steps(per_rank: list[list[dict]]) -> list[list[tuple[str, torch.Tensor]]]:
    """``(key, image)`` of each step's samples in global order, from each rank's micro-batches of those steps."""
    world = len(per_rank)
    steps = []
    for batches in zip(*per_rank):
        b = len(batches[0]["key"])
        steps.append([(batches[r]["key"][i], batches[r]["image"][i].clone()) for i in range(b) for r in range(world)])
    return steps


def run_job(c, world: int, steps: int, close: bool = True):
    lds = loaders(c, world)
    per_rank = [take(ld, steps) for ld in lds]
    if close:
        for ld in lds:
            ld.close()
    return lds, global_steps(per_rank)


def same(a, b) -> bool:
    """Two lists of steps hold the same samples in the same order, with bitwise equal images."""
    return [[k for k, _ in s] for s in a] == [[k for k, _ in s] for s in b] and \
        all(torch.equal(x, y) for sa, sb in zip(a, b) for (_, x), (_, y) in zip(sa, sb))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    d = {"root": root}
    d["clean"] = write_set(root / "clean", [40, 25, 35])
    # textured images (noise + a class square): a crop or flip changes their pixels, unlike the solid ones above
    make_shard_set(root / "tex", split="train", n=100, shards=3)
    d["tex"] = {f"strain{i:05d}": i % 4 for i in range(100)}
    d["val"] = write_set(root / "val", [13, 15, 9], prefix="v")  # 37 samples: uneven over 4 slots
    # faulty: one corrupt JPEG in shard 1; shard 2 cut inside sample 12's image (12 kept, 18 lost)
    d["faulty"] = write_set(root / "faulty", [30, 30, 30, 30], corrupt={"s1_0005"})
    truncate_in(root / "faulty" / "train-000002.tar", "s2_0012.jpg")
    d["faulty_bad"] = {"s1_0005"} | {f"s2_{i:04d}" for i in range(12, 30)}
    d["mixA"] = write_set(root / "mixA", [120, 80], classes=("a", "b", "c"), prefix="A")
    d["mixB"] = write_set(root / "mixB", [100], classes=("c", "d"), prefix="B")
    # over HTTP, shard 1 of "partial" is missing on the server (404): its 20 samples fail
    d["partial"] = write_set(root / "partial", [15, 20, 10], prefix="p")
    shutil.move(root / "partial" / "train-000001.tar", root / "partial-000001.tar.bak")
    return d


@pytest.fixture(scope="module")
def http_root(data):
    with serve_http(data["root"]) as url:
        yield url


# ------------------------------------------------------------------ exact resume on the same topology
@pytest.mark.parametrize("resampled", [False, True])
def test_train_resume_exact_with_odd_batches(data, resampled):
    c = cfg([data["root"] / "tex"], resampled=resampled, samples_per_epoch=96 if resampled else 0,
            shuffle_buffer=400)
    ref = build_train_loader(c, World(0, 1), image_size=SIZE)
    assert ref.steps_per_epoch == (96 if resampled else 100) // 8 and ref.classes == ["c0", "c1", "c2", "c3"]
    assert (ref.dataset.partitions, ref.dataset.block) == (100, 4)  # min(240, smallest set), ceil(400 / 100)
    full = take(ref, 15)  # 120 samples: crosses the first stream-epoch
    ref.close()
    for n, b in enumerate(full):
        assert b["image"].dtype == torch.uint8 and b["image"].shape == (8, 3, SIZE, SIZE)
        assert b["label"].tolist() == [data["tex"][k] for k in b["key"]] and b["_micro"] == n
    if not resampled:  # stream-epoch 0 holds every sample once
        assert Counter([k for b in full for k in b["key"]][:100]) == Counter(list(data["tex"]))
    first = build_train_loader(c, World(0, 1), image_size=SIZE)
    take(first, 5)
    sd = first.state_dict()
    first.close()
    assert sd["version"] == STATE_VERSION and sd["position"] == 40 and sd["world_size"] == 1
    assert (sd["partitions"], sd["block"], sd["read"], sd["skipped"]) == (100, 4, 40, 0)
    second = build_train_loader(c, World(0, 1), image_size=SIZE)
    second.load_state_dict(sd)
    cont = take(second, 6)
    assert [b["key"] for b in cont] == [b["key"] for b in full[5:11]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(cont, full[5:11]))  # same augmentations
    sd2 = second.state_dict()
    second.close()
    assert sd2["position"] == 88 and sd2["read"] == 88
    third = build_train_loader(c, World(0, 1), image_size=SIZE)
    third.load_state_dict(sd2)
    assert [b["key"] for b in take(third, 4)] == [b["key"] for b in full[11:15]]
    third.close()
    assert third.stats()["read"] == sd2["read"] + 32 and third.stats()["skipped"] == 0
    # another loader worker count on the same world size continues the same order
    other = build_train_loader(cfg(c.train, num_workers=1, resampled=resampled, samples_per_epoch=c.samples_per_epoch,
                                   shuffle_buffer=400), World(0, 1), image_size=SIZE)
    other.load_state_dict(sd)
    assert [b["key"] for b in take(other, 3)] == [b["key"] for b in full[5:8]]
    other.close()


def test_resume_refuses_other_data_settings_and_old_states(data):
    c = cfg([data["root"] / "clean"], num_workers=0)
    ld = build_train_loader(c, World(0, 1), image_size=SIZE)
    take(ld, 2)
    sd = ld.state_dict()
    ld.close()
    for change, key in [({"seed": 1}, "seed"), ({"resampled": True, "samples_per_epoch": 64}, "resampled")]:
        with pytest.raises(ConfigError, match=key):
            build_train_loader(cfg(c.train, num_workers=0, **change), World(0, 1), image_size=SIZE).load_state_dict(sd)
    with pytest.raises(ConfigError, match="sources"):
        build_train_loader(cfg([data["root"] / "faulty"], num_workers=0), World(0, 1),
                           image_size=SIZE).load_state_dict(sd)
    with pytest.raises(ConfigError, match="version"):
        build_train_loader(c, World(0, 1), image_size=SIZE).load_state_dict({**sd, "version": 1})
    # the order constants come from the checkpoint, whatever the config gives now
    moved = build_train_loader(cfg(c.train, num_workers=0, partitions=10, shuffle_buffer=50), World(0, 1),
                               image_size=SIZE)
    moved.load_state_dict(sd)
    assert (moved.dataset.partitions, moved.dataset.block) == (sd["partitions"], sd["block"])
    moved.close()


# ------------------------------------------------------------------ topology-free order
def test_same_samples_per_global_step_on_any_topology(data):
    """Global batch 16: 1 rank x 16, 2 ranks x 8, 2 ranks x 2 workers x 8 and 4 ranks x 4 give the same samples
    in the same global order at every step, with bitwise equal augmented images (seeds follow the sample)."""
    train = [data["root"] / "tex"]
    runs = {}
    for world, workers, batch in [(1, 0, 16), (2, 1, 8), (2, 2, 8), (4, 0, 4)]:
        c = cfg(train, num_workers=workers, batch_size=batch, shuffle_buffer=400)
        _, runs[(world, workers, batch)] = run_job(c, world, 8)  # 128 samples: into the second stream-epoch
    ref = runs[(1, 0, 16)]
    assert len(ref) == 8 and all(len(s) == 16 for s in ref)
    flat = [(k, img) for s in ref for k, img in s]
    assert {k for k, _ in flat[:100]} == set(data["tex"])  # stream-epoch 0 first, every sample once
    # a sample's augmentation is drawn per position: the same key in the next stream-epoch is cropped differently
    again = [(img, next(i2 for k2, i2 in flat[100:] if k2 == k)) for k, img in flat[:100] if k in dict(flat[100:])]
    assert again and any(not torch.equal(a, b) for a, b in again)
    for topology, steps in runs.items():
        assert same(steps, ref), topology


def test_mixture_proportions_merged_classes_and_topology(data):
    c = cfg([data["root"] / "mixA", data["root"] / "mixB"], train_weights=[0.75, 0.25], batch_size=50,
            num_workers=1, partitions=4, shuffle_buffer=64)
    ld = build_train_loader(c, World(0, 1), image_size=SIZE)
    assert ld.classes == ["a", "b", "c", "d"] and ld.source_names == c.train and ld.num_samples == 300
    batches = take(ld, 60)
    ld.close()
    src = torch.cat([b["source"] for b in batches])
    assert abs((src == 0).float().mean().item() - 0.75) < 0.03
    remap = {0: 2, 1: 3}  # mixB's "c", "d" -> merged indices
    for b in batches:
        for k, lab, s in zip(b["key"], b["label"].tolist(), b["source"].tolist()):
            assert (k[0], lab) == ("A", data["mixA"][k]) if s == 0 else (k[0], lab) == ("B", remap[data["mixB"][k]])
    # exact resume also holds for mixtures, and the mixture is the same on 2 ranks
    c2 = cfg(c.train, train_weights=[0.75, 0.25], batch_size=6, num_workers=2, shuffle_buffer=400)
    ref = build_train_loader(c2, World(0, 1), image_size=SIZE)
    full = take(ref, 12)
    ref.close()
    a = build_train_loader(c2, World(0, 1), image_size=SIZE)
    take(a, 7)
    sd = a.state_dict()
    a.close()
    assert sd["position"] == 42 and sd["weights"] == [0.75, 0.25]
    b = build_train_loader(c2, World(0, 1), image_size=SIZE)
    b.load_state_dict(sd)
    assert [x["key"] for x in take(b, 5)] == [x["key"] for x in full[7:]]
    b.close()
    _, two = run_job(cfg(c.train, train_weights=[0.75, 0.25], batch_size=3, num_workers=1, shuffle_buffer=400), 2, 12)
    assert [[k for k, _ in s] for s in two] == [x["key"] for x in full]


# ------------------------------------------------------------------ elastic resume
def test_load_resharded_continues_at_the_same_global_position(data, caplog):
    """2 ranks -> 1 rank with the batch doubled, and 1 -> 2 with it halved: the resumed job's steps are the
    uninterrupted job's; a change of the global batch continues from the same sample and says so."""
    train = [data["root"] / "tex"]
    two = cfg(train, num_workers=1, batch_size=8, shuffle_buffer=400)
    one = cfg(train, num_workers=2, batch_size=16, shuffle_buffer=400)
    _, ref = run_job(two, 2, 7)

    # 2 -> 1, batch 8 -> 16 (global batch 16 both)
    lds, head = run_job(two, 2, 3)
    states = [ld.state_dict() for ld in lds]
    assert [s["position"] for s in states] == [48, 48] and [s["read"] for s in states] == [24, 24]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tldist.data"):
        (resumed,) = loaders(one, 1)
        resumed.load_resharded(states)
    assert "batch of all ranks changes" not in caplog.text
    tail = global_steps([take(resumed, 4)])
    resumed.close()
    assert same(head + tail, ref)
    assert resumed.stats()["read"] == 48 + 64  # the old ranks' counts went to rank 0
    assert resumed.state_dict()["position"] == 48 + 4 * 16

    # 1 -> 2, batch 16 -> 8
    (first,) = loaders(one, 1)
    head = global_steps([take(first, 3)])
    state = first.state_dict()
    first.close()
    assert same(head, ref[:3])
    pair = loaders(two, 2)
    for ld in pair:
        ld.load_resharded([state])
    tail = global_steps([take(ld, 4) for ld in pair])
    for ld in pair:
        ld.close()
    assert same(tail, ref[3:])
    assert [ld.stats()["read"] for ld in pair] == [48 + 32, 32]

    # 2 -> 1 at batch 8: the global batch halves; the samples continue from the same position
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tldist.data"):
        (half,) = loaders(cfg(train, num_workers=1, batch_size=8, shuffle_buffer=400), 1)
        half.load_resharded(states)
    assert "changes from 16 (2 ranks x 8) to 8 (1 ranks x 8)" in caplog.text and "global position 48" in caplog.text
    got = [k for b in take(half, 4) for k in b["key"]]
    half.close()
    assert got == [k for s in ref[3:5] for k, _ in s]


def test_load_state_dict_with_another_batch_size_on_the_same_world(data, caplog):
    train = [data["root"] / "clean"]
    _, ref = run_job(cfg(train, num_workers=0, batch_size=8), 1, 6)
    ld = build_train_loader(cfg(train, num_workers=0, batch_size=8), World(0, 1), image_size=SIZE)
    take(ld, 2)
    sd = ld.state_dict()
    ld.close()
    with caplog.at_level(logging.WARNING, logger="tldist.data"):
        big = build_train_loader(cfg(train, num_workers=0, batch_size=16), World(0, 1), image_size=SIZE)
        big.load_state_dict(sd)
    assert "changes from 8 (1 ranks x 8) to 16 (1 ranks x 16)" in caplog.text
    assert [k for b in take(big, 2) for k in b["key"]] == [k for s in ref[2:6] for k, _ in s]
    big.close()


# ------------------------------------------------------------------ ranks
def test_even_per_rank_step_counts_on_uneven_shards(data, caplog):
    """3 ranks over 100 samples in shards of 40/25/35: every rank has the same steps per epoch and yields full
    batches forever (a rank running dry would hang DDP); every sample once per epoch across ranks."""
    c = cfg([data["root"] / "clean"], num_workers=1, batch_size=4, shuffle_buffer=400)
    with caplog.at_level(logging.WARNING, logger="tldist.data"):
        lds = loaders(c, 3)
    assert "does not divide data.partitions=100" in caplog.text  # 3 ranks share each partition: said once
    assert [ld.steps_per_epoch for ld in lds] == [100 // 12] * 3
    per_rank = [take(ld, 20) for ld in lds]  # 240 samples: 2.4 stream-epochs
    for ld in lds:
        ld.close()
    assert all(len(b["key"]) == 4 and "" not in b["key"] for batches in per_rank for b in batches)
    order = [k for step in global_steps(per_rank) for k, _ in step]
    assert Counter(order[:100]) == Counter(order[100:200]) == Counter(list(data["clean"]))


def test_eval_two_ranks_cover_val_once(data):
    c = cfg([data["root"] / "clean"], val=str(data["root"] / "val"), eval_batch_size=3)
    lds = [build_eval_loader(c, World(r, 2), image_size=SIZE) for r in (0, 1)]
    # slots get 9, 9, 9, 10 samples -> 3, 3, 3, 4 batches: rank 0 pads one batch
    assert [ld.num_batches for ld in lds] == [7, 7] and lds[0].num_samples == 37
    seen = Counter()
    for ld in lds:
        for _ in range(2):  # persistent workers: a second pass gives the same result
            batches = list(ld)
            assert len(batches) == 7
            assert all(b["image"].shape == (3, 3, SIZE, SIZE) and b["mask"].dtype == torch.bool for b in batches)
            keys = [k for b in batches for k, m in zip(b["key"], b["mask"]) if m]
            assert [b["label"][b["mask"]].tolist() for b in batches] == \
                   [[data["val"][k] for k, m in zip(b["key"], b["mask"]) if m] for b in batches]
        seen.update(keys)
        assert ld.stats() == {"read": len(keys), "skipped": 0, "retries": 0}
    assert seen == Counter(list(data["val"]))


# ------------------------------------------------------------------ bad data
def _expected(loader, bad: set[str], samples: int) -> tuple[list[str], int]:
    """The keys of global samples ``0 .. samples-1`` of a one-source loader and how many were skipped: a bad
    record is replaced by the first readable one after it in its shuffle block's emission order, wrapping
    around (the rule of tldist.data.worker), worked out here from the partition streams' blocks."""
    d = loader.dataset
    keys, skipped = [], 0
    for t in range(samples):
        part, draw = t % d.partitions, t // d.partitions
        st = PartitionStream(d.sources[0], part, d.partitions, seed=d.seed, block=d.block, resampled=d.resampled)
        base, recs, order = next(st.blocks(draw))
        emitted = [recs[i] for i in order]
        j = draw - base
        rec = emitted[j]
        if not rec.ok or rec.key in bad:
            skipped += 1
            rec = next(r for r in emitted[j + 1:] + emitted[:j] if r.ok and r.key not in bad)
        keys.append(rec.key)
    return keys, skipped


def _faulty_run(data, location, steps=30, **kw):
    c = cfg([location], max_skip_fraction=0.5, partitions=4, shuffle_buffer=128, retry_backoff_s=0.0, **kw)
    ld = build_train_loader(c, World(0, 1), image_size=SIZE)
    batches = take(ld, steps)  # 240 samples: two stream-epochs of 120
    ld.close()
    return ld, batches


def test_bad_records_are_replaced_within_their_block_and_counted_exactly(data):
    ld, batches = _faulty_run(data, data["root"] / "faulty")
    good = set(data["faulty"]) - data["faulty_bad"]
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == 240 and set(keys) <= good
    assert len(set(keys)) > 0.9 * len(good)  # the stream went on past the corrupt and truncated shards
    expect, skipped = _expected(ld, data["faulty_bad"], 240)
    assert keys == expect
    sd = ld.state_dict()
    assert sd["read"] == 240 and sd["skipped"] == skipped == ld.stats()["skipped"]
    assert skipped == 2 * 19  # every bad sample once per stream-epoch
    for b in batches:
        assert b["label"].tolist() == [data["faulty"][k] for k in b["key"]]
    # eval: failed samples are masked zero images, counted exactly once
    ev = build_eval_loader(cfg([data["root"] / "faulty"]), World(0, 1), image_size=SIZE,
                           location=str(data["root"] / "faulty"))
    batches = list(ev)
    assert ev.stats() == {"read": 120, "skipped": 19, "retries": 0}
    assert {k for b in batches for k, m in zip(b["key"], b["mask"]) if m} == good
    assert all(b["image"][~b["mask"]].sum() == 0 for b in batches)


def test_high_corruption_raises(tmp_path):
    bad = {f"s{s}_{i:04d}" for s in range(3) for i in range(0, 100, 3)}  # a third of the samples
    write_set(tmp_path / "bad", [100, 100, 100], corrupt=bad)
    ld = build_train_loader(cfg([tmp_path / "bad"], max_skip_fraction=0.1, partitions=6, shuffle_buffer=300),
                            World(0, 1), image_size=SIZE)
    with pytest.raises(DataError, match="shards verify"):
        take(ld, 100)
    ld.close()
    assert ld.stats()["read"] >= 200
    # nothing decodes: no batch ever arrives, so the worker itself raises (no silent hang)
    write_set(tmp_path / "all_bad", [150], corrupt={f"s0_{i:04d}" for i in range(150)})
    ld = build_train_loader(cfg([tmp_path / "all_bad"]), World(0, 1), image_size=SIZE)
    with pytest.raises(DataError, match="could be read"):
        next(ld)
    ld.close()


def test_http_and_pipe_urls_stream_the_same(data, http_root):
    root = data["root"]
    local, ref = _faulty_run(data, root / "faulty")
    over_http, got = _faulty_run(data, f"{http_root}/faulty/manifest.json")
    assert over_http.dataset.sources[0].urls[0].startswith("http://")
    assert [b["key"] for b in got] == [b["key"] for b in ref]
    assert over_http.state_dict()["skipped"] == local.state_dict()["skipped"]
    pattern = f"pipe:cat {root}/faulty/train-{{000000..000003}}.tar"
    piped, got = _faulty_run(data, root / "faulty", train_urls=[pattern])
    assert piped.dataset.sources[0].urls[1] == f"pipe:cat {root}/faulty/train-000001.tar"
    assert [b["key"] for b in got] == [b["key"] for b in ref]
    # a shard the server does not have (404): its samples are failed records, counted exactly
    ev = build_eval_loader(cfg([root / "clean"]), World(0, 1), image_size=SIZE, location=f"{http_root}/partial")
    masked = {k for b in ev for k, m in zip(b["key"], b["mask"]) if m}
    assert ev.stats() == {"read": 45, "skipped": 20, "retries": 0}
    assert masked == {k for k in data["partial"] if k[1] != "1"}


# ------------------------------------------------------------------ missing local shards
def test_missing_local_shards_below_the_skip_fraction_are_skipped(data, tmp_path, caplog):
    shutil.copytree(data["root"] / "clean", tmp_path / "c")
    (tmp_path / "c" / "train-000001.tar").unlink()  # 25 of 100 samples
    c = cfg([tmp_path / "c"], max_skip_fraction=0.3, partitions=2, shuffle_buffer=128)
    with caplog.at_level(logging.WARNING, logger="tldist.data"):
        ld = build_train_loader(c, World(0, 1), image_size=SIZE)
    assert "1 of 3 shards do not exist" in caplog.text and "train-000001.tar" in caplog.text
    keys = [k for b in take(ld, 25) for k in b["key"]]  # 200 samples: two stream-epochs
    ld.close()
    assert not any(k.startswith("s1_") for k in keys) and {k for k in keys} == {k for k in data["clean"] if k[1] != "1"}
    assert ld.stats() == {"read": 200, "skipped": 50, "retries": 0}
    # above data.max_skip_fraction: a DataError at build time, naming the shard
    for build in (lambda c: build_train_loader(c, World(0, 1), image_size=SIZE),
                  lambda c: build_eval_loader(c, World(0, 1), image_size=SIZE)):
        with pytest.raises(DataError, match="train-000001.tar.*does not exist"):
            build(cfg([tmp_path / "c"], val=str(tmp_path / "c"), max_skip_fraction=0.2))
    with pytest.raises(DataError, match="manifest"):
        build_train_loader(cfg([tmp_path / "nowhere"]), World(0, 1), image_size=SIZE)
    with pytest.raises(ConfigError, match="train_weights"):
        build_train_loader(cfg([tmp_path / "c"], train_weights=[1.0, 2.0]), World(0, 1), image_size=SIZE)


def test_missing_shards_are_checked_by_rank_0_alone(data, tmp_path, monkeypatch, caplog):
    """In a job, rank 0 stats the shard files and broadcasts what it found; the other ranks check nothing but
    act on the same answer (the same warning once, or the same DataError on every rank)."""
    shutil.copytree(data["root"] / "clean", tmp_path / "c")
    (tmp_path / "c" / "train-000002.tar").unlink()  # 35 of 100 samples
    calls, shared = [], {}
    real = pipeline_mod.missing_shards

    def counting(urls):
        calls.append(len(urls))
        return real(urls)

    def broadcast(obj, src=0):  # a process group: every rank gets what rank 0 (built first here) sent
        if "v" not in shared:
            shared["v"] = obj
        return shared["v"]

    monkeypatch.setattr(pipeline_mod, "missing_shards", counting)
    monkeypatch.setattr(pipeline_mod, "broadcast_object", broadcast)
    monkeypatch.setattr(pipeline_mod, "distributed", lambda: True, raising=False)
    for fraction, fails in ((0.5, False), (0.2, True)):
        shared.clear()
        calls.clear()
        c = cfg([tmp_path / "c"], max_skip_fraction=fraction, partitions=2, shuffle_buffer=128)
        for rank in (0, 1, 2):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="tldist.data"):
                if fails:
                    with pytest.raises(DataError, match="train-000002.tar"):
                        build_train_loader(c, World(rank, 3, 0), image_size=SIZE)
                else:
                    build_train_loader(c, World(rank, 3, 0), image_size=SIZE).close()
            assert ("do not exist" in caplog.text) == (rank == 0 and not fails), rank
        assert calls == [3]  # rank 0 alone looked at the files


# ------------------------------------------------------------------ buffers
def test_recycled_batch_buffers_give_the_same_batches(data):
    """With recycle_batches, a micro-batch's image tensor is refilled once RECYCLE_HOLD later ones were handed
    out (and the workers refill their share buffers): same batches, buffers reused."""
    c = cfg([data["root"] / "clean"], num_workers=2)
    ref = build_train_loader(c, World(0, 1), image_size=SIZE)
    recycled = build_train_loader(c, World(0, 1), image_size=SIZE, recycle_batches=True)
    ptrs = []
    for _ in range(16):
        a, b = next(ref), next(recycled)
        assert torch.equal(a["image"], b["image"]) and a["key"] == b["key"]
        ptrs.append(b["image"].data_ptr())
    assert len(set(ptrs)) == pipeline_mod.RECYCLE_HOLD + 1
    assert recycled.dataset.free is not None and ref.dataset.free is not None
    ref.close(), recycled.close()


def test_a_missing_shard_set_is_named_by_its_key(tmp_path):
    """data.train[1], data.val, data.val_sets[0]: a location without a manifest is one line naming the key,
    checked before a run writes anything; URLs are left to the reader."""
    from tldist.config import DataConfig
    from tldist.data.pipeline import check_data_locations

    good = tmp_path / "good"
    good.mkdir()
    (good / "manifest.json").write_text("{}")
    cases = [
        (DataConfig(train=[str(good), str(tmp_path / "nope")]), True, "data.train[1]"),
        (DataConfig(train=[str(good)], val=str(tmp_path / "v")), True, "data.val"),
        (DataConfig(train=[str(tmp_path / "nope")], val=str(good), val_sets=[str(tmp_path / "r")]), False,
         "data.val_sets[0]"),
    ]
    for data_cfg, train, key in cases:
        with pytest.raises(DataError) as e:
            check_data_locations(data_cfg, train=train)
        assert str(e.value).startswith(f"{key} '") and f"point {key} at a shard directory" in str(e.value)
        assert "\n" not in str(e.value)
    check_data_locations(DataConfig(train=[str(good)], val="https://host/val"))  # URLs: read later
