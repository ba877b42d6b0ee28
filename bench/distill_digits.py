"""Knowledge distillation on the demo's digits target: teacher, student alone, distilled student.

1. the demo's shards (``tldist.data.demo.write_demo_shards``; scikit-learn's handwritten digits,
   1,258 train / 539 val, 32 px);
2. a teacher (default resnet18 at 16 px: the digits are 8 px scans, so nothing is lost below the
   demo's 32 px, at a quarter of the compute; from scratch, the demo's scratch recipe) trained for
   ``--teacher-epochs``;
3. a small student (default timm's ``mobilenetv3_small_100``, 1.5 M parameters) trained for
   ``--student-epochs`` twice, from the same init, on the same batches: alone (labels only) and with
   ``tldist distill`` (``distill.teacher`` = the teacher's run dir, its best checkpoint).

Every stage is a real ``tldist`` run (one process, one thread, ``data.num_workers=1``; the two
students run at the same time); the val top-1 of each and the wall time of each run go to
``--out`` (JSON). Top-1 figures are deterministic (seeded);
the times are not (shared machine).

    python bench/distill_digits.py --out bench/results/distill_digits.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRATCH = ["optim.lr=4.0e-3", "transfer.layer_decay=1.0", "transfer.head_lr_mult=1.0"]  # quickstart.SCRATCH_RECIPE


def start(name: str, args: list[str], work: Path, command: str = "train") -> dict:
    """Start one ``tldist`` run in the background; :func:`finish` waits for it."""
    out = work / "runs" / name
    cmd = [sys.executable, "-m", "tldist.cli", command, str(REPO / "configs/demo_target.yaml"), f"output_dir={out}",
           "checkpoint.resume=none", "tracker.backend=none", "data.num_workers=1", *args]
    log = work / f"{name}.log"
    print(f"[distill] {name}: {' '.join(cmd[3:])}", flush=True)
    f = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return {"name": name, "out": out, "log": log, "file": f, "proc": proc, "t0": time.time()}


def finish(run: dict) -> dict:
    """Wait for a run of :func:`start`; its final and per-eval val top-1, steps and wall time."""
    code = run["proc"].wait()
    run["file"].close()
    seconds = round(time.time() - run["t0"], 1)
    if code != 0:
        sys.exit(f"{run['name']} failed (exit {code}), see {run['log']}")
    return summary_of(run["out"], run["log"], seconds)


def summary_of(out: Path, log: Path, seconds) -> dict:
    result = json.loads((out / "result.json").read_text())
    evals = [float(line.split("top1 ")[1].split("%")[0]) for line in log.read_text().splitlines()
             if " eval val @ step " in line]
    summary = {"top1": result["eval/top1"], "best_top1": result["best_top1"], "per_eval_top1": evals,
               "steps": result["step"], "seconds": seconds}
    print(f"[distill]   {out.name}: top-1 {summary['top1']:.2f}% (per eval {evals}) in {seconds} s", flush=True)
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="bench_out/distill_digits", help="shards, runs and logs")
    p.add_argument("--out", default="bench/results/distill_digits.json", help="JSON summary")
    p.add_argument("--teacher", default="resnet18")
    p.add_argument("--teacher-size", type=int, default=16, help="teacher input size (px; the digits are 8 px scans)")
    p.add_argument("--teacher-epochs", type=int, default=4)
    p.add_argument("--student", default="timm:mobilenetv3_small_100")
    p.add_argument("--student-size", type=int, default=16, help="student input size (px)")
    p.add_argument("--student-epochs", type=int, default=3)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--reuse-teacher", action="store_true", help="keep a teacher run already in --work")
    a = p.parse_args()

    from tldist.data.demo import write_demo_shards

    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    shards = work / "shards"
    write_demo_shards(shards, source_per_class=1, source_val_per_class=1)  # only the digits target is used
    data = [f"data.train=[{shards}/target/train]", f"data.val={shards}/target/val"]
    teacher_dir = work / "runs" / "teacher"
    if a.reuse_teacher and (teacher_dir / "result.json").is_file():  # the same teacher, trained by an earlier call
        teacher = summary_of(teacher_dir, work / "teacher.log", None)
    else:
        teacher = finish(start("teacher", [*data, f"model.name={a.teacher}", f"data.image_size={a.teacher_size}",
                                           *SCRATCH, f"train.epochs={a.teacher_epochs}"], work))
    student = [*data, f"model.name={a.student}", f"data.image_size={a.student_size}", *SCRATCH,
               f"train.epochs={a.student_epochs}"]
    # both students at once (1 thread each): the same init and batches, only the loss differs
    runs = [start("student_alone", student, work),
            start("student_distilled", [*student, f"distill.teacher={teacher_dir}", f"distill.alpha={a.alpha}",
                                        f"distill.temperature={a.temperature}"], work, command="distill")]
    alone, distilled = (finish(r) for r in runs)
    summary = {"teacher": {"model": a.teacher, "image_size": a.teacher_size, "epochs": a.teacher_epochs, **teacher},
               "student_alone": {"model": a.student, "image_size": a.student_size, "epochs": a.student_epochs, **alone},
               "student_distilled": {"model": a.student, "image_size": a.student_size, "epochs": a.student_epochs,
                                     "alpha": a.alpha, "temperature": a.temperature, **distilled},
               "note": "1 process per run, 2-core CPU shared with other jobs: seconds are noisy, top-1 is seeded"}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
