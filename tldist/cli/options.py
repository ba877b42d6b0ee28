"""Flags shared by several ``tldist`` subcommands."""

from __future__ import annotations

import argparse


def add_weights_flag(p: argparse.ArgumentParser, what: str = "MODEL") -> None:
    """``--weights raw|ema``: which weights of a checkpoint or run directory (default: the ones its run
    judged best, as ``tldist export`` picks them)."""
    p.add_argument("--weights", choices=("raw", "ema"), default=None,
                   help=f"for a checkpoint or run {what}: the trained weights or their EMA (train.ema_decay > 0); "
                        "default: the ones checkpoint.best_metric judged (eval_ema/top1 -> ema), as 'tldist export'")


def add_job_flags(p: argparse.ArgumentParser) -> None:
    """CONFIG, overrides and the SLURM resource and job flags of ``submit``, ``sweep`` and ``study --slurm``."""
    p.add_argument("config", help="YAML config, e.g. configs/demo_target.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 data.batch_size=64")
    g = p.add_argument_group("resources")
    g.add_argument("--nodes", type=int, default=1, help="nodes (default 1); the most with --min-nodes")
    g.add_argument("--min-nodes", type=int, default=0,
                   help="the fewest nodes the job may start or be requeued on (sbatch --nodes=MIN-MAX): a job that "
                        "lost a node comes back on the nodes left and resumes there (default: exactly --nodes)")
    g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one training task per GPU")
    g.add_argument("--ntasks-per-node", "--tasks-per-node", dest="tasks_per_node", type=int, default=0, metavar="N",
                   help="training processes per node, sbatch's --ntasks-per-node (default: --gpus-per-node, or 1); "
                        "set it for CPU runs")
    g.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per task (data workers + 1 or more)")
    g.add_argument("--mem", default=None, help="memory per node, SLURM syntax (e.g. 200G)")
    g.add_argument("--partition", "-p", default=None, help="SLURM partition (default: the cluster's default)")
    g.add_argument("--time", "-t", default="4:00:00", help="time limit per attempt, SLURM syntax (default 4:00:00)")
    g.add_argument("--account", "-A", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", "-C", default=None, help="node features, e.g. a100")
    g.add_argument("--exclusive", action="store_true", help="whole nodes only")
    g.add_argument("--gres", default=None, help="generic resources, sbatch's --gres (e.g. gpu:a100:4)")
    g.add_argument("--nodelist", "-w", default=None, help="run on these nodes, sbatch's --nodelist (e.g. node[1-4])")
    g.add_argument("--exclude", "-x", default=None, help="never run on these nodes, sbatch's --exclude")
    g.add_argument("--reservation", default=None, help="run in this reservation, sbatch's --reservation")
    g = p.add_argument_group("job")
    g.add_argument("--dependency", "-d", default=None,
                   help="start after other jobs, sbatch's --dependency (e.g. afterok:1234)")
    g.add_argument("--array-parallelism", type=int, default=None,
                   help="job arrays (sweep, study --slurm): at most this many tasks at once (sbatch --array=...%%N; "
                        "default: submitit's 256)")
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


def job_resources(args: argparse.Namespace):
    """The :class:`~tldist.launch.slurm.Resources` of the job flags (:func:`add_job_flags`)."""
    from tldist.launch.slurm import Resources  # start-up time: see tldist.cli.main

    return Resources(nodes=args.nodes, min_nodes=args.min_nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                     cpus_per_task=args.cpus_per_task, partition=args.partition, time=args.time,
                     account=args.account, qos=args.qos, constraint=args.constraint, mem=args.mem,
                     exclusive=args.exclusive, signal_delay_s=args.signal_delay, max_requeues=args.max_requeues,
                     cluster=args.cluster, name=args.job_name, extra_setup=list(args.setup or []),
                     gres=args.gres, nodelist=args.nodelist, exclude=args.exclude, reservation=args.reservation,
                     dependency=args.dependency, array_parallelism=args.array_parallelism)
