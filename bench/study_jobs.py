"""``tldist study --jobs 2`` (two one-rank cells side by side) against the cells one after another on 2 DDP
ranks under ``accelerate launch``, as the demo ran its study before: wall and CPU seconds of the whole
study, interleaved A B A B, fresh ``--out`` each time, same cells and global batch (64).

Needs the demo's shards and source checkpoint (``tldist demo`` first, or ``--demo DIR``). Example (numbers in
BENCHMARKS.md, *Demo time*):

    python bench/study_jobs.py --demo demo_out --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, bench_env, free_port, machine_line, median_spread, table

CELLS = ["--labels-per-class", "5,all", "--arms", "finetune,scratch", "--seeds", "0", "--min-steps", "40",
         "--epochs", "3", "--scratch-lr-grid", "4e-3", "--scratch-warmup-grid", "0.1"]
"""4 cells of the demo's study (k = 5 and all, fine-tune and scratch, seed 0), 40 and 59 steps."""


def run(cmd: list[str]) -> tuple[float, float]:
    """(wall s, CPU s of the process tree) of one command; raises if it fails."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=bench_env(OMP_NUM_THREADS="1"))
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
    # wait4's rusage covers the command and every child it waited for (the launcher's ranks, the forked cells)
    return wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", default="demo_out", help="a finished `tldist demo --out` directory")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="/tmp/tldist_bench/study_jobs")
    a = ap.parse_args()
    demo = Path(a.demo).resolve()
    ckpt = sorted((demo / "runs" / "source" / "checkpoints").glob("step_*"))[-1]
    work = Path(a.work)
    common = [f"model.checkpoint={ckpt}", f"data.train=[{demo}/shards/target/train]",
              f"data.val={demo}/shards/target/val"]
    config = str(REPO / "configs" / "demo_target.yaml")

    def jobs(out: Path) -> list[str]:
        return [sys.executable, "-m", "tldist.cli", "study", config, f"output_dir={out}/runs", *common,
                "data.batch_size=64", "data.num_workers=0", "--jobs", "2", "--out", str(out), *CELLS]

    def ddp(out: Path) -> list[str]:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "configs" / "accelerate" / "cpu.yaml"), "--num_processes", "2", "--main_process_port",
                str(free_port()), "-m", "tldist.cli", "study", config, f"output_dir={out}/runs", *common,
                "data.batch_size=32", "--out", str(out), *CELLS]

    print(machine_line())
    print(f"# python bench/study_jobs.py --demo {a.demo} --repeats {a.repeats}")
    results: dict[str, list[tuple[float, float]]] = {"jobs": [], "ddp": []}
    for i in range(a.repeats):
        for name, build in (("jobs", jobs), ("ddp", ddp)) if i % 2 == 0 else (("ddp", ddp), ("jobs", jobs)):
            out = work / f"{name}-{i}"
            shutil.rmtree(out, ignore_errors=True)
            results[name].append(run(build(out)))
            print(f"{name} repeat {i}: wall {results[name][-1][0]:.1f} s, CPU {results[name][-1][1]:.1f} s", flush=True)
    rows = []
    for name, label in (("ddp", "each cell on 2 DDP ranks (batch 32 x 2)"), ("jobs", "--jobs 2 (one rank, batch 64)")):
        wall = median_spread([w for w, _ in results[name]])
        cpu = median_spread([c for _, c in results[name]])
        rows.append([label, f"{wall[0]:.1f} [{wall[1]:.1f}-{wall[2]:.1f}]", f"{cpu[0]:.1f} [{cpu[1]:.1f}-{cpu[2]:.1f}]"])
    wall_ratio = median_spread([j[0] / d[0] for j, d in zip(results["jobs"], results["ddp"])])
    cpu_ratio = median_spread([j[1] / d[1] for j, d in zip(results["jobs"], results["ddp"])])
    rows.append(["ratio --jobs / DDP (per repeat)", f"{wall_ratio[0]:.2f} [{wall_ratio[1]:.2f}-{wall_ratio[2]:.2f}]",
                 f"{cpu_ratio[0]:.2f} [{cpu_ratio[1]:.2f}-{cpu_ratio[2]:.2f}]"])
    print(table(["4 cells of the demo's study", "wall s, median [min-max]", "CPU s"], rows))


if __name__ == "__main__":
    main()
