"""tldist.study run for real: the command line, a tiny study, re-runs, 2 ranks, SLURM arrays."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import REPO, STUDY_CONFIG as CONFIG, study_overrides as base


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO), **extra}


def tldist(*args: str, timeout: float = 240, **extra_env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "tldist.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env=env(**extra_env))
    assert proc.returncode == 0, f"STDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}"
    return proc


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_rejects_a_bad_labels_per_class_value(study_data, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tldist.cli", "study", CONFIG, *base(study_data), "--out",
                           str(tmp_path), "--labels-per-class", "1,five"], capture_output=True, text=True, cwd=REPO,
                          env=env(), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "tldist: error: --labels-per-class '1,five': 'five' is not an integer >= 1 or 'all' (e.g. 1,5,10,all)"]


# ---------------------------------------------------------------------------------- a tiny study, run for real
STUDY_FLAGS = ["--labels-per-class", "1,2", "--arms", "probe,scratch", "--seeds", "0", "--steps", "2",
               "--scratch-lr-grid", "0.05", "--scratch-warmup-grid", "0"]


@pytest.fixture(scope="module")
def tiny_study(study_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_study") / "st"
    proc = tldist("study", CONFIG, *base(study_data, "tracker.backend=wandb"), "--out", str(out), *STUDY_FLAGS,
                  WANDB_MODE="offline")
    return out, proc


def test_tiny_study_writes_results_summary_plot_and_wandb_summary(tiny_study):
    out, proc = tiny_study
    rows = read_csv(out / "results.csv")
    assert [(r["arm"], r["labels_per_class"], r["seed"]) for r in rows] == [
        ("probe", "1", "0"), ("scratch", "1", "0"), ("probe", "2", "0"), ("scratch", "2", "0")]
    for r in rows:
        result = json.loads((Path(r["run_dir"]) / "result.json").read_text())
        assert float(r["top1"]) == result["eval/top1"] and r["tracker_run_id"] == result["tracker_run_id"]
        assert result["step"] == 2 and r["steps"] == "2" and r["lr"] == ("0.05" if r["arm"] == "scratch" else "0.1")
        used = yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())  # what the run really trained with
        assert (used["optim"]["lr"], used["train"]["max_steps"], used["transfer"]["strategy"]) == (
            float(r["lr"]), 2, "linear_probe" if r["arm"] == "probe" else "full")
        assert Path(r["run_dir"]) == out / "runs" / f"{r['arm']}-k{r['labels_per_class']}-seed0"
    subset = json.loads((out / "subsets" / "k2-seed0" / "manifest.json").read_text())
    assert subset["num_samples"] == 8 and subset["meta"]["subset"]["labels_per_class"] == 2
    summary = read_csv(out / "summary.csv")
    assert [(s["arm"], s["labels_per_class"], s["runs"], s["top1_std"]) for s in summary] == [
        ("probe", "1", "1", ""), ("probe", "2", "1", ""), ("scratch", "1", "1", ""), ("scratch", "2", "1", "")]
    assert float(summary[0]["top1_mean"]) == float(rows[0]["top1"])
    text = (out / "summary.md").read_text()
    assert "--steps 2" in text and "steps per k: k=1: 2, k=2: 2" in text and "sample standard deviation" in text
    assert f"| probe | 1 | 1 | {float(rows[0]['top1']):.2f} (1 run) |" in text
    png = (out / "study.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    run_id = json.loads((out / "summary_tracker.json").read_text())["run_id"]
    seg = list(out.glob(f"wandb/offline-run-*-{run_id}"))
    assert len(seg) == 1 and (seg[0] / f"run-{run_id}.wandb").stat().st_size > 0
    assert f"W&B summary run {run_id} (group st)" in proc.stdout


def test_a_rerun_skips_finished_cells_and_runs_only_the_missing_one(tiny_study, study_data):
    import shutil

    out, _ = tiny_study
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")}
    assert len(stamps) == 4
    shutil.rmtree(out / "runs" / "scratch-k2-seed0")
    proc = tldist("study", CONFIG, *base(study_data), "--out", str(out), *STUDY_FLAGS)
    assert proc.stdout.count("finished earlier") == 3 and "[study] scratch-k2-seed0: 2 steps" in proc.stdout
    kept = {p: t for p, t in stamps.items() if "scratch-k2-seed0" not in str(p)}
    assert len(kept) == 3 and all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert (out / "runs" / "scratch-k2-seed0" / "result.json").is_file()
    assert len(read_csv(out / "results.csv")) == 4
    # --aggregate alone trains nothing and writes the same table
    from tldist.study import StudyOptions, run_study

    before = (out / "results.csv").read_text()
    (out / "results.csv").unlink()
    lines: list[str] = []
    rows = run_study(CONFIG, base(study_data), out, StudyOptions(
        labels_per_class=[1, 2], arms=["probe", "scratch"], seeds=[0], steps=2, scratch_lr_grid=[0.05],
        scratch_warmup_grid=[0.0]), aggregate_only=True, echo=lines.append)
    assert len(rows) == 4 and (out / "results.csv").read_text() == before
    assert not any("steps, lr" in line for line in lines)


def test_two_ranks_run_the_cells_one_after_another(study_data, tmp_path):
    """Under accelerate launch (2 CPU processes): two cells in the same ranks (re-entrant trainer), a
    k=1 subset of 4 samples, smaller than the global batch of 16."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "st"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs/accelerate/cpu.yaml"),
           "--num_processes", "2", "--main_process_port", str(port), "-m", "tldist.cli", "study", CONFIG,
           *base(study_data, "data.batch_size=8"), "--out", str(out), "--labels-per-class", "1", "--arms",
           "probe,scratch", "--seeds", "0", "--steps", "3", "--scratch-lr-grid", "0.1", "--scratch-warmup-grid", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env(), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_csv(out / "results.csv")
    assert [r["arm"] for r in rows] == ["probe", "scratch"] and {r["global_batch"] for r in rows} == {"16"}
    for r in rows:
        result = json.loads((Path(r["run_dir"]) / "result.json").read_text())
        assert result["world_size"] == 2 and result["step"] == 3 and result["eval/count"] == 40
    assert proc.stdout.count("[study] probe-k1-seed0: 3 steps") == 1  # printed by rank 0 only


def test_jobs_run_the_cells_side_by_side_in_forked_one_rank_processes(study_data, tmp_path):
    """--jobs 2: two cells at a time, each a forked one-rank process logging to <run dir>/train.log; the
    scratch grid (2 LRs) and the probe cell first, then the scratch cell with the grid's choice."""
    out = tmp_path / "st"
    proc = tldist("study", CONFIG, *base(study_data, "data.batch_size=8"), "--out", str(out), "--labels-per-class",
                  "1", "--arms", "probe,scratch", "--seeds", "0", "--steps", "2", "--scratch-lr-grid", "0.05,0.1",
                  "--scratch-warmup-grid", "0", "--jobs", "2")
    rows = read_csv(out / "results.csv")
    choice = json.loads((out / "scratch_choice.json").read_text())["1"]
    assert [(r["arm"], r["global_batch"]) for r in rows] == [("probe", "8"), ("scratch", "8")]
    assert float(rows[1]["lr"]) == choice["lr"] and len(choice["grid"]) == 2
    for run in out.glob("runs/*"):  # 2 grid runs + 2 cells, each with its own log (none on this stdout)
        result = json.loads((run / "result.json").read_text())
        assert result["world_size"] == 1 and result["step"] == 2
        assert "done: step 2" in (run / "train.log").read_text() and "done: step 2" not in proc.stdout
    lines = proc.stdout.splitlines()
    started = [i for i, line in enumerate(lines) if re.match(r"\[study\] \S+: 2 steps", line)]
    assert len(started) == 4 and "scratch-k1-seed0" in lines[started[-1]]  # after the grid's choice
    assert sum(bool(re.match(r"\[study\] \S+: top-1 ", line)) for line in lines) == 4


# ---------------------------------------------------------------------------------- SLURM job array
@pytest.mark.slurm
def test_study_as_a_slurm_job_array(slurm_cluster, study_data, tmp_path):
    """Phase 1: the scratch grid (2 LRs) and the probe cell as one array; phase 2: the scratch cell with the
    LR chosen on val; then the same aggregation as a local study."""
    out = tmp_path / "st"
    t0 = time.monotonic()
    proc = tldist("study", CONFIG, *base(study_data), "--out", str(out), "--labels-per-class", "2", "--arms",
                  "probe,scratch", "--seeds", "0", "--steps", "2", "--scratch-lr-grid", "0.1,0.2",
                  "--scratch-warmup-grid", "0", "--slurm", "--cpus-per-task", "1", "--time", "10", "--partition",
                  slurm_cluster.partition, timeout=300)
    seconds = time.monotonic() - t0
    arrays = re.findall(r"runs as (?:array|job) (\d+);", proc.stdout)
    assert len(arrays) == 2 and "submitted 3 grid/finetune/probe runs" in proc.stdout, proc.stdout
    assert "submitted 1 scratch runs" in proc.stdout
    rows = read_csv(out / "results.csv")
    assert [(r["arm"], r["labels_per_class"]) for r in rows] == [("probe", "2"), ("scratch", "2")]
    assert float(rows[1]["lr"]) == json.loads((out / "scratch_choice.json").read_text())["2"]["lr"]
    logs = "".join(p.read_text() for p in (out / "submitit").glob("**/*_log.*"))
    ran = dict(re.findall(r"TrainJob\(output_dir='([^']+)', max_requeues=5\): job (\S+) attempt", logs))
    assert len(ran) == 4  # 2 grid runs, the probe cell, the scratch cell: one array task each
    assert ran[rows[0]["run_dir"]] == f"{arrays[0]}_2"  # phase 1: grid runs first, then the probe cell
    assert ran[rows[1]["run_dir"]].split("_")[0] == arrays[1]  # phase 2 (a batch of one is a plain job)
    for r in rows:
        assert json.loads((Path(r["run_dir"]) / "result.json").read_text())["step"] == 2
    for job in ran.values():
        assert slurm_cluster.wait_final_state(job) == "COMPLETED"
    assert (out / "study.png").is_file() and (out / "summary.md").is_file()
    print(f"\n[timing] study as 2 SLURM arrays (3 + 1 tasks): {seconds:.1f}s")


def test_a_rerun_with_another_budget_is_refused(tiny_study, study_data):
    from tldist.errors import UserError
    from tldist.study.runner import run_study

    out, _ = tiny_study
    flags = dict(labels_per_class=[1, 2], arms=["probe", "scratch"], seeds=[0, 1], steps=2, scratch_lr_grid=[0.05],
                 scratch_warmup_grid=[0.0])
    from tldist.study import StudyOptions

    assert run_study(CONFIG, base(study_data), out, StudyOptions(**flags), dry_run=True, echo=lambda s: None) == []
    with pytest.raises(UserError, match=r"holds a study planned with another budget \(steps at k=1, steps at k=2 "
                                        r"differ from .*plan.json\): rerun with the same flags"):
        run_study(CONFIG, base(study_data), out, StudyOptions(**{**flags, "steps": 3}), dry_run=True)
