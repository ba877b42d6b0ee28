"""The W&B tracker as users of the dashboard expect it, on real offline runs read back with wandb's own reader:
per-class accuracy as one table and histogram beyond 100 classes, a ``max`` summary for eval accuracies with
the step it came from, and checkpoints as ``model`` artifacts (references) under ``tracker.log_model``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import checkpoint_manager
from tldist.config import TrackerConfig
from tldist.train.tracking import WandbTracker, config_classes
from wandb_offline import _wandb_cli, read_segment


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")


def records(run_dir: Path) -> list[dict]:
    """Every record of the one offline segment under ``run_dir/wandb`` (``wandb leet inspect --json``)."""
    [path] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    proc = subprocess.run([*_wandb_cli(), "leet", "inspect", "--json", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def model_artifacts(run_dir: Path) -> list[dict]:
    return [r["artifact"] for r in records(run_dir) if r["type"] == "artifact" and r["artifact"]["type"] == "model"]


def tracker(out: Path, log_model: str = "false") -> WandbTracker:
    return WandbTracker(TrackerConfig(log_model=log_model), run_name="t", output_dir=out, config={}, run_id=None)


def eval_result(classes: int) -> dict:
    acc = [i / classes for i in range(classes)]
    acc[3] = float("nan")  # a class without val samples
    return {"per_class_acc": acc, "per_class_count": [0 if i == 3 else 2 for i in range(classes)],
            "confusion": None, "top_confused": [[1, 2, 5], [4, 0, 3]]}


def test_many_classes_give_one_table_and_one_histogram_per_eval(tmp_path):
    names = [f"n{i:05d}" for i in range(150)]
    t = tracker(tmp_path)
    t.log_eval_details("eval", eval_result(150), names, [], step=1)
    t.finish()
    [row] = read_segment(next(tmp_path.glob("wandb/offline-run-*/run-*.wandb")))["history"]
    assert not any(k.startswith("eval/per_class_acc/") for k in row)  # not one key per class
    assert row["eval/per_class_acc._type"] == "table-file"
    assert row["eval/per_class_acc_hist._type"] == "histogram"
    assert row["eval/top_confused._type"] == "table-file"
    [table] = tmp_path.glob("wandb/offline-run-*/files/media/table/eval/per_class_acc_*.table.json")
    data = json.loads(table.read_text())
    assert data["columns"] == ["class", "accuracy", "samples"]
    assert len(data["data"]) == 149 and data["data"][0] == ["n00000", 0.0, 2]  # lowest first, the NaN class left out
    [pairs] = tmp_path.glob("wandb/offline-run-*/files/media/table/eval/top_confused_*.table.json")
    assert json.loads(pairs.read_text())["data"] == [["n00001", "n00002", 5], ["n00004", "n00000", 3]]
    assert config_classes(names) is None and config_classes(names[:100]) == names[:100]


def test_few_classes_keep_one_key_per_class(tmp_path):
    t = tracker(tmp_path)
    t.log_eval_details("eval", eval_result(6), [f"c{i}" for i in range(6)], [], step=1)
    t.finish()
    [row] = read_segment(next(tmp_path.glob("wandb/offline-run-*/run-*.wandb")))["history"]
    assert row["eval/per_class_acc/c2"] == pytest.approx(2 / 6) and "eval/per_class_acc/c3" not in row
    assert "eval/per_class_acc_hist._type" not in row


def test_summary_holds_best_eval_top1_and_its_step(tmp_path):
    t = tracker(tmp_path)
    for step, top1, loss in ((1, 10.0, 3.0), (2, 30.0, 1.0), (3, 20.0, 2.0)):
        t.log({"eval/top1": top1, "eval/loss": loss, "train/loss": loss}, step=step)
        if top1 == 30.0:
            t.summary({"best_top1": top1, "best_step": step})  # what the loop does at a new best
    t.summary({"eval/top1": 20.0, "best_top1": 30.0, "best_step": 2})  # the end of a run: the final metrics
    t.finish()
    rs = records(tmp_path)
    run = next(r["run"] for r in rs if r["type"] == "run")
    assert run["job_type"] == "train" and run["run_group"] == t.run_id  # its own group: jobs join it
    summary: dict = {}
    for r in rs:
        if r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
    assert summary["eval/top1"] == {"max": 30} and summary["eval/loss"] == {"min": 1}
    assert summary["best_step"] == 2 and summary["train/loss"] == 2
    assert json.loads((tmp_path / "tracker.json").read_text()) == {"run_id": t.run_id, "project": "tldist",
                                                                    "entity": None, "group": t.run_id}


def _checkpoints(root: Path, steps: list[int]) -> list[Path]:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    mgr = checkpoint_manager(root, model, opt, sched, keep_last=5)
    return [mgr.save(s, trainer={"step": s}) for s in steps]


def test_log_model_all_logs_each_complete_checkpoint_by_reference(tmp_path):
    out = tmp_path / "run"
    paths = _checkpoints(out / "checkpoints", [2, 4])
    pending = out / "checkpoints" / "step_00000006"  # an asynchronous save still in flight: logged once complete
    (out / "checkpoints" / ".tmp-step_00000006").mkdir()
    t = tracker(out, "all")
    t.checkpoint_saved(paths[0], step=2, best=True)
    t.checkpoint_saved(paths[1], step=4, best=False)
    t.checkpoint_saved(pending, step=6, best=False)
    (out / "checkpoints" / ".tmp-step_00000006").rmdir()
    paths += _checkpoints(out / "checkpoints", [6])
    t.training_done(best=paths[0], latest=paths[2])
    t.finish()
    arts = model_artifacts(out)
    assert [a["name"] for a in arts] == [f"model-{t.run_id}"] * 3
    assert [set(a["aliases"]) for a in arts] == [{"step-2", "latest", "best"}, {"step-4", "latest"},
                                                 {"step-6", "latest"}]
    for a, p in zip(arts, paths):  # references to the checkpoint's files: nothing copied
        refs = {c["ref"] for c in a["manifest"]["contents"]}
        assert refs == {(p / f).resolve().as_uri() for f in {c["path"] for c in a["manifest"]["contents"]}}
        assert "complete.json" in {c["path"] for c in a["manifest"]["contents"]}
        assert json.loads(a["metadata"])["step"] == int(p.name.split("_")[1])


def test_log_model_true_logs_best_and_last_at_the_end_only(tmp_path):
    out = tmp_path / "run"
    paths = _checkpoints(out / "checkpoints", [2, 4, 6])
    t = tracker(out, "true")
    for step, p in zip((2, 4, 6), paths):
        t.checkpoint_saved(p, step=step, best=step == 4)
    t.training_done(best=paths[1], latest=paths[2])
    t.finish()
    arts = model_artifacts(out)
    # the best first, the last checkpoint last: W&B gives `latest` to the version logged last (wandb also
    # writes `latest` into every offline record; the server keeps it on the newest)
    assert len(arts) == 2  # step 2 (neither best nor last) is not logged
    assert {"best", "step-4"} <= set(arts[0]["aliases"]) and "step-6" not in arts[0]["aliases"]
    assert {"latest", "step-6"} <= set(arts[1]["aliases"]) and "best" not in arts[1]["aliases"]


def test_log_model_false_logs_no_model(tmp_path):
    out = tmp_path / "run"
    paths = _checkpoints(out / "checkpoints", [2])
    t = tracker(out)
    t.checkpoint_saved(paths[0], step=2, best=True)
    t.training_done(best=paths[0], latest=paths[0])
    t.finish()
    assert model_artifacts(out) == []


def test_a_job_whose_model_does_not_resolve_opens_no_run(tmp_path, monkeypatch):
    """`tldist eval --checkpoint <missing>`: the job reports the path in one line; no W&B run (and no wandb/
    directory) is opened first for a command that cannot start."""
    from tldist.train.job_runs import JobRun, WandbJobRun, job_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    with job_run("eval", tmp_path / "no-such-run", TrackerConfig(backend="wandb")) as tracked:
        assert type(tracked) is JobRun and not isinstance(tracked, WandbJobRun)
    assert not (tmp_path / "wandb").exists()
