"""Restartable shard writing (issue 18) with real processes: a ``tldist shards`` process killed mid-write
and resumed, and an array write on the dev SLURM cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tldist.data.ingest import STAGE_DIR

from helpers import REPO, files_of, make_photo_tree as make_tree, run_shards_cli as run


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
