"""The plan of a label-budget study: options, budget rule, cells and their configs (see :mod:`tldist.study`)."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tldist.accelerate_env import apply_launcher_settings
from tldist.artifacts.layout import RESULT
from tldist.config import load_config
from tldist.data.pipeline import check_data_locations
from tldist.data.subset import check_labels_per_class, scan_labels, write_label_subset
from tldist.errors import UserError
from tldist.paths import make_output_dir

log = logging.getLogger("tldist")

ARMS = ("finetune", "probe", "scratch")
SCRATCH_FIXED = {"transfer.layer_decay": 1.0, "transfer.head_lr_mult": 1.0, "transfer.freeze_bn": False}
"""What the scratch arm changes besides the backbone, LR and warm-up: the fine-tuning-only knobs are off."""
DEFAULT_LR_MULTS = (1.0, 2.0, 4.0)
"""Scratch LR grid when none is given: the base ``optim.lr`` times these (from-scratch training usually
wants a higher LR than fine-tuning; the demo's scratch recipe uses 2x)."""


@dataclass
class StudyOptions:
    """What ``tldist study`` varies and how it budgets (the command's flags)."""

    labels_per_class: list[Optional[int]] = field(default_factory=lambda: [1, 5, 10, None])
    """Labels per class of each subset (``--labels-per-class 1,5,10,all``); ``None`` is ``all``."""
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    """Arms (``--arms``): ``finetune``, ``probe``, ``scratch``."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds (``--seeds``): each picks its own subset, and sets ``train.seed`` and ``data.seed``."""
    steps: int = 0
    """Optimizer steps of every cell (``--steps``); 0 uses the ``epochs``/``min_steps`` rule."""
    epochs: float = 30.0
    """Passes over the k-subset that set the steps when ``steps`` is 0 (``--epochs``)."""
    min_steps: int = 50
    """Fewest steps of a cell when ``steps`` is 0 (``--min-steps``)."""
    warmup_fraction: float = 0.1
    """Linear warm-up of the finetune and probe arms, as a fraction of the cell's steps."""
    scratch_lr_grid: list[float] = field(default_factory=list)
    """Scratch LRs (``optim.lr`` at ``optim.lr_ref_batch``) tried per k; empty: base lr x 1, 2, 4."""
    scratch_warmup_grid: list[float] = field(default_factory=lambda: [0.0, 0.1])
    """Scratch warm-ups tried per k, as fractions of the cell's steps."""

    def check(self) -> "StudyOptions":
        """Raise :class:`UserError` naming the flag of a bad value."""
        if not self.labels_per_class or any(k is not None and k < 1 for k in self.labels_per_class):
            raise UserError(f"--labels-per-class {self.labels_per_class}: give integers >= 1 or 'all', e.g. 1,5,all")
        bad = [a for a in self.arms if a not in ARMS]
        if bad or not self.arms:
            raise UserError(f"--arms {','.join(self.arms)}: choose among {','.join(ARMS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise UserError(f"--seeds {self.seeds}: give distinct integers >= 0, e.g. 0,1,2")
        for flag, value, low in (("--steps", self.steps, 0), ("--min-steps", self.min_steps, 1)):
            if value < low:
                raise UserError(f"{flag} {value} is invalid: use a value >= {low}")
        if self.epochs <= 0:
            raise UserError(f"--epochs {self.epochs} is invalid: use a value > 0")
        for flag, values in (("--warmup-fraction", [self.warmup_fraction]),
                             ("--scratch-warmup-grid", self.scratch_warmup_grid)):
            if not values or any(not 0 <= v < 1 for v in values):
                raise UserError(f"{flag} {values}: use fractions of the steps in [0, 1)")
        if any(v <= 0 for v in self.scratch_lr_grid):
            raise UserError(f"--scratch-lr-grid {self.scratch_lr_grid}: LRs must be > 0")
        return self


@dataclass
class Cell:
    """One training run of the study (or of the scratch grid)."""

    arm: str
    k: Optional[int]
    seed: int
    steps: int
    lr: float
    warmup_steps: int
    name: str
    cfg: Any = None
    """The run's :class:`~tldist.config.JobConfig`."""

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    def result(self) -> Optional[dict[str, Any]]:
        """The trainer's ``result.json`` when the cell is finished (all its steps, not stopped by a
        signal), else None."""
        path = self.run_dir / RESULT
        if not path.is_file():
            return None
        result = json.loads(path.read_text())
        return result if not result.get("stopped") and result.get("step") == self.steps else None


def k_label(k: Optional[int]) -> str:
    return "all" if k is None else str(k)


def parse_labels_per_class(text: str) -> list[Optional[int]]:
    """``'1,5,10,all'`` -> ``[1, 5, 10, None]``; one-line :class:`UserError` for anything else."""
    out: list[Optional[int]] = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if part == "all":
            out.append(None)
        elif part.isdigit() and int(part) >= 1:
            out.append(int(part))
        else:
            raise UserError(f"--labels-per-class '{text}': '{part}' is not an integer >= 1 or 'all' (e.g. 1,5,10,all)")
    if len(set(out)) != len(out):
        raise UserError(f"--labels-per-class '{text}' repeats a value")
    return out


def tuning_seed(opts: StudyOptions) -> int:
    """The seed of the scratch grid runs (subset, init, data order): one past the reported seeds, so that
    no reported scratch run is the run its LR and warm-up were selected on."""
    return max(opts.seeds) + 1


def steps_for(opts: StudyOptions, n_k: int, global_batch: int) -> int:
    """Optimizer steps of every arm at one k (see the module docstring)."""
    return opts.steps or max(opts.min_steps, math.ceil(opts.epochs * n_k / global_batch))


@dataclass
class StudyPlan:
    """Everything a study runs, derived from the base config and the options (no training yet)."""

    name: str
    out: Path
    base: Any
    opts: StudyOptions
    world_size: int
    global_batch: int
    classes: list[str]
    class_counts: list[int]
    train_samples: int
    steps: dict[Optional[int], int]
    lr_grid: list[float]
    grid: dict[Optional[int], list[Cell]]
    cells: list[Cell]

    def describe(self) -> dict[str, Any]:
        """The plan as JSON-able data (``<out>/plan.json``, the W&B summary run's config)."""
        return {"name": self.name, "world_size": self.world_size, "global_batch": self.global_batch,
                "classes": len(self.classes), "train_samples": self.train_samples,
                "steps_per_k": {k_label(k): s for k, s in self.steps.items()},
                "budget_rule": (f"--steps {self.opts.steps}" if self.opts.steps else
                                f"max({self.opts.min_steps}, ceil({self.opts.epochs} x k x classes / global batch "
                                f"{self.global_batch}))"),
                "scratch_lr_grid": self.lr_grid, "scratch_warmup_grid": list(self.opts.scratch_warmup_grid),
                "scratch_tuning_seed": tuning_seed(self.opts) if self.grid else None,
                "grid_steps": sum(c.steps for cells in self.grid.values() for c in cells),
                "loaded_in_process": sorted({k_label(c.k) for c in self.cells
                                             if c.cfg.data.num_workers == 0 and self.base.data.num_workers > 0}),
                "cells": [c.name for c in self.cells],
                "grid_cells": [c.name for cells in self.grid.values() for c in cells]}


def _subset_dir(out: Path, k: int, seed: int) -> Path:
    return out / "subsets" / f"k{k}-seed{seed}"


def plan_study(config: str, overrides: list[str], out: str | Path, opts: StudyOptions, *, world_size: int,
               name: Optional[str] = None) -> StudyPlan:
    """Validate everything a study needs and lay out its cells (reads the train labels; writes nothing).

    Raises :class:`UserError` (one line) for a base config without exactly one ``data.train`` set or
    without ``data.val``, finetune/probe arms without a pretrained backbone, or a ``k`` larger than a
    class (naming the class and its count).
    """
    opts.check()
    base = load_config(config, overrides)
    apply_launcher_settings(base)  # train.grad_accum & co. as the cells will run them (the launcher's, if unset)
    base.validate()
    if len(base.data.train) != 1:
        raise UserError(f"tldist study needs exactly one data.train shard set (got {len(base.data.train)}): the "
                        "subsets are drawn from it")
    if not base.data.val:
        raise UserError("tldist study evaluates every run on data.val: set data.val=<val shard set>")
    if ({"finetune", "probe"} & set(opts.arms)) and not base.model.checkpoint and not base.model.pretrained:
        raise UserError(f"the finetune and probe arms start from a pretrained backbone, but {config} has "
                        "model.pretrained=false and no model.checkpoint: set one, or use --arms scratch")
    check_data_locations(base.data)  # a missing shard set: one line naming its key
    out = Path(out).expanduser().resolve()
    manifest, counts, _ = scan_labels(base.data.train[0])
    for k in opts.labels_per_class:
        if k is not None:
            check_labels_per_class(counts, manifest.classes, k)  # refuses k above the smallest class, naming it
    global_batch = base.data.batch_size * world_size * base.train.grad_accum
    plan = StudyPlan(name=name or out.name, out=out, base=base, opts=opts, world_size=world_size,
                     global_batch=global_batch, classes=list(manifest.classes), class_counts=counts,
                     train_samples=sum(counts), steps={}, lr_grid=list(opts.scratch_lr_grid) or
                     [base.optim.lr * m for m in DEFAULT_LR_MULTS], grid={}, cells=[])
    for k in opts.labels_per_class:
        n_k = plan.train_samples if k is None else k * len(plan.classes)
        if n_k < world_size:
            raise UserError(f"labels per class {k_label(k)} gives {n_k} samples, fewer than the {world_size} "
                            "training processes: use a larger k or fewer processes")
        plan.steps[k] = steps_for(opts, n_k, global_batch)
        if "scratch" in opts.arms and len(plan.lr_grid) * len(opts.scratch_warmup_grid) > 1:
            plan.grid[k] = [_cell(plan, "scratch", k, tuning_seed(opts), lr=lr, warmup=wu,
                                  name=f"scratch-grid-k{k_label(k)}-lr{lr:g}-wu{wu:g}")
                            for lr in plan.lr_grid for wu in opts.scratch_warmup_grid]
        for arm in opts.arms:
            for seed in opts.seeds:
                # scratch: the first grid point until the grid (if it has more than one) picks one
                first = {"lr": plan.lr_grid[0], "warmup": opts.scratch_warmup_grid[0]} if arm == "scratch" else {}
                plan.cells.append(_cell(plan, arm, k, seed, **first))
    return plan


def _cell(plan: StudyPlan, arm: str, k: Optional[int], seed: int, *, lr: Optional[float] = None,
          warmup: Optional[float] = None, name: Optional[str] = None) -> Cell:
    """A cell with its full config: the base config plus the study's per-cell settings."""
    import copy

    cfg = copy.deepcopy(plan.base)
    steps = plan.steps[k]
    name = name or f"{arm}-k{k_label(k)}-seed{seed}"
    n_k = plan.train_samples if k is None else k * len(plan.classes)
    cfg.output_dir = str(plan.out / "runs" / name)
    cfg.run_name = f"{plan.name}/{name}"
    cfg.tracker.group = plan.name
    if k is not None:
        cfg.data.train = [str(_subset_dir(plan.out, k, seed))]
    cfg.data.seed, cfg.train.seed = seed, seed
    # A slot (rank x loader worker) holding less than a batch would fill every batch with its few
    # samples; below that size the ranks load in-process (one slot each).
    if n_k < plan.world_size * max(1, cfg.data.num_workers) * cfg.data.batch_size:
        cfg.data.num_workers = 0
    # One declared epoch per cell: no per-epoch eval or checkpoint when the subset is smaller than a batch.
    cfg.data.samples_per_epoch = steps * plan.global_batch
    cfg.train.max_steps = steps
    cfg.train.eval_every_steps = steps  # evaluated once, at the end: no selection on val
    # a few checkpoints for long cells; short ones (<= 100 steps) save only at the end, where a lost
    # cell costs less to redo than its intermediate saves cost every cell
    cfg.checkpoint.every_steps = max(100, math.ceil(steps / 4))
    cfg.checkpoint.keep_last = 1
    cfg.checkpoint.resume = "auto"
    if arm == "scratch":
        cfg.model.pretrained, cfg.model.checkpoint = False, None
        cfg.transfer.strategy = "full"
        for key, value in SCRATCH_FIXED.items():
            setattr(cfg.transfer, key.split(".")[1], value)
    else:
        cfg.transfer.strategy = "full" if arm == "finetune" else "linear_probe"
        warmup = plan.opts.warmup_fraction
    if lr is not None:
        cfg.optim.lr = lr
    cfg.optim.warmup_epochs = 0.0
    cfg.optim.warmup_steps = round((warmup or 0.0) * steps)
    cfg.validate()
    return Cell(arm=arm, k=k, seed=seed, steps=steps, lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps,
                name=name, cfg=cfg)


def choose_scratch(grid: list[Cell], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The grid point with the best final val top-1 (ties: lower lr, then shorter warm-up)."""
    scored = [(-float(results[c.name]["eval/top1"]), c.lr, c.warmup_steps, c) for c in grid]
    _, lr, warmup, best = min(scored, key=lambda t: t[:3])
    return {"lr": lr, "warmup_steps": warmup, "top1": float(results[best.name]["eval/top1"]), "run": best.name,
            "grid": [{"run": c.name, "lr": c.lr, "warmup_steps": c.warmup_steps,
                      "top1": float(results[c.name]["eval/top1"])} for c in grid]}


def apply_scratch_choice(plan: StudyPlan, k: Optional[int], choice: dict[str, Any]) -> None:
    """Give the scratch cells at ``k`` the chosen LR and warm-up."""
    for c in plan.cells:
        if c.arm == "scratch" and c.k == k:
            c.lr = c.cfg.optim.lr = choice["lr"]
            c.warmup_steps = c.cfg.optim.warmup_steps = choice["warmup_steps"]


def write_subsets(plan: StudyPlan) -> None:
    """Write each (k, seed) subset once (reused when present). Call on one process only."""
    for k in plan.opts.labels_per_class:
        if k is not None:
            for seed in [*plan.opts.seeds, *([tuning_seed(plan.opts)] if k in plan.grid else [])]:
                write_label_subset(plan.base.data.train[0], _subset_dir(plan.out, k, seed), k, seed)


def save_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically into ``path``, creating its directory (a study's ``--out``)."""
    make_output_dir(path.parent, "--out")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
