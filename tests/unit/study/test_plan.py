"""tldist.study.plan: the plan and budget of a label-budget study, and bad input (no training)."""

from __future__ import annotations

import pytest

from helpers import STUDY_CONFIG as CONFIG, study_overrides as base


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


@pytest.mark.parametrize("jobs, world_size, slurm, message", [
    (0, "1", False, "--jobs 0 is invalid"),
    (2, "2", False, "not with a launcher (WORLD_SIZE > 1)"),
    (2, "1", True, "not with --slurm"),
])
def test_jobs_are_refused_under_a_launcher_or_with_slurm(study_data, tmp_path, monkeypatch, jobs, world_size,
                                                        slurm, message):
    from tldist.errors import UserError
    from tldist.study import StudyOptions, run_study

    monkeypatch.setenv("WORLD_SIZE", world_size)
    with pytest.raises(UserError) as e:
        run_study(CONFIG, base(study_data), tmp_path / "st", StudyOptions(), jobs=jobs,
                  slurm=object() if slurm else None)
    assert message in str(e.value) and not (tmp_path / "st").exists()  # refused before any work
