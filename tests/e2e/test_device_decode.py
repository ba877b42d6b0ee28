"""``data.decode=nvjpeg`` (issue 13) through real ``tldist train`` / ``tldist eval`` processes.

Without CUDA the very same code runs with device "cpu", where batches are bit-identical to
``data.decode=torchvision``: two runs end with identical parameters, identical to ``data.decode=torchvision``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO


@pytest.mark.slow
def test_train_cli_with_nvjpeg_is_deterministic_and_equals_torchvision(jpeg_shards, tmp_path):
    """``tldist train ... data.decode=nvjpeg`` on CPU (train + eval): two runs end with identical
    parameters, and identical to data.decode=torchvision (bit-identical batches); ``tldist eval``
    with nvjpeg scores the checkpoint as training's eval did."""
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    common = [f"data.val={jpeg_shards}/val", "model.pretrained=false", "data.image_size=16", "data.batch_size=8",
              "data.num_workers=2", "tracker.backend=none"]

    def run(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "tldist.cli", *args], capture_output=True, text=True,
                              timeout=240, env=env, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    def train(decode: str, name: str) -> dict:
        out = tmp_path / name
        run("train", "configs/test_tiny.yaml", f"data.train=[{jpeg_shards}/train]", f"output_dir={out}", *common,
            "data.shuffle_buffer=32", "train.max_steps=4", "train.eval_every_steps=4", "train.log_every_steps=2",
            f"data.decode={decode}")
        return json.loads((out / "result.json").read_text())

    a, b, tv = train("nvjpeg", "a"), train("nvjpeg", "b"), train("torchvision", "tv")
    assert a["step"] == 4 and a["eval/count"] == 37
    for key in ("param_checksum", "eval/loss", "eval/top1"):
        assert a[key] == b[key] == tv[key], key
    best = json.loads((tmp_path / "a" / "checkpoints" / "best.json").read_text())["dir"]
    out = run("eval", "configs/test_tiny.yaml", *common, "data.decode=nvjpeg", f"output_dir={tmp_path / 'e'}",
              "--checkpoint", str(tmp_path / "a" / "checkpoints" / best))
    assert f"top1 {a['best_top1']:.2f}%" in out
