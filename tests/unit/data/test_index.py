"""tldist.data.index (``tldist shards index``): manifests for shard sets other tools wrote, tars untouched;
and the sparse seek index that tldist's own writers record too."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from helpers import make_shard_set, tiny_image, tldist_main

NAMES = ["cat", "dog", "eel"]


def wds_set(out: Path, n: int = 150, per_shard: int = 70, keys=lambda i: f"s{i:05d}", extra=None) -> list[Path]:
    """``n`` samples written by ``wds.ShardWriter`` (``.jpg`` + ``.cls``, label ``i % 3``), plus ``extra(i)``."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with wds.ShardWriter(str(out / "set-%06d.tar"), maxcount=per_shard, verbose=0) as w:
        for i in range(n):
            w.write({"__key__": keys(i), "jpg": tiny_image(i % 3, rng, fmt="JPEG"), "cls": str(i % 3).encode(),
                     **(extra(i) if extra else {})})
    return sorted(out.glob("*.tar"))


def img2dataset_set(out: Path, shards: int = 2, per_shard: int = 40, label=lambda i: NAMES[i % 3]) -> list[Path]:
    """img2dataset's layout: ``<key>.jpg/.txt/.json`` per sample (the class name under ``json['label']``),
    ``<shard>_stats.json`` and ``<shard>.parquet`` beside each tar."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for s in range(shards):
        with wds.TarWriter(str(out / f"{s:05d}.tar")) as w:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                doc = {"key": key, "status": "success", "caption": "a photo"}
                if label(i) is not None:
                    doc["label"] = label(i)
                w.write({"__key__": key, "jpg": tiny_image(i % 3, rng, fmt="JPEG"), "txt": b"a photo",
                         "json": json.dumps(doc).encode()})
        (out / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
        (out / f"{s:05d}.parquet").write_bytes(b"PAR1")
    return sorted(out.glob("*.tar"))


def digests(paths) -> dict[str, str]:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def first_member_offsets(path: Path) -> list[tuple[str, int]]:
    """``(key, offset of its first member's header)`` per sample, from tarfile (the reference)."""
    out, last = [], None
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key = m.name.rsplit("/", 1)[-1].split(".", 1)[0]
            key = m.name[:len(m.name) - len(m.name.rsplit("/", 1)[-1])] + key
            if key != last:
                out.append((key, m.offset))
                last = key
    return out


def expected_offsets(path: Path) -> list[list[int]]:
    return [[i, off] for i, (_, off) in enumerate(first_member_offsets(path)) if i % 64 == 0]


def test_shardwriter_set_is_indexed_in_place(tmp_path):
    from tldist.data.index import index_shards
    from tldist.data.manifest import load_manifest

    tars = wds_set(tmp_path / "wds", n=150, per_shard=70)
    before = digests(tars)
    (path, (m, what)), = index_shards([str(tmp_path / "wds")], tmp_path / "idx", workers=2).items()
    assert what == "indexed" and path == str(tmp_path / "idx")
    assert [s.num_samples for s in m.shards] == [70, 70, 10] and m.classes == ["0", "1", "2"]
    assert [s.name for s in m.shards] == [str(t) for t in tars]  # absolute: the tars stay where they are
    assert digests(tars) == before and sorted(p.name for p in (tmp_path / "idx").iterdir()) == \
        [".tldist-index.json", "manifest.json"]
    loaded = load_manifest(tmp_path / "idx")
    assert loaded.shard_urls() == [str(t) for t in tars] and loaded.meta["class_counts"] == [50, 50, 50]
    for info, tar in zip(loaded.shards, tars):
        assert info.offsets == expected_offsets(tar) and info.size == tar.stat().st_size
    assert loaded.shards[0].offsets[1][0] == 64  # 70 samples: offsets of samples 0 and 64


def test_rerun_is_a_no_op_and_a_changed_shard_is_counted_again(tmp_path):
    from tldist.data.index import index_shards

    tars = wds_set(tmp_path / "wds", n=150, per_shard=70)
    out = tmp_path / "idx"
    index_shards([str(tmp_path / "wds")], out)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    (_, (m, what)), = index_shards([str(tmp_path / "wds")], out).items()
    assert what == "unchanged" and (out / "manifest.json").stat().st_mtime_ns == stamp
    # the last shard is rewritten with 4 samples: only it is counted again
    with tarfile.open(tars[0]) as src, tarfile.open(tars[2], "w") as dst:
        for member in src.getmembers()[:8]:
            dst.addfile(member, src.extractfile(member))
    os.utime(tars[1], (1e9, 1e9))  # a touched shard (mtime only) is counted again too
    (_, (m, what)), = index_shards([str(tmp_path / "wds")], out).items()
    assert what == "re-indexed: 2 of 3 shards counted again"
    assert [s.num_samples for s in m.shards] == [70, 70, 4] and m.shards[2].offsets == expected_offsets(tars[2])


def test_img2dataset_layout_with_class_names_in_json(tmp_path):
    from tldist.data.index import index_shards
    from tldist.data.verify import verify_shards

    tars = img2dataset_set(tmp_path / "i2d")
    (_, (m, _)), = index_shards([str(tmp_path / "i2d")], tmp_path / "idx", label="json:label").items()
    assert m.classes == NAMES and m.num_samples == 80  # names sorted; _stats.json and .parquet are not shards
    assert m.meta["labels"] == {"member": "json", "values": "names", "key": "label"}
    assert m.meta["members"] == {"jpg": 80, "json": 80, "txt": 80}
    # a class file fixes the order (and the names the set may use)
    (tmp_path / "classes.txt").write_text("eel\ncat\ndog\n")
    (_, (m2, _)), = index_shards([str(tmp_path / "i2d")], tmp_path / "idx2", label="json:label",
                                 classes_file=str(tmp_path / "classes.txt")).items()
    assert m2.classes == ["eel", "cat", "dog"] and m2.meta["class_counts"] == [26, 28, 26]
    report = verify_shards(tmp_path / "idx2", decoders=["pil"])
    assert report.ok, report.problems
    assert report.label_counts == {0: 26, 1: 28, 2: 26}
    # a .txt label names the class too
    (_, (m3, _)), = index_shards([str(t) for t in tars], tmp_path / "idx3", label="txt").items()
    assert m3.classes == ["a photo"] and m3.label_rule.values == "names"


def test_keys_with_dots_and_extra_members(tmp_path):
    """webdataset's rule: the key is the member name up to the first dot of its base name, so a directory
    may hold dots and an extension may have several parts (``seg.png``), beside ``.json``/``.txt`` extras."""
    from tldist.data.index import index_shards

    def extra(i):
        return {"seg.png": tiny_image(0, np.random.default_rng(i)), "json": b"{}", "txt": b"x"}

    tars = wds_set(tmp_path / "dots", n=130, per_shard=130, keys=lambda i: f"train.v2/img_{i:04d}", extra=extra)
    (_, (m, _)), = index_shards([str(tars[0])], tmp_path / "idx").items()
    assert m.num_samples == 130 and m.shards[0].offsets == expected_offsets(tars[0])
    assert [k for k, _ in first_member_offsets(tars[0])][:2] == ["train.v2/img_0000", "train.v2/img_0001"]
    assert m.meta["members"] == {"cls": 130, "jpg": 130, "json": 130, "seg.png": 130, "txt": 130}


def test_offsets_of_pax_and_long_names_point_at_their_extension_headers(tmp_path):
    from tldist.data.index import scan_shard
    from tldist.data.labels import DEFAULT_RULE

    rng = np.random.default_rng(0)
    path = tmp_path / "pax.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(130):
            key = ("d" * 120 if i % 2 else "k") + f"/s{i:04d}"  # odd samples need a pax path record
            for ext, data in (("jpg", tiny_image(1, rng, fmt="JPEG")), ("cls", b"1")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    scan = scan_shard(str(path), DEFAULT_RULE)
    assert scan.num_samples == 130 and scan.offsets == expected_offsets(path)
    with tarfile.open(path) as tf:  # sample 64 of the shard starts at its recorded offset
        assert next(m.name for m in tf.getmembers() if m.offset == scan.offsets[1][1]).endswith("s0064.jpg")


def test_tldist_writers_record_the_same_seek_index(tmp_path):
    from tldist.data.ingest import write_planned
    from tldist.data.manifest import load_manifest
    from tldist.data.sources import Sample

    m = make_shard_set(tmp_path / "w", split="train", n=200, shards=2)
    rng = np.random.default_rng(3)
    samples = [Sample(f"p{i:04d}", tiny_image(i % 4, rng), "png", i % 4) for i in range(200)]
    planned = write_planned(samples, tmp_path / "p", "train", ["a", "b", "c", "d"], max_count=130, max_size=None,
                            check="none")
    for manifest in (m, planned, load_manifest(tmp_path / "p")):
        for info, url in zip(manifest.shards, manifest.shard_urls()):
            assert info.offsets and info.offsets == expected_offsets(Path(url)), url


def test_info_json_gives_splits_and_counts_checked_against_shards(tmp_path):
    from tldist.data.index import index_shards
    from tldist.errors import DataError

    tars = wds_set(tmp_path / "timm", n=150, per_shard=50)
    info = {"name": "toy", "label_names": ["zero", "one", "two"], "splits": {
        "train": {"name": "train", "num_samples": 100, "filenames": [t.name for t in tars[:2]], "shard_lengths": [50, 50]},
        "validation": {"name": "validation", "num_samples": 50, "filenames": [tars[2].name], "shard_lengths": [50]}}}
    (tmp_path / "timm" / "_info.json").write_text(json.dumps(info))
    got = index_shards([str(tmp_path / "timm")], tmp_path / "out", check=1)
    assert sorted(got) == [str(tmp_path / "out" / "train"), str(tmp_path / "out" / "validation")]
    train, _ = got[str(tmp_path / "out" / "train")]
    assert train.classes == ["zero", "one", "two"] and [s.num_samples for s in train.shards] == [50, 50]
    assert train.meta["source"]["counts_from"] == "_info.json" and len(train.meta["source"]["checked"]) == 1
    info["splits"]["train"]["shard_lengths"] = [50, 49]  # stale counts: the checked shard disagrees
    (tmp_path / "timm" / "_info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"set-000001.tar' holds 50 samples but _info.json says 49.*--recount"):
        index_shards([str(tmp_path / "timm")], tmp_path / "out2", check=3, split="train")


def test_wids_shard_index(tmp_path):
    from tldist.data.index import index_shards

    tars = wds_set(tmp_path / "w", n=100, per_shard=50)
    (tmp_path / "w" / "train.json").write_text(json.dumps({"wids_version": 1, "name": "toy", "shardlist": [
        {"url": t.name, "nsamples": 50} for t in tars]}))
    (path, (m, _)), = index_shards([str(tmp_path / "w" / "train.json")], tmp_path / "o", recount=True).items()
    assert path == str(tmp_path / "o" / "train") and m.num_samples == 100 and m.meta["class_counts"] == [34, 33, 33]


def test_sources_patterns_and_list_files(tmp_path):
    from tldist.data.index import expand_sources

    tars = wds_set(tmp_path / "w", n=150, per_shard=50)
    pattern = str(tmp_path / "w" / "set-{000000..000002}.tar")
    assert expand_sources([pattern])[0].urls == [str(t) for t in tars]
    assert expand_sources([str(tmp_path / "w" / "set-*.tar")])[0].urls == [str(t) for t in tars]
    (tmp_path / "w" / "list.txt").write_text("# shards\nset-000000.tar\n\nset-{000001..000002}.tar\n")
    assert expand_sources([str(tmp_path / "w" / "list.txt")])[0].urls == [str(t) for t in tars]
    urls = expand_sources(["pipe:aws s3 cp s3://b/set-{000000..000001}.tar -"])[0].urls
    assert urls == ["pipe:aws s3 cp s3://b/set-000000.tar -", "pipe:aws s3 cp s3://b/set-000001.tar -"]


def test_bad_input_is_one_line_naming_the_shard_and_exit_2(tmp_path, capsys):
    wds_set(tmp_path / "w", n=20, per_shard=20)
    code, err = tldist_main(capsys, "shards", "index", str(tmp_path / "w" / "set-{000005..000009}.tar"),
                            str(tmp_path / "o1"))
    assert code == 2 and err.count("\n") == 0 and "brace pattern" in err and "set-000005.tar" in err
    # a tar of captions only: no image member in any sample
    import webdataset as wds

    (tmp_path / "txt").mkdir()
    with wds.TarWriter(str(tmp_path / "txt" / "captions.tar")) as w:
        for i in range(5):
            w.write({"__key__": f"k{i}", "txt": b"words", "cls": b"0"})
    code, err = tldist_main(capsys, "shards", "index", str(tmp_path / "txt"), str(tmp_path / "o2"))
    assert code == 2 and err.count("\n") == 0 and "captions.tar' has no image member" in err
    # a label key absent in some samples: named with its shard and key
    img2dataset_set(tmp_path / "i2d", shards=1, label=lambda i: None if i == 7 else NAMES[i % 3])
    code, err = tldist_main(capsys, "shards", "index", str(tmp_path / "i2d"), str(tmp_path / "o3"), "--label",
                            "json:label")
    assert code == 2 and err.count("\n") == 0
    assert "00000.tar': sample 000000007: no field 'label' in .json" in err and "--max-unusable" in err
    # ...indexed anyway when allowed: counted and named in the manifest, skipped by training
    code, err = tldist_main(capsys, "shards", "index", str(tmp_path / "i2d"), str(tmp_path / "o3"), "--label",
                            "json:label", "--max-unusable", "0.05")
    m = json.loads((tmp_path / "o3" / "manifest.json").read_text())
    assert code == 0 and m["meta"]["unusable"] == 1 and "000000007" in m["meta"]["unusable_examples"][0]
    code, err = tldist_main(capsys, "shards", "index", str(tmp_path / "w"), str(tmp_path / "o4"), "--label", "json")
    assert code == 2 and "--label 'json' is not a label rule" in err


def test_subset_of_a_json_labelled_set_keeps_names_and_labels(tmp_path):
    from tldist.data.index import index_shards
    from tldist.data.stream import read_shard
    from tldist.data.subset import write_label_subset

    img2dataset_set(tmp_path / "i2d")
    index_shards([str(tmp_path / "i2d")], tmp_path / "idx", label="json:label")
    sub = write_label_subset(tmp_path / "idx", tmp_path / "sub", 5, seed=0)
    assert sub.classes == NAMES and sub.num_samples == 15
    labels = [int(r.fields["cls"]) for u, s in zip(sub.shard_urls(), sub.shards) for r in read_shard(u, 0, s.num_samples)]
    assert sorted(labels) == [0] * 5 + [1] * 5 + [2] * 5
