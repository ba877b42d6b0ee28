"""Train/eval loaders end to end: real shards, real worker processes, a real local HTTP server."""

from __future__ import annotations

import io
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from conftest import serve_http

from tldist.config import DataConfig
from tldist.data.manifest import Manifest, ShardInfo
from tldist.data.pipeline import build_eval_loader, build_train_loader
from tldist.data.stream import SlotStream, SourceSpec
from tldist.errors import ConfigError, DataError
from tldist.world import World

SIZE = 16


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 18), ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)).save(buf, "JPEG")
    return buf.getvalue()


def write_set(root: Path, counts, classes=("a", "b", "c"), prefix="s", corrupt=()) -> dict[str, int]:
    """Shards ``train-00000N.tar`` with ``counts`` samples, a manifest; returns key -> label."""
    root.mkdir(parents=True, exist_ok=True)
    labels, shards = {}, []
    for s, n in enumerate(counts):
        name = f"train-{s:06d}.tar"
        with wds.TarWriter(str(root / name)) as w:
            for i in range(n):
                key = f"{prefix}{s}_{i:04d}"
                labels[key] = (s + i) % len(classes)
                w.write({"__key__": key, "jpg": b"\xff\xd8 not a jpeg" if key in corrupt else _jpeg(i),
                         "cls": str(labels[key])})
        shards.append(ShardInfo(name, n))
    Manifest("train", list(classes), shards).save(root)
    return labels


def truncate_in(shard: Path, member: str) -> None:
    """Cut ``shard`` 10 bytes into ``member``'s data (that sample and all later ones are lost)."""
    with tarfile.open(shard) as tf:
        m = next(m for m in tf.getmembers() if m.name == member)
    shard.write_bytes(shard.read_bytes()[:m.offset_data + 10])


def cfg(train, **kw) -> DataConfig:
    base = dict(train=[str(t) for t in train], batch_size=8, num_workers=2, shuffle_buffer=16, pin_memory=False)
    base.update(kw)
    return DataConfig(**base)


def take(loader, n):
    return [next(loader) for _ in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    d = {"root": root}
    d["clean"] = write_set(root / "clean", [40, 25, 35])
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


@pytest.mark.parametrize("resampled", [False, True])
def test_train_resume_exact_with_odd_batches(data, resampled):
    c = cfg([data["root"] / "clean"], resampled=resampled, samples_per_epoch=96 if resampled else 0)
    ref = build_train_loader(c, World(0, 1), image_size=SIZE)
    assert ref.steps_per_epoch == (96 if resampled else 100) // 8 and ref.classes == ["a", "b", "c"]
    full = take(ref, 15)  # 120 samples: crosses the stream-epoch boundary of both workers
    ref.close()
    for b in full:
        assert b["image"].dtype == torch.uint8 and b["image"].shape == (8, 3, SIZE, SIZE)
        assert b["label"].tolist() == [data["clean"][k] for k in b["key"]]
    assert [b["_worker"] for b in full[:4]] == [0, 1, 0, 1]
    first = build_train_loader(c, World(0, 1), image_size=SIZE)
    take(first, 5)
    sd = first.state_dict()
    first.close()
    assert sd["batches"] == 5 and len(sd["positions"]) == 2 and sd["world_size"] == 1
    second = build_train_loader(c, World(0, 1), image_size=SIZE)
    second.load_state_dict(sd)
    cont = take(second, 6)  # next batch comes from worker 1: roles are rotated
    assert [b["key"] for b in cont] == [b["key"] for b in full[5:11]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(cont, full[5:11]))  # same augmentations
    sd2 = second.state_dict()
    second.close()
    third = build_train_loader(c, World(0, 1), image_size=SIZE)
    third.load_state_dict(sd2)
    assert [b["key"] for b in take(third, 4)] == [b["key"] for b in full[11:15]]
    third.close()
    assert third.stats()["read"] == sum(sd2["read"]) + 32 and third.stats()["skipped"] == 0
    # resuming under another world size or worker count is refused, naming the key
    with pytest.raises(ConfigError, match="world_size"):
        build_train_loader(c, World(0, 2), image_size=SIZE).load_state_dict(sd)
    with pytest.raises(ConfigError, match="num_workers"):
        build_train_loader(cfg(c.train, num_workers=1, resampled=resampled, samples_per_epoch=c.samples_per_epoch),
                           World(0, 1), image_size=SIZE).load_state_dict(sd)


def test_eval_two_ranks_cover_val_once(data):
    c = cfg([data["root"] / "clean"], val=str(data["root"] / "val"), eval_batch_size=3)
    loaders = [build_eval_loader(c, World(r, 2), image_size=SIZE) for r in (0, 1)]
    # slots get 9, 9, 9, 10 samples -> 3, 3, 3, 4 batches: rank 0 pads one batch
    assert [ld.num_batches for ld in loaders] == [7, 7] and loaders[0].num_samples == 37
    seen = Counter()
    for ld in loaders:
        for _ in range(2):  # persistent workers: a second pass gives the same result
            batches = list(ld)
            assert len(batches) == 7
            assert all(b["image"].shape == (3, 3, SIZE, SIZE) and b["mask"].dtype == torch.bool for b in batches)
            keys = [k for b in batches for k, m in zip(b["key"], b["mask"]) if m]
            assert [b["label"][b["mask"]].tolist() for b in batches] == \
                   [[data["val"][k] for k, m in zip(b["key"], b["mask"]) if m] for b in batches]
        seen.update(keys)
        assert ld.stats() == {"read": len(keys), "skipped": 0}
    assert seen == Counter(list(data["val"]))


def test_mixture_proportions_and_merged_classes(data):
    c = cfg([data["root"] / "mixA", data["root"] / "mixB"], train_weights=[0.75, 0.25], batch_size=50,
            num_workers=1)
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
    # exact resume also holds for mixtures (per-source positions + mixture counter)
    c2 = cfg(c.train, train_weights=[0.75, 0.25], batch_size=6, num_workers=2)
    ref = build_train_loader(c2, World(0, 1), image_size=SIZE)
    full = take(ref, 12)
    ref.close()
    a = build_train_loader(c2, World(0, 1), image_size=SIZE)
    take(a, 7)
    sd = a.state_dict()
    a.close()
    assert isinstance(sd["positions"][0], dict) and set(sd["positions"][0]) == {"sources", "mix"}
    b = build_train_loader(c2, World(0, 1), image_size=SIZE)
    b.load_state_dict(sd)
    assert [x["key"] for x in take(b, 5)] == [x["key"] for x in full[7:]]
    b.close()


def _expected_skips(loader, source: SourceSpec, bad: set[str], worker: int, pos: int) -> int:
    d = loader.dataset
    st = SlotStream(source, worker, d.num_slots, seed=d.seed, block_size=d.shuffle_buffer)
    it = st.records(0)
    return sum(1 for _ in range(pos) if (lambda r: not r.ok or r.key in bad)(next(it)[1]))


def _faulty_run(data, location, **kw):
    c = cfg([location], max_skip_fraction=0.5, **kw)
    ld = build_train_loader(c, World(0, 1), image_size=SIZE)
    batches = take(ld, 30)  # 240 good samples: ~2.4 passes over the 101 good ones
    ld.close()
    return ld, batches


def test_faults_are_skipped_and_counted_exactly(data):
    ld, batches = _faulty_run(data, data["root"] / "faulty")
    good = set(data["faulty"]) - data["faulty_bad"]
    keys = [k for b in batches for k in b["key"]]
    assert set(keys) == good  # the stream went on past the corrupt and truncated shards
    sd = ld.state_dict()
    source = ld.dataset.sources[0]
    for w in range(2):
        n_batches = sum(b["_worker"] == w for b in batches)
        assert sd["read"][w] == sd["positions"][w] and sd["read"][w] - sd["skipped"][w] == 8 * n_batches
        assert sd["skipped"][w] == _expected_skips(ld, source, data["faulty_bad"], w, sd["positions"][w])
    assert ld.stats()["skipped"] == sum(sd["skipped"]) > 19  # more than one pass of the 19 bad samples
    # eval: failed samples are masked zero images, counted exactly once
    ev = build_eval_loader(cfg([data["root"] / "faulty"]), World(0, 1), image_size=SIZE,
                           location=str(data["root"] / "faulty"))
    batches = list(ev)
    assert ev.stats() == {"read": 120, "skipped": 19}
    assert {k for b in batches for k, m in zip(b["key"], b["mask"]) if m} == good
    assert all(b["image"][~b["mask"]].sum() == 0 for b in batches)


def test_high_corruption_raises(tmp_path):
    bad = {f"s{s}_{i:04d}" for s in range(3) for i in range(0, 100, 3)}  # a third of the samples
    write_set(tmp_path / "bad", [100, 100, 100], corrupt=bad)
    ld = build_train_loader(cfg([tmp_path / "bad"], max_skip_fraction=0.1), World(0, 1), image_size=SIZE)
    with pytest.raises(DataError, match="shards verify"):
        take(ld, 100)
    ld.close()
    assert ld.stats()["read"] >= 200
    # nothing decodes: no batch ever arrives, so the worker itself raises (no silent hang)
    write_set(tmp_path / "all_bad", [150], corrupt={f"s0_{i:04d}" for i in range(150)})
    ld = build_train_loader(cfg([tmp_path / "all_bad"]), World(0, 1), image_size=SIZE)
    with pytest.raises(DataError, match="loader worker"):
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
    assert ev.stats() == {"read": 45, "skipped": 20} and masked == {k for k in data["partial"] if k[1] != "1"}


def test_missing_local_shard_is_a_data_error(data, tmp_path):
    shutil.copytree(data["root"] / "clean", tmp_path / "c")
    (tmp_path / "c" / "train-000001.tar").unlink()
    with pytest.raises(DataError, match="train-000001.tar"):
        build_train_loader(cfg([tmp_path / "c"]), World(0, 1), image_size=SIZE)
    with pytest.raises(DataError, match="train-000001.tar"):
        build_eval_loader(cfg([tmp_path / "c"], val=str(tmp_path / "c")), World(0, 1), image_size=SIZE)
    with pytest.raises(DataError, match="manifest"):
        build_train_loader(cfg([tmp_path / "nowhere"]), World(0, 1), image_size=SIZE)
    with pytest.raises(ConfigError, match="train_weights"):
        build_train_loader(cfg([tmp_path / "c"], train_weights=[1.0, 2.0]), World(0, 1), image_size=SIZE)


class _BufferProbe(torch.utils.data.IterableDataset):
    def __iter__(self):
        from tldist.data.worker import batch_buffer

        batch = batch_buffer(2, 4)
        yield {"shared_in_worker": batch.is_shared(), "image": batch.fill_(3)}


def test_worker_batches_are_allocated_in_shared_memory():
    """Batches are born in shared memory inside workers (nothing to copy when they are sent)."""
    from tldist.data.worker import batch_buffer

    assert not batch_buffer(2, 4).is_shared()  # in the main process: ordinary memory
    (item,) = list(torch.utils.data.DataLoader(_BufferProbe(), batch_size=None, num_workers=1))
    assert item["shared_in_worker"] is True and item["image"].shape == (2, 3, 4, 4) and bool(item["image"].eq(3).all())


def test_recycled_batch_buffers_give_the_same_batches(data):
    """With recycle_batches, workers refill a consumed batch's buffer: same batches, buffers reused."""
    c = cfg([data["root"] / "clean"], num_workers=2)
    ref = build_train_loader(c, World(0, 1), image_size=SIZE)
    recycled = build_train_loader(c, World(0, 1), image_size=SIZE, recycle_batches=True)
    bufs = []
    for _ in range(16):
        a, b = next(ref), next(recycled)
        assert torch.equal(a["image"], b["image"]) and a["key"] == b["key"] and a["_buf"] == -1
        bufs.append((b["_worker"], b["_buf"]))
    assert all(k >= 0 for _, k in bufs) and len(set(bufs)) < len(bufs)  # 8 batches per worker, fewer buffers
    ref.close(), recycled.close()


def test_a_failing_transform_is_an_error_not_a_skipped_sample():
    """Only undecodable bytes count as bad data: a transform that fails on a decoded image (a code
    or library fault, like timm's Posterize with Pillow 13) must stop the run, not be skipped."""
    import random

    from tldist.data.stream import Record
    from tldist.data.transforms import TrainTransform
    from tldist.data.worker import SampleError, decode_record

    buf = io.BytesIO()
    Image.new("RGB", (12, 10), (200, 10, 10)).save(buf, format="PNG")
    rec = Record("k", "mem://x", {"png": buf.getvalue(), "cls": b"1"})
    image, label = decode_record(rec, "pil", TrainTransform(8), random.Random(0), num_classes=2, label_map=None)
    assert image.shape == (3, 8, 8) and label == 1

    def broken(img, rng, out=None):
        raise ValueError("bits must be > 0")

    with pytest.raises(ValueError, match="bits"):
        decode_record(rec, "pil", broken, random.Random(0), num_classes=2, label_map=None)
    with pytest.raises(SampleError, match="cannot decode"):
        decode_record(Record("k", "mem://x", {"png": b"\x89PNG garbage", "cls": b"1"}), "pil", TrainTransform(8),
                      random.Random(0), num_classes=2, label_map=None)
