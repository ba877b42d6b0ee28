"""W&B from a real offline run: what a user opens the dashboard for is really logged.

The run's ``.wandb`` file is read back (tests/wandb_offline.py); nothing is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from wandb_offline import read_offline_run

pytestmark = pytest.mark.slow


def train(tiny_shards, out, *extra):
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "node[01-02]"}
    cmd = [sys.executable, "-m", "tldist.cli", "train", "configs/test_tiny.yaml", f"data.train=[{tiny_shards}/train]",
           f"data.val={tiny_shards}/val", f"output_dir={out}", "tracker.backend=wandb", "data.batch_size=8",
           "train.log_every_steps=2", "train.eval_every_steps=3", "data.num_workers=1", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


def test_offline_run_logs_what_the_dashboard_needs_and_resumes_same_run(tiny_shards, tmp_path):
    out = tmp_path / "run"
    first = train(tiny_shards, out, "train.max_steps=6")
    run = read_offline_run(out)
    assert run["run_ids"] == [first["tracker_run_id"]]
    keys = set().union(*run["history"])
    for key in ("train/loss", "train/lr", "train/images_per_s", "train/images_per_s_per_rank",
                "train/data_wait_frac", "train/grad_norm", "eval/top1", "eval/top5", "eval/loss",
                "eval/per_class_acc/c0", "eval/per_class_acc/c3", "checkpoint/step"):
        assert key in keys, key
    assert any(k.startswith("eval/confusion_matrix") for k in keys)
    assert "eval/predictions/_type" in keys  # the sample-predictions table (with images)
    tables = list((out / "wandb").glob("offline-run-*/files/media/table/eval/predictions_*.table.json"))
    assert tables and json.loads(tables[0].read_text())["columns"][:3] == ["image", "key", "label"]
    cfg = run["config"]
    assert cfg["model"]["name"] == "mobilenet_v3_small" and cfg["data"]["batch_size"] == 8  # resolved config
    assert cfg["derived"]["world_size"] == 1 and cfg["derived"]["global_batch"] == 8
    assert cfg["slurm_job_id"] == "4242" and cfg["slurm_job_nodelist"] == "node[01-02]"
    assert len(cfg["git_commit"] or "") in (0, 40)
    assert cfg["data_sources"][0]["samples"] == 300 and cfg["data_sources"][0]["shards"] == 5
    steps = [h["_step"] for h in run["history"] if "train/loss" in h]
    assert steps == [2, 4, 6]

    # Resuming the same output dir (as a requeued job does) logs into the same run id.
    second = train(tiny_shards, out, "train.max_steps=8")
    assert second["tracker_run_id"] == first["tracker_run_id"]
    resumed = read_offline_run(out)
    assert set(resumed["run_ids"]) == {first["tracker_run_id"]}
    assert max(h["_step"] for h in resumed["history"]) == 8
