"""``accelerate launch --mixed_precision bf16`` trains in bf16 (the saved config says so), and a config that says
otherwise is one line and exit status 2 (issue 27, item 1). Real launches, real training on CPU (bf16 autocast)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from helpers import REPO, _free_port, env, overrides, run, tldist_cmd

CONFIG = "configs/test_tiny.yaml"


def launch(*args: str) -> list[str]:
    """``accelerate launch --quiet <args>`` with no config file: the flags alone decide (one CPU process)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--num_processes", "1", "--num_machines", "1",
            "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *args]


@pytest.mark.slow
def test_accelerate_launch_bf16_trains_in_bf16_and_the_saved_config_says_so(tiny_shards, tmp_path):
    out = tmp_path / "bf16"
    proc = run(launch("--mixed_precision", "bf16", "-m", "tldist.cli", "train", CONFIG,
                      *overrides(tiny_shards, out, "train.max_steps=2", "data.num_workers=0")))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["mixed_precision"] == "bf16"
    ckpt = yaml.safe_load((out / "checkpoints" / "step_00000002" / "config.yaml").read_text())
    assert ckpt["train"]["mixed_precision"] == "bf16"
    assert "mixed_precision=bf16" in proc.stdout and "ACCELERATE_MIXED_PRECISION=bf16" in proc.stdout


@pytest.mark.slow
def test_a_config_that_disagrees_with_the_launcher_is_one_line(tiny_shards, tmp_path):
    args = ["train", CONFIG, *overrides(tiny_shards, tmp_path / "x", "train.mixed_precision=no", "train.max_steps=2")]
    # the rank on its own, with the environment accelerate launch gives it: exit 2, one line
    proc = subprocess.run(tldist_cmd(*args), capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**env(), "ACCELERATE_MIXED_PRECISION": "bf16"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tldist: error: config key 'train.mixed_precision' is 'no'")
    assert "'bf16'" in lines[0]
    assert not (tmp_path / "x" / "config.yaml").exists()  # refused before any work
    # under accelerate launch: the same single line (the launcher exits 1 for any failed rank: accelerate's rule)
    proc = run(launch("--mixed_precision", "bf16", "-m", "tldist.cli", *args), check=False)
    assert proc.returncode != 0
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("tldist: error:")] == lines
