"""``bench/gpu_check.py --device cpu``: the one-shot GPU check's CPU smoke run, so the script cannot rot.

The real script (no mocks) makes its own JPEG shards with tldist's writer, trains ResNet-18 at 32 px
for 3 steps in fp32 and bf16 and under FSDP2 (``accelerate launch``, 1 process, gloo), evaluates/exports/
predicts/quantizes the checkpoint, runs the loop-overhead and loader benchmarks at their quick sizes and
compares nvjpeg-path pixels with ``data.decode=torchvision`` (bit-identical on the CPU). The CUDA-only rows
must say ``skipped (cpu)``. About 1 minute on 2 idle cores, 2-2.5 minutes on 2 loaded ones.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO

CPU_ROWS = ["env", "data", "train-bf16", "eval", "export", "predict", "quantize", "train-fp32", "fsdp2",
            "loop-overhead", "loader", "nvjpeg-pixels"]
CUDA_ROWS = ["train-fp16", "train-bf16-cl", "train-compile", "train-nvjpeg", "loop-nvjpeg"]


@pytest.mark.slow
def test_gpu_check_cpu_smoke_run(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--out", str(out),
                           "--work", str(tmp_path / "work"), "--budget-s", "420"],
                          cwd=REPO, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    table = (out / "gpu_check_cpu.txt").read_text()
    assert "| check" in table and "| status" in table and "| key figures" in table and "| seconds" in table
    doc = json.loads((out / "gpu_check_cpu.json").read_text())
    status = {c["name"]: c["status"] for c in doc["checks"]}
    for row in CPU_ROWS + CUDA_ROWS:
        assert f"| {row} " in table, row
    assert {r: status[r] for r in CPU_ROWS} == {r: "ok" for r in CPU_ROWS}, status
    assert all(status[r] == "skipped (cpu)" for r in CUDA_ROWS), status
    assert doc["final"] is True and (out / "gpu_check_cpu_logs.tar.gz").is_file()
    pixels = next(c for c in doc["checks"] if c["name"] == "nvjpeg-pixels")["details"]
    assert pixels["max_abs"] == 0 and pixels["same_keys"] and pixels["images"] > 0
    train = next(c for c in doc["checks"] if c["name"] == "train-bf16")["details"]
    assert train["result"]["step"] == 3


def test_unknown_check_name_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--only", "nope",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown checks ['nope']" in proc.stderr
