"""``train.profile=true``: a real training run writes a torch profiler trace of a few steps.

The trace is the Chrome-trace JSON that ``torch.profiler.tensorboard_trace_handler`` writes (open it
in TensorBoard's profiler plugin, Perfetto or chrome://tracing). The test reads it back and checks
that it holds the profiled optimizer steps and real forward/backward operators.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

pytestmark = pytest.mark.slow

BASE = ["model.pretrained=false", "data.image_size=16", "data.batch_size=8", "data.num_workers=1",
        "data.shuffle_buffer=64", "train.log_every_steps=2", "tracker.backend=none", "checkpoint.resume=none"]


def train(shards: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tldist.cli", "train", "configs/test_tiny.yaml", f"data.train=[{shards}/train]",
           f"output_dir={out}", *BASE, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def read_traces(out: Path) -> list[dict]:
    files = sorted((out / "profile").glob("*.pt.trace.json"))
    return [json.loads(f.read_text()) for f in files]


def step_numbers(trace: dict) -> set[int]:
    return {int(e["name"].split("#")[1]) for e in trace["traceEvents"]
            if str(e.get("name", "")).startswith("ProfilerStep#")}


def test_profile_writes_trace_of_active_steps(tiny_shards, tmp_path):
    out = tmp_path / "run"
    train(tiny_shards, out, "train.max_steps=8", "--profile")  # the CLI flag for train.profile=true
    traces = read_traces(out)
    assert len(traces) == 1, sorted(p.name for p in (out / "profile").iterdir())
    assert (out / "profile").glob("rank0*")  # named after the rank that wrote it
    names = {str(e.get("name", "")) for e in traces[0]["traceEvents"]}
    # schedule: skip 1 step, warm up 1, record 3 (steps 2, 3 and 4, counted from 0)
    assert step_numbers(traces[0]) == {2, 3, 4}
    assert any("convolution" in n for n in names), "no forward convolution recorded"
    assert any("backward" in n.lower() for n in names), "no backward operator recorded"
    assert any("Optimizer.step" in n for n in names), "no optimizer step recorded"
    assert json.loads((out / "result.json").read_text())["step"] == 8


def test_run_shorter_than_schedule_still_writes_trace(tiny_shards, tmp_path):
    """Stopping while recording flushes what was recorded: 3 steps record step 2 (the 3rd) and the
    partial step 3 (the final log and checkpoint before ``stop()``)."""
    out = tmp_path / "short"
    train(tiny_shards, out, "train.max_steps=3", "train.profile=true")
    traces = read_traces(out)
    assert len(traces) == 1 and step_numbers(traces[0]) == {2, 3}


def test_no_trace_without_flag(tiny_shards, tmp_path):
    out = tmp_path / "plain"
    train(tiny_shards, out, "train.max_steps=2")
    assert not (out / "profile").exists()
