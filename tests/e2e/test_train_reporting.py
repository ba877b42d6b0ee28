"""What a training run reports about itself (issue 27, items 2 and 8), from real runs: the effective LR and
the rule that produced it, once; FLOPs per image, the peak MFU is measured against, the mean and the slowest
rank's step time and the MFU on every log line."""

from __future__ import annotations

import re

import pytest

from helpers import REPO, accelerate_cmd, overrides, run, tldist_cmd


@pytest.mark.slow
def test_training_logs_the_effective_lr_once_and_uses_it(tiny_shards, tmp_path):
    """An absolute LR reaches the optimizer unchanged at a global batch of 8 (BASE scales 0.05 from 16)."""
    out = tmp_path / "abs"
    proc = run(tldist_cmd("train", str(REPO / "configs/test_tiny.yaml"),
                          *overrides(tiny_shards, out, "optim.lr_ref_batch=0", "optim.lr=0.02", "train.max_steps=1",
                                     "data.num_workers=0")))
    lines = [ln for ln in proc.stdout.splitlines() if "peak LR" in ln]
    assert len(lines) == 1 and "peak LR 0.02 = optim.lr, unscaled" in lines[0]
    assert "lr_scaled=0.02 " in proc.stdout and "lr_rule=absolute" in proc.stdout


@pytest.mark.slow
def test_training_logs_mfu_and_the_slowest_ranks_step_time(tiny_shards, tmp_path):
    """Two ranks: the log states the FLOPs and the peak (measured on this CPU) once, and every log line has the
    mean and the slowest rank's step time (slowest >= mean) and an MFU."""
    out = tmp_path / "perf"
    proc = run(accelerate_cmd("cpu.yaml", "train", str(REPO / "configs/test_tiny.yaml"),
                              *overrides(tiny_shards, out, "train.max_steps=4", "train.log_every_steps=2",
                                         "data.num_workers=0")))
    assert len(re.findall(r"perf: [\d.]+ GFLOPs per training image .* measured fp32", proc.stdout)) == 1
    steps = re.findall(r"step ([\d.e-]+)s \(slowest rank ([\d.e-]+)s\)  mfu ([\d.]+)%", proc.stdout)
    assert len(steps) == 2
    for mean, slowest, mfu in steps:
        assert float(slowest) >= float(mean) > 0 and float(mfu) > 0
    # a stated peak replaces the measurement, and the log says so
    proc = run(tldist_cmd("train", str(REPO / "configs/test_tiny.yaml"),
                          *overrides(tiny_shards, tmp_path / "stated", "train.max_steps=1", "data.num_workers=0",
                                     "train.peak_tflops=0.5")))
    assert "TFLOP/s per device: train.peak_tflops=0.5 (fp32)" in proc.stdout
