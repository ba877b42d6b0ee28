"""``tldist study``: the command-line front end of :func:`tldist.study.run_study` (the library is
imported when the command runs: start-up time, see :mod:`tldist.cli.main`)."""

from __future__ import annotations

import argparse
from typing import Any

from tldist.cli.options import add_job_flags, job_resources
from tldist.errors import UserError


def _numbers(text: str, kind: type, flag: str) -> list:
    try:
        return [kind(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} '{text}' is not a comma-separated list of {kind.__name__}s (e.g. 1,2)") from None


def _cmd_study(args: argparse.Namespace) -> int:
    from tldist.study import StudyOptions, run_study  # start-up time
    from tldist.study.plan import parse_labels_per_class
    from tldist.study.runner import StudyStopped

    opts = StudyOptions(labels_per_class=parse_labels_per_class(args.labels_per_class),
                        arms=[a.strip() for a in args.arms.split(",") if a.strip()],
                        seeds=_numbers(args.seeds, int, "--seeds"), steps=args.steps, epochs=args.epochs,
                        min_steps=args.min_steps, warmup_fraction=args.warmup_fraction,
                        scratch_lr_grid=_numbers(args.scratch_lr_grid or "", float, "--scratch-lr-grid"),
                        scratch_warmup_grid=_numbers(args.scratch_warmup_grid, float, "--scratch-warmup-grid"))
    slurm = None
    if args.slurm:
        slurm = job_resources(args)
    try:
        run_study(args.config, args.overrides, args.out, opts, name=args.name, slurm=slurm, folder=args.folder,
                  aggregate_only=args.aggregate, dry_run=args.dry_run, jobs=args.jobs)
    except StudyStopped:
        return 3  # a cell was preempted: the message is printed; rerun to continue (as tldist train)
    return 0


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``study`` on the ``tldist`` subparsers."""
    p = sub.add_parser("study", help="label-budget study: finetune / probe / scratch at k labels per class, "
                                     "several seeds, on your shards (locally or as SLURM arrays)",
                       description="Train every (labels per class, arm, seed) cell on a seeded stratified k-per-class "
                                   "subset of data.train, evaluate on data.val, and write results.csv, summary.md, "
                                   "summary.csv and study.png to --out. Re-running skips finished cells.")
    add_job_flags(p)
    g = p.add_argument_group("study")
    g.add_argument("--out", required=True, help="study directory: subsets/, runs/, results.csv, summary.md, study.png")
    g.add_argument("--name", default=None, help="study name: W&B group and run-name prefix (default: --out's name)")
    g.add_argument("--labels-per-class", default="1,5,10,all", metavar="K,...",
                   help="labels per class of each subset; 'all' = the whole train set (default 1,5,10,all)")
    g.add_argument("--arms", default="finetune,probe,scratch", help="arms among finetune,probe,scratch (default all)")
    g.add_argument("--seeds", default="0,1,2", help="seeds: subset, model init and data order (default 0,1,2)")
    g.add_argument("--steps", type=int, default=0,
                   help="optimizer steps of every cell (default 0: max(--min-steps, --epochs x k x classes / batch))")
    g.add_argument("--epochs", type=float, default=30.0, help="passes over a k-subset when --steps is 0 (default 30)")
    g.add_argument("--min-steps", type=int, default=50, help="fewest steps of a cell when --steps is 0 (default 50)")
    g.add_argument("--warmup-fraction", type=float, default=0.1,
                   help="warm-up of the finetune and probe arms, fraction of the steps (default 0.1)")
    g.add_argument("--scratch-lr-grid", default=None, metavar="LR,...",
                   help="scratch LRs tried per k (optim.lr at optim.lr_ref_batch; default: base lr x 1,2,4)")
    g.add_argument("--scratch-warmup-grid", default="0,0.1", metavar="F,...",
                   help="scratch warm-ups tried per k, fractions of the steps (default 0,0.1)")
    g.add_argument("--slurm", action="store_true",
                   help="run the cells as SLURM job arrays (the resource flags above; --cluster local for "
                        "processes on this machine) and wait; default: one after another in this process's ranks")
    g.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="local mode in one process (no launcher): run N cells at a time, each in a forked one-rank "
                        "process with its log in <run dir>/train.log; on a CPU machine N single-core cells side by "
                        "side beat each cell on N ranks (default 1: one after another)")
    g.add_argument("--aggregate", action="store_true", help="only aggregate the finished cells (no training)")
    p.set_defaults(func=_cmd_study)
    return p
