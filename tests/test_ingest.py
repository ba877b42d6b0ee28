"""Planned, parallel, restartable shard writing (issue 18): real files, real processes, real kills."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tldist.data.ingest import STAGE_DIR, merge, write_planned
from tldist.data.shards_cli import add_parser, parse_part
from tldist.data.verify import verify_shards
from tldist.data.writer import Sample, header_problem, samples_from_imagefolder
from tldist.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]


def photo(seed: int, size: int = 48, fmt: str = "JPEG", mode: str = "RGB", **save) -> bytes:
    """A smooth random image (decodes like a photo, unlike noise) in ``fmt``/``mode``."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
    img = Image.fromarray(np.kron(small, np.ones((8, 8, 1), dtype=np.uint8))).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def odd_files() -> dict[str, bytes]:
    """The corrupt and odd inputs of the issue: name -> bytes (good ones must be kept at any check level)."""
    whole = photo(99, 64)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(np.tile(np.linspace(0, 65535, 40), (40, 1)).astype(np.uint16)).save(buf, "PNG")
    return {"truncated.jpg": whole[: len(whole) * 6 // 10], "garbage.jpg": b"\xff\xd8 not really a jpeg",
            "cut.png": photo(98, fmt="PNG")[:-20], "empty.png": b"",
            "gray16.png": buf.getvalue(), "cmyk.jpg": photo(97, mode="CMYK"), "exif6.jpg": photo(96, exif=exif.tobytes())}


BAD = {"truncated.jpg", "garbage.jpg", "cut.png", "empty.png"}


def make_tree(root: Path, per_class: int = 12, odd: bool = True) -> Path:
    for c, name in enumerate(("ant", "bee", "cow")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / name / f"{i:03d}.jpg").write_bytes(photo(100 * c + i))
    if odd:
        for fname, data in odd_files().items():
            (root / "bee" / fname).write_bytes(data)
    return root


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tldist")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def files_of(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_header_check_catches_what_decode_catches_on_the_odd_files():
    for name, data in odd_files().items():
        problem = header_problem(data) if data else "empty"
        assert bool(problem) == (name in BAD), (name, problem)


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
    whole = write_planned(samples, tmp_path / "whole", "train", classes, max_size=4000, max_count=None)
    assert len(whole.shards) > 3 and whole.num_samples == 36
    for rank in range(3):
        assert write_planned(samples, tmp_path / "parts", "train", classes, max_size=4000, max_count=None,
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


def test_kill_9_mid_write_then_resume_is_identical(tmp_path):
    """A real `tldist shards` process (2 workers) is SIGKILLed after its first finished shard; the
    rerun keeps what was finished and the result equals an uninterrupted write, byte for byte."""
    src = make_tree(tmp_path / "src", per_class=60, odd=True)
    args = ["shards", "imagefolder", str(src), "--max-count", "3", "--check", "decode", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "tldist.cli", *args, str(out / "x"), "--workers", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    stage = out / "x" / "train" / STAGE_DIR
    deadline = time.monotonic() + 120
    while not list(stage.glob("*.tar.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-2000:]
    assert not (out / "x" / "train" / "manifest.json").exists()
    finished = len(list(stage.glob("*.tar.json")))
    assert 1 <= finished < 63  # killed mid-write (187 images, 3 per shard: 63 shards)
    done = subprocess.run([sys.executable, "-m", "tldist.cli", *args, str(out / "x"), "--workers", "2"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"kept {finished} of 63 finished shards" in done.stderr  # workers died with the writer: none added more
    run([*args, str(tmp_path / "ref"), "--workers", "1"])
    assert files_of(out / "x" / "train") == files_of(tmp_path / "ref" / "train")


@pytest.mark.slurm
def test_array_write_on_the_dev_cluster_equals_a_local_write(slurm_cluster, tmp_path, capsys):
    """`--submit --array 2`: two SLURM array tasks write half the shards each; the submitter merges."""
    src = make_tree(tmp_path / "src", per_class=6)
    common = ["--max-count", "4", "--val-fraction", "0.2", "--no-progress"]
    assert run(["shards", "imagefolder", str(src), str(tmp_path / "local"), *common]) == 0
    assert run(["shards", "imagefolder", str(src), str(tmp_path / "slurm"), *common, "--submit", "--array", "2",
                "--partition", slurm_cluster.partition, "--time", "5"]) == 0
    out = capsys.readouterr().out
    assert "submitted 2 shard-writing tasks" in out and "train: " in out and "val: " in out
    for split in ("train", "val"):
        assert files_of(tmp_path / "slurm" / split) == files_of(tmp_path / "local" / split), split
    logs = "".join(p.read_text() for p in (tmp_path / "slurm" / "submitit").rglob("*_log.out"))
    assert "this part is written" in logs  # each task wrote a part, not the whole set


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
