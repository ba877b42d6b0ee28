"""Running a study's cells: in this process's ranks one after another, or as SLURM job arrays."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

from tldist.artifacts.layout import RUN_LOG  # with --jobs N each cell's output goes to <run dir>/train.log
from tldist.config import load_config
from tldist.errors import UserError
from tldist.paths import check_output_dir, make_output_dir
from tldist.launch.slurm import submit_configs
from tldist.study.report import aggregate
from tldist.train.main import run
from tldist.world import die_with_parent, start_world
from tldist.study.plan import (Cell, StudyOptions, StudyPlan, save_json, apply_scratch_choice, choose_scratch,
                               k_label, plan_study, write_subsets)


def _run_local(plan: StudyPlan, is_main: bool, echo: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Every pending cell, one after another, in this process's ranks (call on every rank)."""
    results: dict[str, dict[str, Any]] = {}

    def one(cell: Cell) -> None:
        done = cell.result()
        if done is not None and done.get("eval/top1") is None:
            err = UserError(f"study run {cell.run_dir} finished without a val evaluation (its result.json has no "
                            "eval/top1; killed between its last checkpoint and the end?): delete that directory and "
                            "rerun the same command")
            err.same_on_every_rank = True  # every rank reads the same file
            raise err
        if done is not None:
            if is_main:
                echo(f"[study] {cell.name}: finished earlier (top-1 {done.get('eval/top1', float('nan')):.2f}%), skipped")
            results[cell.name] = done
            return
        if is_main:
            echo(f"[study] {cell.name}: {cell.steps} steps, lr {cell.lr:g}, warm-up {cell.warmup_steps} -> {cell.run_dir}")
        result = run(cell.cfg)
        if result.get("stopped"):  # a stop signal (preemption): every rank stopped at the same step
            raise _Stopped(f"[study] {cell.name} stopped at step {result['step']} with a checkpoint; rerun the same "
                           "command to continue")
        results[cell.name] = result

    try:
        for k in plan.opts.labels_per_class:
            for cell in plan.grid.get(k, []):
                one(cell)
            if k in plan.grid:
                _choose(plan, k, results, is_main)
            for cell in (c for c in plan.cells if c.k == k):
                one(cell)
    except _Stopped as stop:
        if is_main:
            echo(str(stop))
        results[_STOPPED] = {}
    return results


class _Stopped(Exception):
    """A cell's training stopped on a signal: the study stops after it (the finished cells are reported)."""


_STOPPED = "__stopped__"  # marker entry in _run_local's results


class StudyStopped(Exception):
    """Raised by :func:`run_study` (on every rank, after the report of the finished cells) when a cell
    stopped on a signal (preemption): rerunning the same command continues it. ``tldist study`` exits 3,
    as ``tldist train`` does for a stopped run."""


def _choose(plan: StudyPlan, k: Optional[int], results: dict[str, dict[str, Any]], is_main: bool) -> None:
    choice = choose_scratch(plan.grid[k], results)
    apply_scratch_choice(plan, k, choice)
    if is_main:
        path = plan.out / "scratch_choice.json"
        chosen = json.loads(path.read_text()) if path.is_file() else {}
        chosen[k_label(k)] = choice
        save_json(path, chosen)


def _run_slurm(plan: StudyPlan, res: Any, folder: Optional[str], echo: Callable[[str], None]) -> dict[str, dict]:
    """Submit the pending cells as job arrays (grid + finetune/probe first, then scratch), wait for them."""
    root = Path(folder).expanduser().resolve() if folder else plan.out / "submitit"
    results: dict[str, dict[str, Any]] = {}

    def phase(cells: list[Cell], what: str) -> None:
        pending = [c for c in cells if c.result() is None]
        for c in cells:
            if c not in pending:
                results[c.name] = c.result()
        if not pending:
            return
        jobs = submit_configs([c.cfg for c in pending], res, root=root, name=res.name or f"tldist-study-{plan.name}")
        echo(f"[study] submitted {len(jobs)} {what} runs as {'array' if len(jobs) > 1 else 'job'} "
             f"{jobs[0].job_id.split('_')[0]}; logs under {root}; "
             "waiting (if stopped: rerun the same command, finished cells are skipped)")
        failed = []
        for job, cell in zip(jobs, pending):
            while not job.done():
                time.sleep(2)
            try:
                job.results()
            except Exception as e:  # submitit re-raises the task's error
                failed.append(f"{cell.name} (job {job.job_id}: {' '.join(str(e).split())[-300:]})")
                continue
            results[cell.name] = cell.result() or job.results()[0]
        if failed:
            raise UserError(f"{len(failed)} study runs failed: {'; '.join(failed)}; fix the cause and rerun the same "
                            "command (finished cells are skipped)")

    first = [c for k in plan.opts.labels_per_class for c in plan.grid.get(k, [])]
    first += [c for c in plan.cells if c.arm != "scratch"]
    scratch = [c for c in plan.cells if c.arm == "scratch"]
    phase(first + ([] if plan.grid else scratch), "grid/finetune/probe" if plan.grid else "study")
    if plan.grid:
        for k in plan.grid:
            _choose(plan, k, results, True)
        phase(scratch, "scratch")
    return results


def _cell_cost(cell: Cell) -> float:
    """Rough relative cost of a cell, to start the longest first: a linear probe's step has no backbone backward."""
    return cell.steps * (0.3 if cell.arm == "probe" else 1.0)


def _fork_cell(cell: Cell, threads: Optional[int]) -> int:
    """Run ``cell`` in a forked child of this process (one rank, output in ``<run dir>/train.log``); returns
    its pid. The child exits 0 when done, 3 when a stop signal stopped it at a checkpoint, 2 for a
    :class:`UserError`, 1 for any other error (the traceback is in the log)."""
    import sys

    make_output_dir(cell.run_dir, "--out")
    log_path = cell.run_dir / RUN_LOG
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:  # the child: never returns
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # a resumed cell appends
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        die_with_parent(parent_pid=parent)  # a killed study takes its cells with it (they stop at a checkpoint)
        if threads:
            import torch

            torch.set_num_threads(threads)
        result = run(cell.cfg)
        code = 3 if result.get("stopped") else 0
    except UserError as e:
        print(f"tldist: error: {e}", file=sys.stderr)
        code = 2
    except BaseException:  # noqa: BLE001 - the child must reach os._exit: never back into the study's loop
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _run_jobs(plan: StudyPlan, jobs: int, echo: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Every pending cell, up to ``jobs`` at a time, each in a forked one-rank child of this process (no
    re-import, no process group, no gradient all-reduce): on a CPU machine N small single-core cells side
    by side cost less than each cell on N ranks. Cells start longest first; as with ``--slurm``, the
    scratch grid and the finetune/probe cells run first, then (the grid's choice made) the scratch cells.
    Each cell's output is in ``<run dir>/train.log``; this process prints one line as each starts and ends.
    A failed cell stops the others (SIGTERM: they stop at a checkpoint) and raises :class:`UserError`
    with its log's last lines."""
    import signal

    results: dict[str, dict[str, Any]] = {}
    threads = None if os.environ.get("OMP_NUM_THREADS") else max(1, (os.cpu_count() or 1) // jobs)
    if any(c.cfg.tracker.backend == "wandb" for c in plan.cells):
        import wandb  # noqa: F401  (imported once here, not in every forked cell)

    def phase(cells: list[Cell]) -> None:
        pending = []
        for c in cells:
            done = c.result()
            if done is not None and done.get("eval/top1") is not None:
                echo(f"[study] {c.name}: finished earlier (top-1 {done['eval/top1']:.2f}%), skipped")
                results[c.name] = done
            elif done is not None:
                raise UserError(f"study run {c.run_dir} finished without a val evaluation (its result.json has no "
                                "eval/top1): delete that directory and rerun the same command")
            else:
                pending.append(c)
        pending.sort(key=_cell_cost, reverse=True)  # the last cells to finish are short ones
        running: dict[int, tuple[Cell, float]] = {}
        failed: list[str] = []
        stopped = False
        try:
            while pending or running:
                while pending and len(running) < jobs and not (failed or stopped):
                    c = pending.pop(0)
                    echo(f"[study] {c.name}: {c.steps} steps, lr {c.lr:g}, warm-up {c.warmup_steps} -> "
                         f"{c.run_dir} (log: {RUN_LOG})")
                    running[_fork_cell(c, threads)] = (c, time.time())
                if not running:
                    break
                time.sleep(0.2)
                for pid in list(running):
                    got, status = os.waitpid(pid, os.WNOHANG)
                    if got == 0:
                        continue
                    c, t0 = running.pop(pid)
                    code = os.waitstatus_to_exitcode(status)
                    result = c.result() if code == 0 else None
                    if result is not None and result.get("eval/top1") is not None:
                        results[c.name] = result
                        echo(f"[study] {c.name}: top-1 {result['eval/top1']:.2f}% ({time.time() - t0:.0f} s)")
                    elif code == 3 or (code < 0 and stopped):
                        stopped = True
                    else:
                        log_path = c.run_dir / RUN_LOG
                        lines = log_path.read_text(errors="replace").splitlines()[-15:] if log_path.is_file() else []
                        failed.append(f"{c.name} (exit {code}; last lines of {log_path}):\n" + "\n".join(lines))
                        for other in running:  # fail fast: the others stop at a checkpoint
                            os.kill(other, signal.SIGTERM)
        finally:
            for pid in running:  # an interrupt (Ctrl-C) or an error here: no cell outlives the study
                try:
                    os.kill(pid, signal.SIGTERM)
                    os.waitpid(pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
        if failed:
            raise UserError(f"{len(failed)} study run(s) failed: " + "\n".join(failed)
                            + "\nfix the cause and rerun the same command (finished cells are skipped)")
        if stopped:
            raise _Stopped("[study] a cell stopped on a signal with a checkpoint; rerun the same command to continue")

    try:
        first = [c for k in plan.opts.labels_per_class for c in plan.grid.get(k, [])]
        scratch = [c for c in plan.cells if c.arm == "scratch"]
        phase(first + [c for c in plan.cells if c.arm != "scratch"] + ([] if plan.grid else scratch))
        if plan.grid:
            for k in plan.grid:
                _choose(plan, k, results, True)
            phase(scratch)
    except _Stopped as stop:
        echo(str(stop))
        results[_STOPPED] = {}
    return results


def _previous_plan(out: str | Path) -> dict[str, Any]:
    path = Path(out).expanduser() / "plan.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def check_same_budget(previous: dict[str, Any], new: dict[str, Any], out: Path) -> None:
    """Refuse to continue a study whose finished cells had another budget (global batch, steps per k or
    scratch grid): their results would not be comparable. New k values, arms and seeds are fine."""
    if not previous:
        return
    changed = [key for key in ("global_batch", "scratch_lr_grid", "scratch_warmup_grid") if previous.get(key) != new[key]]
    changed += [f"steps at k={k}" for k, s in new["steps_per_k"].items() if previous["steps_per_k"].get(k, s) != s]
    if changed:
        raise UserError(f"{out} holds a study planned with another budget ({', '.join(changed)} differ from "
                        f"{out / 'plan.json'}): rerun with the same flags and processes, or use a new --out")


def run_study(config: str, overrides: list[str], out: str | Path, opts: Optional[StudyOptions] = None, *,
              name: Optional[str] = None, slurm: Any = None, folder: Optional[str] = None,
              aggregate_only: bool = False, dry_run: bool = False, jobs: int = 1,
              echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run (or continue) a label-budget study and aggregate it; returns the ``results.csv`` rows.

    Local mode (``slurm=None``): call on every rank (under ``accelerate launch``) or alone; rank 0
    writes the subsets and the reports. ``slurm``: a :class:`~tldist.launch.slurm.Resources`; the cells
    run as job arrays and this process waits for them. ``aggregate_only`` reports the finished cells
    without training; ``dry_run`` prints the plan only. ``jobs`` > 1 (local mode, one process, not under a
    launcher): that many cells at a time, each in a forked one-rank child (:func:`_run_jobs`). Raises
    :class:`UserError` for bad input.
    """
    opts = opts or StudyOptions()
    check_output_dir(out, "--out")  # before any work: not a file, nor under one
    accelerator = None
    previous = _previous_plan(out)
    world_size = int(previous.get("world_size", os.environ.get("WORLD_SIZE", 1)))  # dry run, --aggregate
    if jobs < 1:
        raise UserError(f"--jobs {jobs} is invalid: use 1 (cells one after another) or more")
    if jobs > 1 and (slurm is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        raise UserError(f"--jobs {jobs} runs cells side by side in forked processes of one process: not with "
                        f"{'--slurm' if slurm is not None else 'a launcher (WORLD_SIZE > 1)'}; use one or the other")
    if slurm is not None:
        slurm.check()
        world_size = slurm.nodes * slurm.ntasks_per_node
    elif jobs > 1 and not (aggregate_only or dry_run):
        world_size = 1  # each cell is one rank in a forked child; no process group here (nor CUDA before a fork)
    elif not (aggregate_only or dry_run):
        train_cfg = load_config(config, overrides).train
        accelerator = start_world(mixed_precision=train_cfg.mixed_precision,  # the ranks' process group
                                  timeout_s=train_cfg.collective_timeout_s)
        world_size = accelerator.num_processes
    is_main = accelerator is None or accelerator.is_main_process
    try:
        plan = plan_study(config, overrides, out, opts, world_size=world_size, name=name)
        check_same_budget(previous, plan.describe(), plan.out)
    except UserError as e:
        e.same_on_every_rank = True  # every rank plans alike from the same files: printed once
        raise
    if dry_run:
        echo(json.dumps(plan.describe(), indent=1))
        return []
    if is_main:
        small = plan.describe()["loaded_in_process"]
        if small and not aggregate_only:
            echo(f"[study] k={','.join(small)}: fewer samples than ranks x data.num_workers x data.batch_size; "
                 "those cells load in-process (data.num_workers=0): a loader worker would fill each batch from its own "
                 "few samples")
        if not aggregate_only:
            write_subsets(plan)
        merged = plan.describe()
        merged["steps_per_k"] = {**_previous_plan(plan.out).get("steps_per_k", {}), **merged["steps_per_k"]}
        save_json(plan.out / "plan.json", merged)
    if accelerator is not None:
        accelerator.wait_for_everyone()  # subsets written before any rank reads them (success path only)
    if aggregate_only:
        choice_file = plan.out / "scratch_choice.json"
        chosen = json.loads(choice_file.read_text()) if choice_file.is_file() else {}
        for k in plan.grid:
            if k_label(k) in chosen:
                apply_scratch_choice(plan, k, chosen[k_label(k)])
        results = {c.name: r for c in plan.cells if (r := c.result()) is not None}
    elif slurm is not None:
        results = _run_slurm(plan, slurm, folder, echo)
    elif jobs > 1:
        results = _run_jobs(plan, jobs, echo)
    else:
        results = _run_local(plan, is_main, echo)
    stopped = results.pop(_STOPPED, None) is not None
    rows = aggregate(plan, results, write=is_main, echo=echo if is_main else (lambda s: None))
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if stopped:
        raise StudyStopped(f"study {plan.out} stopped on a signal: rerun the same command to continue")
    return rows
