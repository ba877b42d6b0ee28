"""Planned, parallel, restartable shard writing (issue 18, tldist.data.ingest): real files, writers in this
process (and their worker processes); a writer killed for real is in e2e/test_ingest.py."""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from helpers import (
    BAD_ODD_FILES as BAD,
    files_of,
    make_image_tree,
    make_photo_tree as make_tree,
    photo,
    read_tar_samples as read_shard,
    run_shards_cli as run,
)
from tldist.cli.shards import parse_part
from tldist.data.ingest import STAGE_DIR, merge, write_imagefolder, write_planned
from tldist.data.sources import Sample, samples_from_imagefolder
from tldist.data.verify import verify_shards
from tldist.errors import ConfigError, DataError


def test_same_bytes_for_any_number_of_workers_and_bad_files_named_alike(tmp_path, capsys):
    src = make_tree(tmp_path / "src")
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"w{n}"
        assert run(["shards", "imagefolder", str(src), str(out), "--workers", str(n), "--max-count", "5",
                    "--val-fraction", "0.2", "--check", "decode"]) == 0
        outs[n] = out
    captured = capsys.readouterr()
    assert "img/s" in captured.err  # the tqdm bar: images/s and ETA
    summary = [ln for ln in captured.out.splitlines() if ln.startswith("train:")]
    assert len(summary) == 2 and summary[0].replace("w1", "w2") == summary[1]
    for split in ("train", "val"):
        a, b = files_of(outs[1] / split), files_of(outs[2] / split)
        assert a == b, split  # shards, manifest and skipped list: byte for byte
        assert not (outs[1] / split / STAGE_DIR).exists()
    m = json.loads((outs[1] / "train" / "manifest.json").read_text())
    val = json.loads((outs[1] / "val" / "manifest.json").read_text())
    named = {Path(line.split(": ")[0]).name for mm in (m, val) for line in mm["meta"]["skipped_examples"]}
    assert named == BAD and m["meta"]["skipped"] + val["meta"]["skipped"] == len(BAD)
    assert m["num_samples"] + val["num_samples"] == 36 + 3  # 36 photos + 16-bit PNG, CMYK, EXIF
    assert all(n <= 5 for n in (s["num_samples"] for s in m["shards"]))
    assert verify_shards(outs[2] / "train").ok
    # the default, cheaper header check skips the same files here
    assert run(["shards", "imagefolder", str(src), str(tmp_path / "hdr"), "--workers", "2", "--max-count", "5",
                "--val-fraction", "0.2", "--no-progress"]) == 0
    for split in ("train", "val"):
        hm = json.loads((tmp_path / "hdr" / split / "manifest.json").read_text())
        dm = json.loads((outs[1] / split / "manifest.json").read_text())
        assert hm["shards"] == dm["shards"] and hm["meta"]["skipped"] == dm["meta"]["skipped"]
    assert "unreadable skipped: " in capsys.readouterr().out


def test_size_plan_parts_and_merge(tmp_path, monkeypatch):
    src = make_tree(tmp_path / "src", odd=False)
    classes, samples = samples_from_imagefolder(src)
    whole = write_planned(samples, tmp_path / "whole", "train", classes, max_size=4000, max_count=6)
    assert len(whole.shards) > 6 and whole.num_samples == 36  # 6 count shards, each cut into pieces by size
    sizes = [s.num_samples for s in whole.shards]
    assert max(sizes) <= 6 and sum(sizes) == 36
    for rank in range(3):
        assert write_planned(samples, tmp_path / "parts", "train", classes, max_size=4000, max_count=6,
                             rank=rank, world=3, workers=2) is None
        if rank == 1:
            with pytest.raises(DataError, match=r"shards are not written yet"):
                merge(tmp_path / "parts")
    assert run(["shards", "merge", str(tmp_path / "parts")]) == 0
    assert files_of(tmp_path / "parts") == files_of(tmp_path / "whole")
    with pytest.raises(DataError, match="no write plan"):
        merge(tmp_path / "whole")
    assert parse_part("2/4") == (2, 4)
    for k, v in {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "5"}.items():
        monkeypatch.setenv(k, v)
    assert parse_part("auto") == (2, 4)  # array 5-8: task 7 is part 2 of 4
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert parse_part("auto") == (1, 3)  # torchrun / accelerate launch ranks
    with pytest.raises(ConfigError, match="--part"):
        parse_part("4/4")


def test_worker_errors_are_one_line_and_help_states_the_check_trade_off(tmp_path, capsys):
    samples = [Sample(f"s{i}", photo(i), "jpg", 0) for i in range(6)] + [Sample("bad", photo(9), "jpg", 7)]
    with pytest.raises(DataError, match=r"sample 'bad' \(\) has label 7, not in 0\.\.1"):
        write_planned(samples, tmp_path / "o", "train", ["a", "b"], max_count=2, workers=2)
    assert not (tmp_path / "o" / "manifest.json").exists()
    with pytest.raises(DataError, match="duplicate sample key 's1'"):
        write_planned(samples[:3] + samples[1:2], tmp_path / "d", "train", ["a", "b"], workers=2)
    with pytest.raises(SystemExit):
        run(["shards", "imagefolder", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "header (default)" in text and "not corrupt data inside a complete file" in text


def test_resume_keeps_valid_shards_and_redoes_changed_ones(tmp_path, caplog):
    src = make_tree(tmp_path / "src", odd=False)
    classes, samples = samples_from_imagefolder(src)
    ref = write_planned(samples, tmp_path / "ref", "train", classes, max_count=4)
    stage = tmp_path / "out" / STAGE_DIR
    write_planned(samples, tmp_path / "out", "train", classes, max_count=4, rank=0, world=2)  # half the shards
    staged = bytearray((stage / "train-000002.tar").read_bytes())
    staged[700] ^= 1  # same size, one bit changed in the image data: only the checksum sees it
    (stage / "train-000002.tar").write_bytes(bytes(staged))
    write_planned([Sample("x", photo(1), "jpg", 0)], tmp_path / "old", "train", ["a"])
    with caplog.at_level(logging.INFO, logger="tldist.data"):
        m = write_planned(samples, tmp_path / "out", "train", classes, max_count=4, workers=2)
    assert "kept 4 of 9 finished shards, wrote 5" in caplog.text  # shards 0, 4, 6, 8 kept; 2 redone
    assert files_of(tmp_path / "out") == files_of(tmp_path / "ref") and m.shards == ref.shards
    # changed options change every shard's digest: nothing is reused; the earlier set stays until the merge
    write_planned(samples, tmp_path / "old", "train", classes, max_count=4, rank=0, world=2)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tldist.data"):
        write_planned(samples, tmp_path / "old", "train", classes, max_count=4, check="none", rank=0, world=2)
    assert "kept" not in caplog.text
    assert json.loads((tmp_path / "old" / "manifest.json").read_text())["num_samples"] == 1


def test_tar_writer_matches_tarfile_ustar_byte_for_byte():
    import tarfile

    from tldist.data.ingest import _TarOut

    members = [("0000001_a-b.jpg", photo(1)), ("0000001_a-b.cls", b"3"), ("x" * 90 + ".webp", bytes(1024))]
    buf = io.BytesIO()
    out = _TarOut(buf)
    for name, data in members:
        out.add(name, data)
    out.close(buf.tell())
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w|", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uname, info.gname, info.mtime = len(data), 0o444, "bigdata", "bigdata", 0
            tf.addfile(info, io.BytesIO(data))
    assert buf.getvalue() == ref.getvalue()


def test_val_fraction_and_split_layout(tmp_path):
    files = make_image_tree(tmp_path / "src", per_class=6)
    out = write_imagefolder(tmp_path / "src", tmp_path / "out", val_fraction=0.34, seed=1)
    tr, va = out["train"], out["val"]
    assert tr.num_samples + va.num_samples == len(files) and va.num_samples == 6  # 2 of 6 per class
    keys = [set().union(*(read_shard(u) for u in m.shard_urls())) for m in (tr, va)]
    assert not keys[0] & keys[1]
    labels = Counter(int(read_shard(u)[k]["cls"]) for u in va.shard_urls() for k in read_shard(u))
    assert labels == {0: 2, 1: 2, 2: 2}
    # ROOT/train + ROOT/val trees: both written, val uses train's classes
    make_image_tree(tmp_path / "tv" / "train", per_class=3)
    make_image_tree(tmp_path / "tv" / "val", per_class=1, classes=("dog",))
    out = write_imagefolder(tmp_path / "tv", tmp_path / "out2")
    assert out["val"].classes == ["cat", "dog", "eel"] and out["val"].num_samples == 1
    assert int(next(iter(read_shard(out["val"].shard_urls()[0]).values()))["cls"]) == 1
    with pytest.raises(ConfigError, match="drop the val fraction"):
        write_imagefolder(tmp_path / "tv", tmp_path / "out3", val_fraction=0.2)
