"""W&B across a model's life, on real offline runs read back with wandb's own reader: a training run
(``job_type=train``, its own group, the best ``eval/top1`` and its step in the summary, ``tracker.log_model=true``
checkpoints and every shard manifest as reference artifacts), then ``tldist eval`` and ``tldist export`` runs
in the training run's group, linked to the model artifact they used."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, relabelled_copy
from wandb_offline import _wandb_cli

pytestmark = pytest.mark.slow

COMMON = ["configs/test_tiny.yaml", "tracker.backend=wandb", "data.batch_size=8", "data.num_workers=1"]


def tldist(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "tldist.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def segments(wandb_dir: Path) -> list[dict]:
    """Each offline run under ``wandb_dir``: its run record, summary, history rows and artifacts."""
    out = []
    for path in sorted(wandb_dir.glob("offline-run-*/run-*.wandb")):
        proc = subprocess.run([*_wandb_cli(), "leet", "inspect", "--json", str(path)], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        seg: dict = {"run": {}, "summary": {}, "history": [], "artifacts": []}
        for line in proc.stdout.splitlines():
            rec = json.loads(line)
            kind = rec["type"]
            if kind == "run":
                seg["run"] = rec["run"]
            elif kind == "summary":
                seg["summary"].update(rec["summary"].get("update", {}))
            elif kind == "history":
                seg["history"].append(rec["history"].get("item", {}))
            elif kind == "artifact" and rec["artifact"]["type"] in ("model", "dataset"):
                seg["artifacts"].append(rec["artifact"])
        out.append(seg)
    return out


def md5_b64(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def test_train_then_eval_and_export_runs_join_its_group_and_link_its_model(tiny_shards, tmp_path):
    sub = tmp_path / "sub" / "val"  # an ImageNet-R-like extra set: 2 of the 4 classes, scored restricted
    relabelled_copy(tiny_shards / "val", sub, ["c3", "c1"], keep={"c1", "c3"}, shards=1)
    out = tmp_path / "run"
    tldist("train", *COMMON, f"data.train=[{tiny_shards}/train]", f"data.val={tiny_shards}/val",
           f"data.val_sets=[{{path: {sub}, restrict_classes: true}}]", f"output_dir={out}", "train.max_steps=6",
           "train.eval_every_steps=2", "train.log_every_steps=2", "tracker.log_model=true")
    result = json.loads((out / "result.json").read_text())
    [train] = segments(out / "wandb")
    run_id = result["tracker_run_id"]
    assert train["run"]["job_type"] == "train" and train["run"]["run_group"] == run_id
    evals = [h for h in train["history"] if "eval/top1" in h]
    assert len(evals) == 3 and all("eval/balanced_acc" in h and "eval/sub/val/top1" in h for h in evals)
    best = max(h["eval/top1"] for h in evals)
    assert train["summary"]["eval/top1"] == {"max": best}
    assert train["summary"]["best_step"] == result["best_step"]
    assert next(h["_step"] for h in evals if h["eval/top1"] == best) == result["best_step"]
    # log_model=true: best and last checkpoint, references to their files
    models = [a for a in train["artifacts"] if a["type"] == "model"]
    assert {a["name"] for a in models} == {f"model-{run_id}"}
    by_step = {json.loads(a["metadata"])["step"]: a for a in models}
    assert 6 in by_step and "latest" in models[-1]["aliases"] and by_step[6] is models[-1]
    assert "best" in by_step[result["best_step"]]["aliases"]
    refs = {c["ref"] for c in by_step[6]["manifest"]["contents"]}
    assert (out / "checkpoints" / "step_00000006" / "complete.json").resolve().as_uri() in refs
    # every manifest read is a dataset artifact: a reference whose digest is the manifest's MD5
    datasets = {a["name"]: a for a in train["artifacts"] if a["type"] == "dataset"}
    for location in (tiny_shards / "train", tiny_shards / "val", sub):
        name = f"{location.parent.name}-{location.name}"
        [entry] = datasets[name]["manifest"]["contents"]
        assert entry["ref"] == (location / "manifest.json").resolve().as_uri()
        assert entry["digest"] == md5_b64(location / "manifest.json")
    assert json.loads((out / "tracker.json").read_text())["group"] == run_id

    # tldist eval: its own run, in the training run's group, using the checkpoint it scored
    proc = tldist("eval", *COMMON, f"data.val={tiny_shards}/val", "--checkpoint", str(out))
    assert "balanced" in proc.stdout
    tldist("export", str(out), str(tmp_path / "export"))
    jobs = {s["run"]["job_type"]: s for s in segments(out / "jobs" / "wandb")}
    assert set(jobs) == {"eval", "export"}
    for job in jobs.values():
        assert job["run"]["run_group"] == run_id and job["run"]["run_id"] != run_id
        used = [a for a in job["artifacts"] if a["name"] == f"model-{run_id}"]
        assert len(used) == 1 and used[0]["digest"] == by_step[result["best_step"]]["digest"]  # the same version
    assert jobs["eval"]["summary"]["eval/top1"] == pytest.approx(best, abs=0.01)
    assert jobs["eval"]["summary"]["eval/count"] == 101
    [made] = [a for a in jobs["export"]["artifacts"] if a["name"] == f"export-{run_id}"]
    assert (tmp_path / "export" / "model.json").resolve().as_uri() in {c["ref"] for c in made["manifest"]["contents"]}
    record = json.loads((tmp_path / "export" / "model.json").read_text())
    assert record["tracker"]["run_id"] == run_id  # an export carries the link to the run that trained it
