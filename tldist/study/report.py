"""Aggregating a label-budget study: ``results.csv``, ``summary.md``/``summary.csv``, ``study.png`` and a
W&B summary run (see :mod:`tldist.study`).

Spread: the sample standard deviation over seeds (``ddof=1``; empty with one seed), plus min and max.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from pathlib import Path
from typing import Any, Callable, Optional

from tldist.paths import make_output_dir
from tldist.study.plan import ARMS, StudyPlan, k_label
from tldist.train.job_runs import link_model

RESULT_COLUMNS = ["arm", "labels_per_class", "seed", "top1", "top5", "steps", "global_batch", "train_samples",
                  "lr", "warmup_steps", "run_dir", "tracker_run_id"]
SUMMARY_COLUMNS = ["arm", "labels_per_class", "runs", "top1_mean", "top1_std", "top1_min", "top1_max", "steps"]


def result_rows(plan: StudyPlan, results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per finished cell (``results`` by cell name), in plan order."""
    rows = []
    for c in plan.cells:
        r = results.get(c.name)
        if r is None or r.get("eval/top1") is None:
            continue
        rows.append({"arm": c.arm, "labels_per_class": k_label(c.k), "seed": c.seed, "top1": float(r["eval/top1"]),
                     "top5": float(r["eval/top5"]) if r.get("eval/top5") is not None else None, "steps": c.steps,
                     "global_batch": plan.global_batch,
                     "train_samples": plan.train_samples if c.k is None else c.k * len(plan.classes),
                     "lr": c.lr, "warmup_steps": c.warmup_steps, "run_dir": str(c.run_dir),
                     "tracker_run_id": r.get("tracker_run_id")})
    return rows


def summarize(plan: StudyPlan, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, sample std (``ddof=1``, None for one run), min and max of top-1 per (arm, k) with runs."""
    out = []
    for arm in [a for a in ARMS if a in plan.opts.arms]:
        for k in plan.opts.labels_per_class:
            top1 = [r["top1"] for r in rows if r["arm"] == arm and r["labels_per_class"] == k_label(k)]
            if top1:
                out.append({"arm": arm, "labels_per_class": k_label(k), "runs": len(top1),
                            "top1_mean": statistics.fmean(top1),
                            "top1_std": statistics.stdev(top1) if len(top1) > 1 else None,
                            "top1_min": min(top1), "top1_max": max(top1), "steps": plan.steps[k]})
    return out


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in columns})
    os.replace(tmp, path)


def summary_markdown(plan: StudyPlan, summary: list[dict[str, Any]], pending: list[str],
                     scratch: dict[str, Any]) -> str:
    """The ``summary.md`` text: the budget, the scratch grid's choices and one line per (arm, k)."""
    d = plan.describe()
    lines = [f"# Label-budget study `{plan.name}`", "",
             f"- train set: {plan.base.data.train[0]} ({plan.train_samples} samples, {len(plan.classes)} classes); "
             f"val: {plan.base.data.val} (full set, evaluated once at each run's last step)",
             f"- budget: the same optimizer steps for every arm at a given k: {d['budget_rule']}; global batch "
             f"{plan.global_batch} ({plan.world_size} process{'es' if plan.world_size != 1 else ''} per run)",
             f"- steps per k: {', '.join(f'k={k}: {s}' for k, s in d['steps_per_k'].items())}",
             "- scratch arm: model.pretrained=false, no checkpoint, layer_decay 1, head_lr_mult 1; "
             + (f"LR x warm-up grid {d['scratch_lr_grid']} x {d['scratch_warmup_grid']} (fractions of the steps), "
                f"picked per k on val top-1 with tuning seed {d['scratch_tuning_seed']} (not a reported seed; "
                f"{d['grid_steps']} extra steps in all)" if plan.grid else
                f"LR {d['scratch_lr_grid'][0]:g}, warm-up {d['scratch_warmup_grid'][0]:g} of the steps (a one-point "
                "grid: nothing tuned)")]
    for k, c in scratch.items():
        lines.append(f"  - k={k}: lr {c['lr']:g}, warm-up {c['warmup_steps']} steps (grid top-1 {c['top1']:.2f}%)")
    lines += ["- spread: sample standard deviation over seeds (n-1), and min-max", "",
              "| arm | labels/class | runs | top-1 (%) mean ± std | min-max | steps |",
              "| --- | --- | --- | --- | --- | --- |"]
    for s in summary:
        std = f" ± {s['top1_std']:.2f}" if s["top1_std"] is not None else " (1 run)"
        lines.append(f"| {s['arm']} | {s['labels_per_class']} | {s['runs']} | {s['top1_mean']:.2f}{std} | "
                     f"{s['top1_min']:.2f}-{s['top1_max']:.2f} | {s['steps']} |")
    if pending:
        lines += ["", f"Not finished ({len(pending)}): {', '.join(pending)}"]
    return "\n".join(lines) + "\n"


def plot_study(plan: StudyPlan, summary: list[dict[str, Any]], path: Path) -> Path:
    """``study.png``: mean top-1 vs labels per class (log x; ``all`` at the mean class size), one line per
    arm, error bars = std over seeds (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def x_of(label: str) -> float:
        return plan.train_samples / len(plan.classes) if label == "all" else float(label)

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for arm in [a for a in ARMS if a in plan.opts.arms]:
        pts = sorted((x_of(s["labels_per_class"]), s["top1_mean"], s["top1_std"] or 0.0)
                     for s in summary if s["arm"] == arm)
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                        label=arm)
    ticks = sorted({x_of(k_label(k)) for k in plan.opts.labels_per_class})
    ax.set_xscale("log")
    ax.set_xticks(ticks, [("all" if t == x_of("all") and None in plan.opts.labels_per_class else f"{t:g}")
                          for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("labels per class")
    ax.set_ylabel("val top-1 (%)")
    steps = ", ".join(f"{k}: {s}" for k, s in plan.describe()["steps_per_k"].items())
    ax.set_title(f"{plan.name}: top-1 vs labels per class\nsteps per k ({steps})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def log_summary_run(plan: StudyPlan, rows: list[dict[str, Any]], summary: list[dict[str, Any]],
                    plot: Path) -> Optional[str]:
    """A W&B run in the study's group holding the results table, ``study.png`` and the list of the cells'
    runs (ids and directories) in its config and summary; the same run id on every re-aggregation
    (``<out>/summary_tracker.json``). None when the tracker is off (``tracker.backend=none``, disabled)."""
    cfg = plan.base.tracker
    mode = os.environ.get("WANDB_MODE", cfg.mode)
    if cfg.backend == "none" or mode == "disabled":
        return None
    import uuid

    import wandb

    id_file = plan.out / "summary_tracker.json"
    run_id = json.loads(id_file.read_text())["run_id"] if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(json.dumps({"run_id": run_id}))
    runs = [{"cell": f"{r['arm']}-k{r['labels_per_class']}-seed{r['seed']}", "run_id": r["tracker_run_id"],
             "run_dir": r["run_dir"]} for r in rows]
    run = wandb.init(project=cfg.project, entity=cfg.entity, group=plan.name, job_type="study",
                     name=f"{plan.name}-summary", id=run_id, resume="allow", mode=mode, dir=str(plan.out),
                     config={"study": plan.describe(), "runs": runs},
                     settings=wandb.Settings(quiet=True, console="off"))
    try:
        if plan.base.model.checkpoint:  # the model every finetune/probe cell started from
            run.config["source_model"] = link_model(run, plan.base.model.checkpoint, plan.base.model.checkpoint_weights)
        run.log({"results": wandb.Table(columns=RESULT_COLUMNS, data=[[r[c] for c in RESULT_COLUMNS] for r in rows]),
                 "summary": wandb.Table(columns=SUMMARY_COLUMNS, data=[[s[c] for c in SUMMARY_COLUMNS]
                                                                        for s in summary]),
                 "study": wandb.Image(str(plot))})
        run.summary["runs"] = runs
        for s in summary:
            run.summary[f"top1/{s['arm']}/k{s['labels_per_class']}"] = s["top1_mean"]
    finally:
        run.finish()
    return run_id


def aggregate(plan: StudyPlan, results: dict[str, dict[str, Any]], *, write: bool = True,
              echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Rows of the finished cells; with ``write`` (one process) also every report file and the W&B run."""
    rows = result_rows(plan, results)
    if not write:
        return rows
    summary = summarize(plan, rows)
    done = {f"{r['arm']}-k{r['labels_per_class']}-seed{r['seed']}" for r in rows}
    pending = [c.name for c in plan.cells if c.name not in done]
    choice_file = plan.out / "scratch_choice.json"
    scratch = json.loads(choice_file.read_text()) if choice_file.is_file() else {}
    make_output_dir(plan.out, "--out")
    _write_csv(plan.out / "results.csv", RESULT_COLUMNS, rows)
    _write_csv(plan.out / "summary.csv", SUMMARY_COLUMNS, summary)
    text = summary_markdown(plan, summary, pending, scratch)
    (plan.out / "summary.md").write_text(text)
    if not rows:
        echo(f"[study] no finished runs yet in {plan.out}/runs")
        return rows
    plot = plot_study(plan, summary, plan.out / "study.png")
    run_id = log_summary_run(plan, rows, summary, plot)
    echo(text.rstrip())
    echo(f"[study] {len(rows)} runs -> {plan.out}/results.csv, summary.md, summary.csv, study.png"
         + (f"; W&B summary run {run_id} (group {plan.name})" if run_id else ""))
    return rows
