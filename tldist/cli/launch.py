"""``tldist submit | sweep | status | cancel``: the SLURM commands of the ``tldist`` CLI.

:mod:`tldist.cli.main` registers them with ``add_parsers(sub)``; ``launch/submit.py`` runs the same
commands on their own (with the same one-line errors, exit 2). Each command imports its library when
it runs (start-up time: see :mod:`tldist.cli.main`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from tldist.cli.dispatch import Parser, dispatch
from tldist.cli.options import add_job_flags, job_resources

def _cmd_submit(args: argparse.Namespace) -> int:
    from tldist.launch.slurm import submit_training  # start-up time

    submit_training(args.config, args.overrides, job_resources(args), folder=args.folder, dry_run=args.dry_run)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from tldist.launch.slurm import submit_sweep  # start-up time

    submit_sweep(args.config, args.overrides, job_resources(args), folder=args.folder, dry_run=args.dry_run)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from tldist.launch.slurm import show_status  # start-up time

    show_status(args.folder)
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    from tldist.launch.slurm import cancel_jobs  # start-up time

    cancel_jobs(args.job_ids, all_jobs=args.all)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``submit``, ``sweep``, ``status`` and ``cancel`` on the ``tldist`` subparsers."""
    p = sub.add_parser("submit", help="submit a training job to SLURM (submitit; requeues on preemption/timeout)")
    add_job_flags(p)
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("sweep", help="submit the cartesian product of key=v1,v2 overrides as one job array")
    add_job_flags(p)
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("status", help="your queued/running tldist jobs (squeue); with --folder, their history")
    p.add_argument("--folder", default=None, help="a submitit folder (<output_dir>/submitit): show sacct for its jobs")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("cancel", help="cancel tldist jobs (scancel)")
    p.add_argument("job_ids", nargs="*", help="job ids (1234 or array task 1234_0)")
    p.add_argument("--all", action="store_true", help="every queued/running tldist-* job of yours")
    p.set_defaults(func=_cmd_cancel)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Stand-alone entry point with the ``tldist`` CLI's error convention (one line, exit 2)."""
    parser = Parser(prog="tldist", description="SLURM commands of tldist")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return dispatch(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
