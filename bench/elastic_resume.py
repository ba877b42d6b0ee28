"""Resume after a world-size change: time to the first step, and whether the samples match.

One 2-rank run (``accelerate launch``, gloo, 2 loader workers each) trains the demo's printed-digit shards
to step ``--steps`` with a checkpoint at ``--steps / 2``; an uninterrupted 2-rank run is the reference.
From that checkpoint three resumes run side by side, interleaved ``--repeats`` times, each stopping
after one step:

* ``same``: 2 ranks x 2 workers x batch 16 (the topology that saved it);
* ``1 rank``: 1 rank x 1 worker x batch 32 (the global batch kept);
* ``1 rank, batch halved``: 1 rank x 2 workers x batch 16 (continues at the same sample, with a warning).

Each resume's wall time (process start to the end of its first step and its exit; startup included, as
a requeued job sees it) is reported as a ratio to ``same``. A full resume of each kind then runs to the
end and its global sample order (every rank's ``train.trace_samples`` merged back into the global order)
is compared with the reference's. Run:

    python bench/elastic_resume.py --steps 16 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import DEFAULT_ROOT, REPO, free_port, machine_line, table


def tldist(args: list[str], ranks: int, log: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "tldist.cli", *args]
    if ranks > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs/accelerate/cpu.yaml"), "--num_processes", str(ranks), "--main_process_port",
               str(free_port()), "-m", "tldist.cli", *args]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - t0


def global_order(out: Path) -> list[str]:
    """The run's samples in global order: for each step, row i of every rank in rank order (t = i*world + r);
    a step trained twice (before and after a resume) counts once, as last trained."""
    per_rank = {}
    for f in sorted((out / "trace").glob("rank*.jsonl")):
        steps: dict[int, list[str]] = {}
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            steps[rec["step"]] = rec["keys"]
        per_rank[int(f.stem[4:])] = steps
    last_ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    layouts = json.loads((last_ckpt / "trainer.json").read_text()).get("layouts") or []
    order = []
    last = max(max(s) for s in per_rank.values())
    for step in range(1, last + 1):
        ranks = [r for r in sorted(per_rank) if step in per_rank[r]]
        # after a change of world size the ranks still training are the ones of the new layout
        world = next((lay["world_size"] for lay in reversed(layouts) if lay["step"] < step), len(ranks))
        rows = [per_rank[r][step] for r in range(world)]
        order += [rows[r][i] for i in range(len(rows[0])) for r in range(world)]
    return order


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--root", default=str(DEFAULT_ROOT / "elastic_resume"))
    a = ap.parse_args()
    root = Path(a.root)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    print(machine_line())
    print(f"# python bench/elastic_resume.py --steps {a.steps} --repeats {a.repeats}", flush=True)
    data = root / "data"
    tldist(["shards", "demo", str(data)], 1, root / "shards.log")
    half = a.steps // 2
    common = [str(REPO / "configs/test_tiny.yaml"), f"data.train=[{data}/source/train]", "data.hflip=false",
              "train.trace_samples=true", f"checkpoint.every_steps={half}", "checkpoint.keep_last=4",
              "optim.lr_ref_batch=32", "data.partitions=24", "data.image_size=32"]
    ref, base = root / "reference", root / "base"
    tldist(["train", *common, f"output_dir={ref}", f"train.max_steps={a.steps}", "data.batch_size=16"], 2,
           root / "reference.log")
    tldist(["train", *common, f"output_dir={base}", f"train.max_steps={half}", "data.batch_size=16"], 2,
           root / "base.log")
    kinds = {"same": (2, ["data.batch_size=16", "data.num_workers=2"]),
             "1 rank": (1, ["data.batch_size=32", "data.num_workers=1"]),
             "1 rank, batch halved": (1, ["data.batch_size=16", "data.num_workers=2"])}

    def resume(kind: str, out: Path, steps: int) -> float:
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(base, out)
        ranks, extra = kinds[kind]
        return tldist(["train", *common, f"output_dir={out}", f"train.max_steps={steps}", *extra], ranks,
                      out.with_suffix(".log"))

    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(a.repeats):
        for kind in kinds:  # interleaved
            times[kind].append(resume(kind, root / "first_step", half + 1))
    ref_order = global_order(ref)
    rows = []
    for kind, (ranks, extra) in kinds.items():
        out = root / kind.replace(" ", "_").replace(",", "")
        # the reference's remaining samples: (steps - half) global batches of 32 -> as many samples as it had
        steps = a.steps if "halved" not in kind else half + 2 * (a.steps - half)
        resume(kind, out, steps)
        order = global_order(out)
        n = min(len(order), len(ref_order))
        match = order[:n] == ref_order[:n]
        med = sorted(times[kind])[len(times[kind]) // 2]
        rows.append([kind, f"{med:.1f}", f"{med / sorted(times['same'])[a.repeats // 2]:.2f}",
                     f"{'yes' if match else 'NO'} ({n} samples)"])
        print(json.dumps({"kind": kind, "resume_to_first_step_s": times[kind], "samples_match": match,
                          "compared": n}), flush=True)
    print(table(["resume on", "to first step (s, median)", "ratio to same topology",
                 "global sample order = uninterrupted run"], rows))


if __name__ == "__main__":
    main()
