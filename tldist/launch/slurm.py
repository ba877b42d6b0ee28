"""Submit training jobs and sweeps to SLURM through submitit, and look after them.

- :func:`submit_training`: load + validate the config (nothing is submitted when it is wrong),
  build a submitit ``AutoExecutor`` (``<output_dir>/submitit/%j`` unless ``--folder``), one task per
  GPU, ``--signal=USR2@<delay>``, ``--requeue``, and submit a :class:`~tldist.launch.job.TrainJob`.
- :func:`submit_sweep`: the cartesian product of ``key=v1,v2`` overrides as one job array, each
  run in ``<output_dir>/sweep/<k=v,...>`` and all in one W&B group.
- :func:`show_status` / :func:`cancel_jobs`: thin wrappers over squeue/sacct/scancel.

The command-line front end is :mod:`tldist.launch.cli`.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from tldist.config import load_config, val_set_entries
from tldist.data.manifest import load_manifest
from tldist.data.pipeline import check_data_config, check_data_locations
from tldist.errors import ConfigError, UserError
from tldist.launch.job import TrainJob
from tldist.paths import check_output_dir

JOB_NAME_PREFIX = "tldist"
"""Every job submitted by tldist is named ``tldist-...``; ``tldist status``/``cancel --all`` use it."""
CLUSTERS = ("slurm", "local", "debug")
SRUN_ARGS = ("--kill-on-bad-exit=1",)
"""Extra ``srun`` flags of every job: when one task dies (crash, OOM kill, lost node), SLURM ends the
others at once instead of leaving them blocked in a collective until the timeout."""
_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


@dataclass
class Resources:
    """What to ask SLURM for (the ``tldist submit`` flags)."""

    nodes: int = 1
    """Nodes to ask for (the most, with ``min_nodes``)."""
    min_nodes: int = 0
    """The fewest nodes the job may run on (sbatch's ``--nodes=min-max``); 0: exactly ``nodes``. A job requeued
    after losing a node then comes back on the nodes left and resumes on them (checkpoints are resharded)."""
    gpus_per_node: int = 0
    tasks_per_node: int = 0
    """Tasks (training processes) per node; 0 means one per GPU (or 1 without GPUs)."""
    cpus_per_task: Optional[int] = None
    partition: Optional[str] = None
    time: str = "4:00:00"
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    mem: Optional[str] = None
    exclusive: bool = False
    signal_delay_s: int = 120
    """SIGUSR2 this many seconds before the time limit (checkpoint + requeue)."""
    max_requeues: int = 5
    cluster: str = "slurm"
    name: Optional[str] = None
    extra_setup: list[str] = field(default_factory=list)
    """Shell lines run in the batch script before ``srun`` (module loads, exports)."""
    gres: Optional[str] = None
    """sbatch ``--gres`` (generic resources, e.g. ``gpu:a100:4``)."""
    nodelist: Optional[str] = None
    """sbatch ``--nodelist``: run on these nodes."""
    exclude: Optional[str] = None
    """sbatch ``--exclude``: never run on these nodes."""
    reservation: Optional[str] = None
    """sbatch ``--reservation``."""
    dependency: Optional[str] = None
    """sbatch ``--dependency`` (e.g. ``afterok:1234``)."""
    array_parallelism: Optional[int] = None
    """Job arrays (sweeps, studies): at most this many tasks at once (sbatch ``--array=0-N%P``); None:
    submitit's default (256)."""

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    def check(self) -> "Resources":
        """Reject impossible requests; the message names the flag."""
        _at_least("--nodes", self.nodes, 1)
        if self.min_nodes and not 1 <= self.min_nodes <= self.nodes:
            raise UserError(f"--min-nodes {self.min_nodes} is invalid: use a value from 1 to --nodes ({self.nodes})")
        _at_least("--gpus-per-node", self.gpus_per_node, 0)
        _at_least("--ntasks-per-node", self.tasks_per_node, 0)
        if self.array_parallelism is not None:
            _at_least("--array-parallelism", self.array_parallelism, 1)
        if self.cpus_per_task is not None:
            _at_least("--cpus-per-task", self.cpus_per_task, 1)
        _at_least("--max-requeues", self.max_requeues, 0)
        _at_least("--signal-delay", self.signal_delay_s, 0)
        if self.cluster not in CLUSTERS:
            raise UserError(f"--cluster {self.cluster!r} is not one of {', '.join(CLUSTERS)}")
        if self.cluster != "slurm" and self.nodes > 1:
            raise UserError(f"--nodes {self.nodes} needs --cluster slurm ('{self.cluster}' runs on this machine only)")
        if self.signal_delay_s >= parse_time(self.time) * 60:
            raise UserError(f"--signal-delay {self.signal_delay_s}s is not shorter than --time {self.time}; "
                            "use a smaller delay or a longer time")
        return self


def _at_least(flag: str, value: int, low: int) -> None:
    if value < low:
        raise UserError(f"{flag} {value} is invalid: use a value >= {low}")


def parse_time(text: str) -> int:
    """SLURM time (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM[:SS]``) -> whole minutes (>= 1)."""
    m = _TIME_RE.match(str(text).strip())
    if not m:
        raise UserError(f"--time {text!r} is not a SLURM time: use e.g. 4:00:00, 90 (minutes) or 1-12:00:00")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # MM:SS
        seconds = int(a) * 60 + int(b)
    else:  # MM
        seconds = int(a) * 60
    if seconds < 60:
        raise UserError(f"--time {text!r} is shorter than one minute")
    return -(-seconds // 60)


# ---------------------------------------------------------------------------------------- executor
def job_folder(root: str | Path, cluster: str) -> Path:
    """Where submitit writes a job's logs and pickles: ``<root>/%j`` (one folder per job id), except
    for ``--cluster local``, whose controller would also create a literal, empty ``<root>/%j``
    folder; there the files go to ``<root>`` itself, named ``<job id>_...`` as usual."""
    return Path(root) if cluster == "local" else Path(root) / "%j"


def executor_parameters(res: Resources, job_name: str) -> dict[str, Any]:
    """``AutoExecutor.update_parameters`` arguments (generic keys + ``slurm_`` specific ones)."""
    params: dict[str, Any] = {"timeout_min": parse_time(res.time), "nodes": res.nodes,
                              "tasks_per_node": res.ntasks_per_node, "name": job_name}
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if res.cpus_per_task:
        params["cpus_per_task"] = res.cpus_per_task
    package_root = Path(__file__).resolve().parents[2]  # the job unpickles tldist.launch.job.TrainJob
    setup = [f'export PYTHONPATH={shlex.quote(str(package_root))}"${{PYTHONPATH:+:$PYTHONPATH}}"', *res.extra_setup]
    extra: dict[str, Any] = {"requeue": True}  # requeueable even where JobRequeue=0
    srun_args = list(SRUN_ARGS)
    if res.min_nodes and res.min_nodes < res.nodes:
        extra["nodes"] = f"{res.min_nodes}-{res.nodes}"  # sbatch --nodes=min-max (submitit counts tasks for max)
        # sbatch turns --ntasks-per-node into --ntasks=min*per-node, which caps the job at min nodes even when
        # more are free: reserve each node's CPUs with --mincpus instead, and start the tasks per node with srun
        del params["tasks_per_node"]
        extra["mincpus"] = res.ntasks_per_node * (res.cpus_per_task or 1)
        srun_args.append(f"--ntasks-per-node={res.ntasks_per_node}")
    if res.reservation:  # no submitit parameter of its own
        extra["reservation"] = res.reservation
    params.update(slurm_signal_delay_s=res.signal_delay_s, slurm_setup=setup, slurm_additional_parameters=extra,
                  slurm_srun_args=srun_args)
    for key in ("partition", "account", "qos", "constraint", "mem", "gres", "nodelist", "exclude", "dependency",
                "array_parallelism"):
        if getattr(res, key):  # submitit's slurm_<key> = sbatch --<key>
            params[f"slurm_{key}"] = getattr(res, key)
    if res.exclusive:
        params["slurm_exclusive"] = True
    return params


def sbatch_preview(params: dict[str, Any], folder: str | Path, array: int = 0) -> str:
    """The batch script submitit would write for ``params`` (works without SLURM installed)."""
    from submitit.slurm import slurm as submitit_slurm

    renames = {"timeout_min": "time", "tasks_per_node": "ntasks_per_node", "name": "job_name"}
    native = {renames.get(k, k): v for k, v in params.items() if not k.startswith("slurm_")}
    native.update({k[len("slurm_"):]: v for k, v in params.items() if k.startswith("slurm_")})
    if array:
        native["map_count"] = array
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return submitit_slurm._make_sbatch_string(command=command, folder=folder, **native)


def make_executor(folder: str | Path, res: Resources, job_name: str):
    """A submitit ``AutoExecutor`` for ``res`` writing logs and pickles under ``folder``."""
    import submitit

    try:
        # submitit's own timeout budget (its USR2 handler, active until the job installs ours) = ours
        ex = submitit.AutoExecutor(folder=folder, cluster=res.cluster, slurm_max_num_timeout=res.max_requeues)
    except RuntimeError as e:  # no srun on this machine
        raise UserError(f"--cluster {res.cluster}: {e}; on a machine without SLURM use --cluster local or --dry-run") \
            from None
    ex.update_parameters(**executor_parameters(res, job_name))
    return ex


# ---------------------------------------------------------------------------------------- config
def load_checked_config(config: str, overrides: list[str]):
    """Load + validate a config (the job's and the data's rules) and check its shard manifests exist;
    raises UserError naming the problem before anything is submitted."""
    cfg = load_config(config, overrides).validate()
    check_data_config(cfg.data)
    check_data_locations(cfg.data)  # the key of a missing one, then each manifest must read
    locations = [*cfg.data.train, *([cfg.data.val] if cfg.data.val else []),
                 *(v.path for v in val_set_entries(cfg.data.val_sets))]
    for location in locations:
        if not str(location).startswith(("http://", "https://")):  # no network from the login node
            load_manifest(location)
    cfg.output_dir = str(check_output_dir(cfg.output_dir, "output_dir").resolve())  # not a file nor under one
    return cfg


@contextlib.contextmanager
def _submission_errors(res: Resources) -> Iterator[None]:
    """sbatch refusing the job (bad partition/account, controller down) -> one-line UserError."""
    from submitit.core.utils import FailedJobError

    try:
        yield
    except FailedJobError as e:
        reason = " ".join(str(e).split())
        raise UserError(f"sbatch refused the job: {reason} (check --partition {res.partition}, --account "
                        f"{res.account}, --qos {res.qos} and that SLURM answers: sinfo)") from None


def _job_name(res: Resources, cfg: Any) -> str:
    return res.name or f"{JOB_NAME_PREFIX}-{cfg.run_name or Path(cfg.output_dir).name}"


def _log_lines(job: Any) -> list[str]:
    out, err = job.paths.stdout, job.paths.stderr
    return [f"  stdout (task 0): {out}", f"  stderr (task 0): {err}", f"  follow: tail -F {out} {err}"]


# ---------------------------------------------------------------------------------------- submit
def submit_training(config: str, overrides: list[str], res: Resources, *, folder: Optional[str] = None,
                    dry_run: bool = False, echo: Callable[[str], None] = print):
    """Submit one training job; returns the submitit job (None with ``dry_run``)."""
    res.check()
    cfg = load_checked_config(config, overrides)
    root = check_output_dir(folder, "--folder").resolve() if folder else Path(cfg.output_dir) / "submitit"
    name = _job_name(res, cfg)
    params = executor_parameters(res, name)
    if dry_run:
        echo(f"# dry run: nothing submitted. output_dir={cfg.output_dir}, "
             f"{res.nodes * res.ntasks_per_node} task(s), max {res.max_requeues} requeues")
        echo(sbatch_preview(params, root / "%j"))
        return None
    executor = make_executor(job_folder(root, res.cluster), res, name)
    with _submission_errors(res):
        job = executor.submit(TrainJob(cfg.to_dict(), max_requeues=res.max_requeues))
    nodes = f"{res.min_nodes}-{res.nodes}" if res.min_nodes and res.min_nodes < res.nodes else str(res.nodes)
    echo(f"submitted job {job.job_id} ({name}: {nodes} node(s) x {res.ntasks_per_node} task(s), "
         f"cluster {res.cluster}, max {res.max_requeues} requeues)")
    echo(f"  output_dir: {cfg.output_dir}")
    for line in _log_lines(job):
        echo(line)
    echo(f"  status: tldist status --folder {root}    cancel: tldist cancel {job.job_id}")
    return job


def split_values(text: str) -> list[str]:
    """Split ``a,b,[c,d]`` on top-level commas only (brackets, braces and quotes nest)."""
    parts, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    parts.append(cur)
    return parts


def expand_sweep(overrides: list[str]) -> tuple[list[str], list[list[tuple[str, str]]]]:
    """Fixed overrides and the cartesian product of every ``key=v1,v2,...`` axis."""
    fixed, axes = [], []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (for a sweep: key=v1,v2)")
        key, value = item.split("=", 1)
        values = split_values(value)
        if len(values) == 1:
            fixed.append(item)
            continue
        if key in ("output_dir", "tracker.group") or any(not v for v in values):
            raise ConfigError(f"sweep axis '{item}' is not allowed: give non-empty values, and do not sweep "
                              "output_dir or tracker.group (each run gets <output_dir>/sweep/<k=v,...>)")
        axes.append([(key, v) for v in values])
    if not axes:
        raise ConfigError("no sweep axis given: write at least one override as key=v1,v2 (e.g. optim.lr=0.1,0.01)")
    return fixed, [list(c) for c in itertools.product(*axes)]


def run_label(combo: list[tuple[str, str]]) -> str:
    """Directory name of one sweep run: ``optim.lr=0.1,train.epochs=2`` (path separators replaced)."""
    return ",".join(f"{k}={v}" for k, v in combo).replace("/", "_").replace(" ", "")


def submit_sweep(config: str, overrides: list[str], res: Resources, *, folder: Optional[str] = None,
                 dry_run: bool = False, echo: Callable[[str], None] = print) -> list:
    """Validate every combination, then submit them as one job array; returns the jobs."""
    res.check()
    fixed, combos = expand_sweep(overrides)
    base = load_checked_config(config, fixed)
    # On SLURM the tracker groups array tasks as ``array-<SLURM_ARRAY_JOB_ID>`` (tldist.train.tracking);
    # local/debug runs have no array id, so they get a named group here.
    group = base.tracker.group
    if group is None and res.cluster != "slurm":
        group = f"{Path(base.output_dir).name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    runs = []
    for combo in combos:
        label = run_label(combo)
        extra = [f"{k}={v}" for k, v in combo] + [f"output_dir={base.output_dir}/sweep/{label}"]
        extra += [f"tracker.group={group}"] if group else []
        try:
            runs.append((combo, load_checked_config(config, fixed + extra)))
        except UserError as e:
            raise type(e)(f"sweep run {label}: {e}") from None
    root = check_output_dir(folder, "--folder").resolve() if folder else Path(base.output_dir) / "submitit"
    name = res.name or f"{JOB_NAME_PREFIX}-sweep-{Path(base.output_dir).name}"
    if dry_run:
        echo(f"# dry run: nothing submitted. {len(runs)} runs as one array, W&B group {group or 'array-<id>'}")
        for i, (combo, cfg) in enumerate(runs):
            echo(f"#   [{i}] {' '.join(f'{k}={v}' for k, v in combo)} -> {cfg.output_dir}")
        echo(sbatch_preview(executor_parameters(res, name), root / "%j", array=len(runs)))
        return []
    executor = make_executor(job_folder(root, res.cluster), res, name)
    with _submission_errors(res), executor.batch():
        jobs = [executor.submit(TrainJob(cfg.to_dict(), max_requeues=res.max_requeues)) for _, cfg in runs]
    array_id = jobs[0].job_id.split("_")[0]
    echo(f"submitted sweep of {len(jobs)} runs as array {array_id} ({name}), W&B group {group or f'array-{array_id}'}")
    for job, (combo, cfg) in zip(jobs, runs):
        echo(f"  {job.job_id}  {' '.join(f'{k}={v}' for k, v in combo)}  -> {cfg.output_dir}")
    for line in _log_lines(jobs[0]):
        echo(line)
    echo(f"  status: tldist status --folder {root}    cancel: tldist cancel {array_id}")
    return jobs


def submit_configs(cfgs: list, res: Resources, *, root: str | Path, name: str) -> list:
    """Submit already validated configs (each its own ``output_dir``) as one job array of
    :class:`~tldist.launch.job.TrainJob`; returns the submitit jobs (``tldist study`` uses it)."""
    res.check()
    executor = make_executor(job_folder(Path(root), res.cluster), res, name)
    with _submission_errors(res), executor.batch():
        return [executor.submit(TrainJob(cfg.to_dict(), max_requeues=res.max_requeues)) for cfg in cfgs]


# ---------------------------------------------------------------------------------------- status / cancel
def _slurm(*args: str) -> str:
    try:
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise UserError(f"'{args[0]}' not found: run this on a SLURM login node (or install the SLURM client)") \
            from None
    if proc.returncode != 0:
        detail = " ".join((proc.stderr.strip() or proc.stdout.strip()).split())
        raise UserError(f"'{' '.join(args)}' failed: {detail} (is SLURM_CONF set / does 'sinfo' answer?)")
    return proc.stdout


def own_jobs() -> list[str]:
    """Ids of this user's queued/running jobs named ``tldist-*``."""
    out = _slurm("squeue", "--me", "-h", "-o", "%i|%j")
    return [jid for jid, name in (line.split("|", 1) for line in out.splitlines() if "|" in line)
            if name.startswith(JOB_NAME_PREFIX)]


def folder_job_ids(folder: str | Path) -> list[str]:
    """Job ids that have a submission script (or array pickles) in a submitit folder."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--folder '{folder}' is not a directory (it is <output_dir>/submitit by default)")
    ids = {p.name.split("_submission")[0] for p in root.glob("*/*_submission.sh")}
    ids |= {p.name for p in root.iterdir() if p.is_dir() and re.fullmatch(r"\d+(_\d+)?", p.name)}
    return sorted(ids, key=lambda s: [int(x) for x in s.split("_")])


def show_status(folder: Optional[str] = None, echo: Callable[[str], None] = print) -> None:
    """Queued/running tldist jobs (squeue); with ``folder``, the accounting records of its jobs (sacct)."""
    ids = folder_job_ids(folder) if folder else []  # checks the folder before asking SLURM
    out = _slurm("squeue", "--me", "-o", "%.14i %.9P %.30j %.10T %.10M %.10l %.5D %R")
    lines = out.splitlines()
    echo("\n".join(lines[:1] + [ln for ln in lines[1:] if f" {JOB_NAME_PREFIX}" in ln]) or "(no jobs)")
    if folder:
        if ids:
            echo(_slurm("sacct", "--duplicates", "-X", "-j", ",".join(i.split("_")[0] for i in ids),
                        "-o", "JobID%16,JobName%30,State%12,Elapsed,ExitCode,Start,End").rstrip())
        else:
            echo(f"no submitted jobs in {folder}")


def cancel_jobs(job_ids: list[str], *, all_jobs: bool = False, echo: Callable[[str], None] = print) -> list[str]:
    """scancel the given jobs, or every queued/running ``tldist-*`` job of this user."""
    if all_jobs == bool(job_ids):
        raise UserError("give job ids or --all (every tldist-* job of yours), not both or neither")
    for jid in job_ids:
        if not re.fullmatch(r"\d+(_\d+)?", jid):
            raise UserError(f"job id {jid!r} is not a SLURM job id (e.g. 1234 or 1234_5)")
    ids = job_ids or own_jobs()
    if ids:
        _slurm("scancel", *ids)
    echo(f"cancelled {' '.join(ids)}" if ids else "no tldist jobs to cancel")
    return ids
