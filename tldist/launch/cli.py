"""``tldist submit | sweep | status | cancel``: the SLURM commands of the ``tldist`` CLI.

``tldist.cli`` registers them with ``add_parsers(sub)``; ``python -m tldist.launch ...`` and
``launch/submit.py`` run the same commands on their own (with the same one-line errors, exit 2).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence



def _resources(args: argparse.Namespace):
    from tldist.launch.slurm import Resources

    return Resources(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                     cpus_per_task=args.cpus_per_task, partition=args.partition, time=args.time,
                     account=args.account, qos=args.qos, constraint=args.constraint, mem=args.mem,
                     exclusive=args.exclusive, signal_delay_s=args.signal_delay, max_requeues=args.max_requeues,
                     cluster=args.cluster, name=args.job_name, extra_setup=list(args.setup or []))


def _cmd_submit(args: argparse.Namespace) -> int:
    from tldist.launch.slurm import submit_training

    submit_training(args.config, args.overrides, _resources(args), folder=args.folder, dry_run=args.dry_run)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from tldist.launch.slurm import submit_sweep

    submit_sweep(args.config, args.overrides, _resources(args), folder=args.folder, dry_run=args.dry_run)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from tldist.launch.slurm import show_status

    show_status(args.folder)
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    from tldist.launch.slurm import cancel_jobs

    cancel_jobs(args.job_ids, all_jobs=args.all)
    return 0


def _add_job_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config, e.g. configs/demo_target.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 data.batch_size=64")
    g = p.add_argument_group("resources")
    g.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one training task per GPU")
    g.add_argument("--tasks-per-node", type=int, default=0,
                   help="training processes per node (default: --gpus-per-node, or 1); set it for CPU runs")
    g.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per task (data workers + 1 or more)")
    g.add_argument("--mem", default=None, help="memory per node, SLURM syntax (e.g. 200G)")
    g.add_argument("--partition", "-p", default=None, help="SLURM partition (default: the cluster's default)")
    g.add_argument("--time", "-t", default="4:00:00", help="time limit per attempt, SLURM syntax (default 4:00:00)")
    g.add_argument("--account", "-A", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", "-C", default=None, help="node features, e.g. a100")
    g.add_argument("--exclusive", action="store_true", help="whole nodes only")
    g = p.add_argument_group("job")
    g.add_argument("--max-requeues", type=int, default=5,
                   help="requeue after a time-limit/preemption signal at most this many times (default 5)")
    g.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the time limit at which SIGUSR2 asks for checkpoint + requeue (default 120)")
    g.add_argument("--cluster", choices=("slurm", "local", "debug"), default="slurm",
                   help="slurm (default); local = subprocesses on this machine; debug = in this process")
    g.add_argument("--folder", default=None,
                   help="submitit folder for logs and pickles (default <output_dir>/submitit; one subdir per job)")
    g.add_argument("--job-name", default=None, help="SLURM job name (default tldist-<run name>)")
    g.add_argument("--setup", action="append", metavar="LINE",
                   help="shell line run before srun in the batch script (repeatable), e.g. 'module load cuda'")
    g.add_argument("--dry-run", action="store_true", help="validate and print the sbatch script; submit nothing")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``submit``, ``sweep``, ``status`` and ``cancel`` on the ``tldist`` subparsers."""
    p = sub.add_parser("submit", help="submit a training job to SLURM (submitit; requeues on preemption/timeout)")
    _add_job_flags(p)
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("sweep", help="submit the cartesian product of key=v1,v2 overrides as one job array")
    _add_job_flags(p)
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
    parser = argparse.ArgumentParser(prog="tldist", description="SLURM commands of tldist")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    from tldist.cli import dispatch

    return dispatch(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
