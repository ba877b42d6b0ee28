"""``tldist demo``: the embedded default job, real transfer learning on a CPU machine.

1. Writes shards: printed digits rendered from matplotlib's fonts in the look of the target
   (:mod:`tldist.data.glyphs`, the source, 10 classes) and scikit-learn's *handwritten digits*
   (the target, real handwriting), see :mod:`tldist.data.demo`.
2. Pretrains a torchvision backbone from scratch on the printed digits (``configs/demo_source.yaml``).
3. Runs a label-budget study on the handwritten digits (``tldist study`` with
   ``configs/demo_target.yaml``): fine-tuning and a linear probe from the pretrained backbone
   against training from scratch, at 1, 5 and all labels per class, 3 seeds, equal optimizer
   steps per arm (27 runs); its table (``summary.md``), rows (``results.csv``) and plot
   (``study.png``) land in ``<out>/study/`` and the table is printed at the end, after one
   progress bar over the whole study (:class:`Progress`; each run's log is in its run directory).

Pretraining runs under ``accelerate launch`` with ``configs/accelerate/cpu.yaml`` (or ``ddp.yaml``
when GPUs are present) on ``--processes`` ranks. On a CPU machine the study runs in one process
with ``--jobs <processes>``: that many cells side by side, each a forked one-rank process at a
global batch of 64 (two such cells on 2 cores take 0.60x the wall time and CPU of each cell on
2 DDP ranks, BENCHMARKS.md *Demo time*: no gradient all-reduce, no duplicated optimizer step);
with GPUs it runs under ``accelerate launch`` as pretraining does (global batch 32 x processes)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from tldist.artifacts.checkpoint import best_checkpoint
from tldist.artifacts.layout import RESULT, RUN_LOG, RunDir
from tldist.data.demo import write_demo_shards
from tldist.errors import UserError
from tldist.paths import make_output_dir

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
STUDY = ["--labels-per-class", "1,5,all", "--arms", "finetune,probe,scratch", "--seeds", "0,1,2",
         "--min-steps", "40", "--epochs", "3", "--scratch-lr-grid", "4e-3", "--scratch-warmup-grid", "0.1"]
"""The demo's label-budget study on the target (``tldist study`` flags): 27 runs, 40 optimizer steps per
cell at k = 1 and 5, 59 (3 epochs) with all labels, the same for every arm; the scratch arm's LR is
4e-3 (2x the fine-tuning LR) with a 10% warm-up, the point that a per-k grid over {4e-3, 8e-3} picked
at k = 1 and within the seed spread of 8e-3 elsewhere (``--scratch-lr-grid 4e-3,8e-3`` reruns that
grid: 6 more runs). k = 10 (as far above scratch as k = 5, less clearly than the seed spread) and the
grid were dropped to keep the demo near 5 minutes on 2 cores (BENCHMARKS.md, *Demo time*)."""
STUDY_GLOBAL_BATCH = 64
"""Images per optimizer step of every study cell, whatever ``--processes`` (the budget of the table)."""
QUICK_SHARDS = {"source_per_class": 20, "source_val_per_class": 5}
QUICK_SOURCE = ["train.epochs=1", "train.max_steps=4"]
QUICK_STUDY = ["--labels-per-class", "1,all", "--arms", "finetune,scratch", "--seeds", "0", "--steps", "4",
               "--scratch-lr-grid", "4e-3", "--scratch-warmup-grid", "0.1"]
"""``--quick`` (the CI test): a tiny source, 4 pretraining steps, a 2 x 2 x 1 study of 4 steps a cell."""


def launch_command(config: Path, overrides: list[str], processes: int, command: str = "train") -> list[str]:
    """The ``accelerate launch`` command line of ``tldist <command> CONFIG OVERRIDES`` on ``processes`` ranks."""
    import torch

    acc = CONFIGS / "accelerate" / ("ddp.yaml" if torch.cuda.is_available() else "cpu.yaml")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(acc),
            "--num_processes", str(processes), "--main_process_port", str(_free_port()),
            "-m", "tldist.cli", command, str(config), *overrides]


def study_command(config: Path, overrides: list[str], processes: int) -> list[str]:
    """The command line of the demo's ``tldist study CONFIG OVERRIDES`` (flags follow): on a CPU machine
    one process running ``processes`` cells at a time (``--jobs``), each one rank at a global batch of
    :data:`STUDY_GLOBAL_BATCH`; with GPUs ``accelerate launch`` on ``processes`` ranks (batch 32 each)."""
    import torch

    if torch.cuda.is_available():
        return launch_command(config, overrides, processes, "study")
    # data.num_workers=0: a loader process per cell would compete with the other cells for the cores
    # (~10-20% more CPU per cell with all labels; the smaller subsets load in-process anyway)
    return [sys.executable, "-m", "tldist.cli", "study", str(config), *overrides,
            f"data.batch_size={STUDY_GLOBAL_BATCH}", "data.num_workers=0", "--jobs", str(processes)]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(name: str, cmd: list[str], log_dir: Path, progress: Optional[Progress] = None) -> float:
    """Run one stage's command with its output in ``<log_dir>/<name>.log``; returns its seconds.

    ``progress`` is polled twice a second while the command runs (and closed after it). Raises UserError
    with the log's last lines when it fails."""
    log_file = log_dir / f"{name}.log"
    print(f"[demo] {name}: {' '.join(cmd[2:])}\n[demo]   log: {log_file}", flush=True)
    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log_file, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                try:
                    proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    if progress is not None:
                        progress.poll(log_file)
            if progress is not None and proc.returncode == 0:
                progress.poll(log_file)
        except BaseException:  # Ctrl-C: the stage stops too (its runs at a checkpoint), then the demo
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        finally:
            if progress is not None:
                progress.close()
    if proc.returncode != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-25:])
        raise UserError(f"demo stage '{name}' failed (exit {proc.returncode}); last lines of {log_file}:\n{tail}")
    return round(time.time() - t0, 1)


_STEP = re.compile(r" INFO step (\d+)/(\d+)\b")
_CELL = re.compile(r"^\[study\] (\S+): (\d+) steps")


class Progress:
    """A stage's progress, read from its log and output files while it runs: a tqdm bar on a terminal,
    else one line per finished study run (or per quarter of the pretraining steps).

    Pretraining (``study=None``): optimizer steps, from the trainer's ``step N/M`` log lines. A study
    (``study=<--out>``): **one bar over the whole study**: runs done / total (``plan.json``'s cells and
    scratch grid; a run is done when its ``result.json`` exists), plus the logged steps of the running
    runs as fractions of a run (their ``train.log`` with ``--jobs``, else the study's own log), and the
    ETA. The runs' logs stay in files."""

    def __init__(self, desc: str, study: Optional[Path] = None, *, stream: Any = None):
        self.desc, self.study, self.stream = desc, study, stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar: Any = None
        self.total = 0
        self.done = 0
        self.running: dict[str, float] = {}
        """Study runs in progress: name -> fraction of its steps logged."""
        self.reported = -1
        self.t0 = time.time()
        self._offset = 0
        self._seq: tuple[str, float] = ("", 0.0)  # one run after another: its name and fraction, from the log

    def _read_log(self, log_file: Path) -> None:
        try:
            with open(log_file, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return
        cut = data.rfind(b"\n") + 1  # whole lines only; the rest is read next time
        self._offset += cut
        for line in data[:cut].decode("utf-8", errors="replace").splitlines():
            if (m := _CELL.match(line)) is not None:
                self._seq = (m.group(1), 0.0)
            elif (m := _STEP.search(line)) is not None:
                step, total = int(m.group(1)), int(m.group(2))
                if self.study is None:
                    self.done, self.total = step, total
                elif self._seq[0]:
                    self._seq = (self._seq[0], step / max(1, total))

    def _study_counts(self) -> None:
        if not self.total:
            try:
                plan = json.loads((self.study / "plan.json").read_text())
            except (OSError, ValueError):
                return
            self.total = len(plan.get("cells", [])) + len(plan.get("grid_cells", []))
        runs = self.study / "runs"
        done, running = 0, {}
        for run in (sorted(runs.iterdir()) if runs.is_dir() else []):
            if (run / RESULT).is_file():
                done += 1
            elif (run / RUN_LOG).is_file():  # --jobs: each run logs to its own file
                running[run.name] = _last_step_fraction(run / RUN_LOG)
        name, frac = self._seq
        if name and name not in running and not (runs / name / RESULT).is_file():
            running[name] = frac
        self.done, self.running = done, running

    def poll(self, log_file: Path) -> None:
        self._read_log(log_file)
        if self.study is not None:
            self._study_counts()
        if not self.total:
            return
        n = min(self.total, self.done + sum(min(f, 0.99) for f in self.running.values()))
        if self.tty:
            self._draw(n)
        else:
            self._line()

    def _draw(self, n: float) -> None:
        if self.bar is None:
            from tqdm import tqdm

            unit = "runs" if self.study is not None else "steps"
            self.bar = tqdm(total=self.total, initial=n, desc=f"{self.desc} {self.done}/{self.total} {unit}",
                            file=self.stream, dynamic_ncols=True,
                            smoothing=0, bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")
            self.bar.unit = unit
        self.bar.n = n
        self.bar.set_description_str(f"{self.desc} {self.done}/{self.total} {self.bar.unit}", refresh=False)
        self.bar.set_postfix_str(f"running {', '.join(self.running)}" if self.running else "", refresh=False)
        self.bar.refresh()

    def _line(self) -> None:
        """Without a terminal: one line per finished study run, or per quarter of the pretraining steps."""
        mark = self.done if self.study is not None else (4 * self.done) // self.total
        if mark == self.reported or self.done == 0:
            return
        self.reported = mark
        elapsed = time.time() - self.t0
        left = elapsed * (self.total - self.done) / self.done
        unit = "runs" if self.study is not None else "steps"
        print(f"[demo] {self.desc}: {self.done}/{self.total} {unit} done, {_clock(elapsed)} elapsed, "
              f"about {_clock(left)} left", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _last_step_fraction(log: Path) -> float:
    """The last ``step N/M`` of a run's log as N/M (0 before its first logged step)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return 0.0
    steps = _STEP.findall(tail)
    return int(steps[-1][0]) / max(1, int(steps[-1][1])) if steps else 0.0


def _clock(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}:{s:02d}"


def _train(name: str, config: Path, overrides: list[str], processes: int, log_dir: Path) -> dict:
    seconds = _run(name, launch_command(config, overrides, processes), log_dir, Progress(name))
    out_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir="))
    result = json.loads(RunDir.of(out_dir).result.read_text())
    result["seconds"] = seconds
    print(f"[demo]   {name}: top-1 {result.get('eval/top1', float('nan')):.2f}% in {seconds} s", flush=True)
    return result


def run_demo(out: str | Path = "demo_out", *, processes: int = 2, quick: bool = False) -> dict:
    """Run the whole demo (see the module docstring); returns the summary also written to
    ``<out>/demo_results.json``: source top-1, the study's rows, wall time in seconds."""
    out = Path(out).resolve()
    logs = out / "logs"
    make_output_dir(logs, "--out")
    t0 = time.time()
    shards = out / "shards"
    write_demo_shards(shards, **(QUICK_SHARDS if quick else {}))
    shard_seconds = round(time.time() - t0, 1)
    print(f"[demo] shards ready in {shards} ({shard_seconds} s)", flush=True)
    source = _train("pretrain-glyphs", CONFIGS / "demo_source.yaml",
                    [f"output_dir={out}/runs/source", f"data.train=[{shards}/source/train]",
                     f"data.val={shards}/source/val", *(QUICK_SOURCE if quick else [])], processes, logs)
    source_ckpts = RunDir.of(out / "runs" / "source").checkpoints
    ckpt = best_checkpoint(source_ckpts)
    if ckpt is None:
        raise UserError(f"pretraining left no best checkpoint in {source_ckpts}")
    study_dir = out / "study"
    overrides = [f"output_dir={out}/runs/target", f"model.checkpoint={ckpt}",
                 f"data.train=[{shards}/target/train]", f"data.val={shards}/target/val"]
    study_seconds = _run("study", study_command(CONFIGS / "demo_target.yaml", overrides, processes)
                         + ["--out", str(study_dir), *(QUICK_STUDY if quick else STUDY)], logs,
                         Progress("study", study_dir))
    rows = _read_rows(study_dir / "results.csv")
    summary = {"source_top1": source.get("eval/top1"), "study": str(study_dir), "rows": rows,
               "seconds": round(time.time() - t0, 1), "processes": processes, "quick": quick,
               "phases": {"shards": shard_seconds, "pretrain": source["seconds"], "study": study_seconds,
                          "study_runs": len(list((study_dir / "runs").glob("*/result.json")))}}
    (out / "demo_results.json").write_text(json.dumps(summary, indent=1))
    table = study_dir / "summary.md"
    print("\n[demo] target: scikit-learn's handwritten digits; top-1 on the 539 val digits by labels per class")
    print(table.read_text() if table.is_file() else "(the study wrote no summary.md)")
    print(f"[demo] plot {study_dir / 'study.png'}; total {summary['seconds']} s; results in "
          f"{out / 'demo_results.json'}")
    return summary


def _read_rows(path: Path) -> list[dict]:
    import csv

    if not path.is_file():
        raise UserError(f"the study left no {path}; see {path.parent}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["top1"] = float(row["top1"])
    return rows
