"""tldist.study: label-budget studies (plan and budget, local runs, re-runs, 2 ranks, SLURM arrays)."""

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

from conftest import REPO, make_shard_set

CONFIG = str(REPO / "configs" / "test_tiny.yaml")


@pytest.fixture(scope="module")
def study_data(tmp_path_factory):
    """4 classes: 120 train samples (30 each) in 3 shards, 40 val; a saved mobilenet_v3_small state dict
    as the "pretrained" backbone of the finetune and probe arms."""
    import torch

    from tldist.config import load_config
    from tldist.models.factory import build_model

    root = tmp_path_factory.mktemp("study_data")
    make_shard_set(root / "train", split="train", n=120, shards=3)
    make_shard_set(root / "val", split="val", n=40, shards=1, seed=1)
    model, _ = build_model(load_config(CONFIG).model, 4, image_size=16)
    torch.save(model.state_dict(), root / "backbone.pt")
    return root


def base(data: Path, *extra: str) -> list[str]:
    return [f"data.train=[{data}/train]", f"data.val={data}/val", f"model.checkpoint={data}/backbone.pt",
            "data.num_workers=0", "data.shuffle_buffer=32", "optim.lr_ref_batch=8", *extra]


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


# ---------------------------------------------------------------------------------- plan (no training)
def test_plan_gives_every_arm_the_same_steps_and_the_documented_recipes(study_data, tmp_path):
    from tldist.study import StudyOptions, plan_study

    opts = StudyOptions(labels_per_class=[1, 10, None], seeds=[3, 4], epochs=4, min_steps=5,
                        scratch_lr_grid=[0.1, 0.3], scratch_warmup_grid=[0.0, 0.2])
    plan = plan_study(CONFIG, base(study_data, "data.batch_size=8", "data.num_workers=2"), tmp_path / "st", opts,
                      world_size=2)
    assert plan.global_batch == 16 and plan.train_samples == 120 and plan.classes == ["c0", "c1", "c2", "c3"]
    # max(min_steps, ceil(epochs * k * classes / global batch)): k=1 -> 5 (floor), k=10 -> 10, all -> 30
    assert plan.steps == {1: 5, 10: 10, None: 30}
    assert len(plan.cells) == 3 * 3 * 2 and len({c.name for c in plan.cells}) == 18
    for k, steps in plan.steps.items():
        cells = [c for c in plan.cells if c.k == k]
        assert {c.cfg.train.max_steps for c in cells} == {steps} and {c.arm for c in cells} == {"finetune", "probe",
                                                                                                   "scratch"}
        assert all(c.cfg.train.eval_every_steps == steps and c.cfg.data.samples_per_epoch == steps * 16 for c in cells)
        assert len(plan.grid[k]) == 4 and all(g.seed == 5 and g.cfg.train.max_steps == steps for g in plan.grid[k])
    by = {c.name: c.cfg for c in plan.cells}
    ft, pr, sc = by["finetune-k10-seed4"], by["probe-k10-seed4"], by["scratch-k10-seed4"]
    assert ft.transfer.strategy == "full" and pr.transfer.strategy == "linear_probe"
    assert ft.model.checkpoint == pr.model.checkpoint == f"{study_data}/backbone.pt"
    assert sc.model.pretrained is False and sc.model.checkpoint is None and sc.transfer.layer_decay == 1.0
    assert ft.data.train == [str(tmp_path / "st" / "subsets" / "k10-seed4")] and ft.data.seed == ft.train.seed == 4
    assert ft.optim.warmup_steps == 1 and ft.optim.warmup_epochs == 0  # 0.1 x 10 steps
    assert by["finetune-kall-seed3"].data.train == [f"{study_data}/train"]
    # a subset smaller than (ranks x workers x batch) loads in-process; the full set keeps its workers
    assert by["finetune-k1-seed3"].data.num_workers == 0 and by["finetune-kall-seed3"].data.num_workers == 2
    assert ft.output_dir == str(tmp_path / "st" / "runs" / "finetune-k10-seed4") and ft.tracker.group == "st"


def test_choose_scratch_takes_the_best_val_top1_and_breaks_ties_low(study_data, tmp_path):
    from tldist.study import StudyOptions, plan_study
    from tldist.study.plan import apply_scratch_choice, choose_scratch

    plan = plan_study(CONFIG, base(study_data), tmp_path / "st", StudyOptions(
        labels_per_class=[2], arms=["scratch"], seeds=[0], steps=10, scratch_lr_grid=[0.1, 0.3],
        scratch_warmup_grid=[0.0, 0.5]), world_size=1)
    grid = plan.grid[2]
    top1 = {(0.1, 0): 40.0, (0.1, 5): 55.0, (0.3, 0): 55.0, (0.3, 5): 20.0}
    results = {c.name: {"eval/top1": top1[(c.lr, c.warmup_steps)]} for c in grid}
    choice = choose_scratch(grid, results)
    assert (choice["lr"], choice["warmup_steps"], choice["top1"]) == (0.1, 5, 55.0)  # tie 55/55: lower lr
    apply_scratch_choice(plan, 2, choice)
    assert [(c.cfg.optim.lr, c.cfg.optim.warmup_steps) for c in plan.cells] == [(0.1, 5)]
    # one grid point: no grid runs, the scratch cells take it (not the base config's LR)
    plan = plan_study(CONFIG, base(study_data), tmp_path / "st", StudyOptions(
        labels_per_class=[2], arms=["probe", "scratch"], seeds=[0], steps=10, scratch_lr_grid=[0.05],
        scratch_warmup_grid=[0.2]), world_size=1)
    assert plan.grid == {} and [(c.arm, c.cfg.optim.lr, c.cfg.optim.warmup_steps) for c in plan.cells] == [
        ("probe", 0.1, 1), ("scratch", 0.05, 2)]


@pytest.mark.parametrize("extra, opts, message", [
    ((), {"labels_per_class": [31]}, "labels per class 31 is more than class 'c0' has (30 samples"),
    (("data.val=null",), {}, "evaluates every run on data.val"),
    (("model.checkpoint=null",), {}, "finetune and probe arms start from a pretrained backbone"),
    ((), {"arms": ["scratch", "nope"]}, "--arms scratch,nope: choose among finetune,probe,scratch"),
    ((), {"scratch_warmup_grid": [1.5]}, "--scratch-warmup-grid [1.5]"),
])
def test_bad_study_input_is_one_line(study_data, tmp_path, extra, opts, message):
    from tldist.errors import UserError
    from tldist.study import StudyOptions, plan_study

    with pytest.raises(UserError) as e:
        plan_study(CONFIG, base(study_data, *extra), tmp_path, StudyOptions(**opts), world_size=1)
    assert message in str(e.value) and "\n" not in str(e.value)


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
