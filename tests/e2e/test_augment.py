"""Strong augmentation (issue 15) through real ``tldist train`` processes: a bad policy is one line, and a
run resumed from another run's checkpoint ends with bitwise the same weights (loaders in-process:
unit/data/test_augment.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from helpers import REPO


def test_bad_policy_from_the_command_line_is_one_line(shards, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tldist.cli", "train", "configs/test_tiny.yaml",
                           f"data.train=[{shards}/train]", f"output_dir={tmp_path}/run",
                           "data.auto_augment=rand-m9-x1"],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "data.auto_augment" in errors[0] and "Traceback" not in proc.stderr


def test_training_resume_is_bitwise_exact_with_augmentation(shards, tmp_path):
    """One process, 2 workers, RandAugment + jitter in the workers and erasing on the batch: a run resumed from
    step 3's checkpoint of another run ends with bitwise the same weights (kill -9 + resume: tests/e2e/test_train.py)."""
    extra = [f"data.train=[{shards}/train]", "model.pretrained=false", "data.image_size=16", "data.batch_size=8",
             "data.num_workers=2", "data.shuffle_buffer=32", "optim.lr=0.05", "optim.lr_ref_batch=16",
             "tracker.backend=none", "train.max_steps=7", "checkpoint.every_steps=3", "checkpoint.keep_last=5",
             "data.auto_augment=rand-m9-mstd0.5-inc1", "data.color_jitter=0.3", "data.random_erasing=0.5",
             "train.log_every_steps=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    ref, out = tmp_path / "ref", tmp_path / "resumed"
    cmd = lambda d, *more: [sys.executable, "-m", "tldist.cli", "train", "configs/test_tiny.yaml",  # noqa: E731
                            f"output_dir={d}", *extra, *more]
    first = subprocess.run(cmd(ref), capture_output=True, text=True, env=env, cwd=REPO, timeout=180)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "skipping" not in first.stderr  # no augmentation error is mistaken for a bad sample
    second = subprocess.run(cmd(out, f"checkpoint.resume={ref}/checkpoints/step_00000003"), capture_output=True,
                            text=True, env=env, cwd=REPO, timeout=180)
    assert second.returncode == 0 and "resumed from" in second.stderr + second.stdout, second.stderr[-3000:]
    a, b = (json.loads((d / "result.json").read_text()) for d in (ref, out))
    assert a["step"] == b["step"] == 7 and a["param_checksum"] == b["param_checksum"]
    from helpers import checkpoint_weights

    wa = checkpoint_weights(ref / "checkpoints" / "step_00000007")
    wb = checkpoint_weights(out / "checkpoints" / "step_00000007")
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ after resume"
