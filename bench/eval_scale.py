"""Eval at scale: tldist's EvalAccumulator (per-class int64 counts all-reduced, mistake pairs gathered to rank 0
alone, the dense confusion matrix on rank 0 only up to ``eval.confusion_max_classes``) against the design before
it (a dense classes x classes float64 confusion matrix on every rank, all-reduced, then turned into a Python list
on every rank), side by side in the same 2 gloo ranks.

Each rank scores its share of a 50,000-image val set at 64 ranks: 782 samples in 7 batches of 112 (as
``../shared/notes/scale/eval_scale.py`` measured the old design), logits ~N(0, 1) with the true class boosted on
70 % of the samples. Per class count and design, interleaved A B, B A over the repeats: the wall time of the
updates and of ``compute()`` (the collectives included) and the peak RSS above the start of the eval on each
rank (sampled every 5 ms, after ``malloc_trim``); medians over the repeats. The old design is run up to
``--old-max-classes`` (default 5,000: at 21,841 classes it needs ~7.6 GB per rank, more than this machine
holds for 2 ranks); above it its figures are projected from the largest size run (C^2 fit). Run:

    python bench/eval_scale.py --classes 50 1000 5000 21841 --repeats 2

Prints one JSON line per (design, classes) and a markdown table; per-rank figures are ``[rank0, rank1]``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import time

from common import Peak, abba, free_port, machine_line, table

SAMPLES, BATCH = 782, 112  # one rank's share of 50,000 images at 64 ranks


class OldEvalAccumulator:
    """The accumulator before this change (tldist/evaluate.py at 502006e), kept here as the baseline."""

    def __init__(self, num_classes: int, device="cpu"):
        import torch

        self.num_classes = num_classes
        self.totals = torch.zeros(4, dtype=torch.float64, device=device)
        self.class_hits = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.class_count = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)

    def update(self, logits, labels, mask=None):
        import torch

        if mask is not None:
            logits, labels = logits[mask], labels[mask]
        logits = logits.float()
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = topk == labels[:, None]
        pred = topk[:, 0]
        self.totals += torch.stack([loss.double(), hit[:, 0].sum().double(), hit.any(1).sum().double(),
                                    torch.tensor(float(labels.numel()), dtype=torch.float64)])
        ones = torch.ones_like(labels, dtype=torch.float64)
        self.class_count.index_add_(0, labels, ones)
        self.class_hits.index_add_(0, labels, hit[:, 0].double())
        self.confusion.index_put_((labels, pred), ones, accumulate=True)

    def compute(self):
        import torch
        import torch.distributed as dist

        for t in (self.totals, self.class_hits, self.class_count, self.confusion):
            dist.all_reduce(t)
        loss_sum, top1, top5, n = self.totals.tolist()
        n_safe = max(n, 1.0)
        per_class = torch.where(self.class_count > 0, self.class_hits / self.class_count.clamp(min=1),
                                torch.full_like(self.class_hits, float("nan"))).tolist()
        return {"loss": loss_sum / n_safe, "top1": 100.0 * top1 / n_safe, "top5": 100.0 * top5 / n_safe,
                "count": int(n), "per_class_acc": per_class, "confusion": self.confusion.long().tolist()}


def batches(classes: int, rank: int):
    import torch

    g = torch.Generator().manual_seed(1000 * rank + classes)
    done = 0
    while done < SAMPLES:
        n = min(BATCH, SAMPLES - done)
        labels = torch.randint(0, classes, (n,), generator=g)
        logits = torch.randn(n, classes, generator=g)
        right = torch.rand(n, generator=g) < 0.7
        logits[right, labels[right]] += 5.0
        yield logits, labels
        done += n


def run_eval(design: str, classes: int, rank: int) -> dict:
    import torch.distributed as dist

    from tldist.evaluate import EvalAccumulator

    dist.barrier()
    with Peak() as p:
        acc = OldEvalAccumulator(classes) if design == "old" else EvalAccumulator(classes)
        t0 = time.perf_counter()
        for logits, labels in batches(classes, rank):
            acc.update(logits, labels)
        t1 = time.perf_counter()
        r = acc.compute()
        t2 = time.perf_counter()
    out = {"update_s": t1 - t0, "compute_s": t2 - t1, "total_s": p.dt, "peak_extra_mb": p.peak - p.base,
           "top1": r["top1"], "count": r["count"], "confusion": r["confusion"] is not None}
    del acc, r
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return out


def worker(rank: int, world: int, port: int, classes_list: list[int], repeats: int, old_max: int) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for classes in classes_list:
        designs = ["old", "new"] if classes <= old_max else ["new"]
        figures: dict[str, list[dict]] = {d: [] for d in designs}
        for _, design in abba(designs, repeats):
            figures[design].append(run_eval(design, classes, rank))
        for design, runs in figures.items():
            row = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in ("update_s", "compute_s", "total_s",
                                                                            "peak_extra_mb")}
            row.update(top1=runs[0]["top1"], count=runs[0]["count"], confusion=runs[0]["confusion"])
            gathered = [None] * world
            dist.all_gather_object(gathered, row)
            if rank == 0:
                merged = {"design": design, "classes": classes, "world": world, "samples": gathered[0]["count"],
                          "top1": round(gathered[0]["top1"], 3),
                          "confusion_on_rank": [g["confusion"] for g in gathered],
                          **{k: [round(g[k], 3 if k.endswith("_s") else 1) for g in gathered]
                             for k in ("update_s", "compute_s", "total_s", "peak_extra_mb")}}
                print(json.dumps(merged), flush=True)
        dist.barrier()
    dist.destroy_process_group()


def report(lines: list[dict], classes_list: list[int], old_max: int) -> str:
    """The markdown table: the two designs side by side per class count (projected where not run)."""
    by = {(r["design"], r["classes"]): r for r in lines}
    measured_old = [c for c in classes_list if ("old", c) in by]
    rows = []
    for c in classes_list:
        new = by[("new", c)]
        if ("old", c) in by:
            old = by[("old", c)]
            old_mem = "/".join(f"{v:.0f}" for v in old["peak_extra_mb"])
            old_time = f"{max(old['total_s']):.2f}"
        elif measured_old:  # C^2 fit through the largest size run
            ref = by[("old", measured_old[-1])]
            k = (c / measured_old[-1]) ** 2
            old_mem = f"~{max(ref['peak_extra_mb']) * k:,.0f} (projected)"
            old_time = f"~{max(ref['total_s']) * k:.0f} (projected)"
        else:
            old_mem = old_time = "not run"
        rows.append([f"{c:,}", old_mem, "/".join(f"{v:.0f}" for v in new["peak_extra_mb"]), old_time,
                     f"{max(new['total_s']):.2f}", f"{max(new['compute_s']):.3f}",
                     "rank 0" if new["confusion_on_rank"][0] else "none"])
    return table(["classes", "old: peak MB r0/r1", "new: peak MB r0/r1", "old: s", "new: s", "new: compute s",
                  "new: dense matrix"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[50, 1000, 5000, 21841])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--old-max-classes", type=int, default=5000,
                    help="largest class count the old (dense, every rank) design is run at")
    a = ap.parse_args()
    import subprocess

    print(machine_line())
    print(f"# python bench/eval_scale.py --classes {' '.join(map(str, a.classes))} --repeats {a.repeats} "
          f"--old-max-classes {a.old_max_classes}", flush=True)
    # the ranks print one JSON line per (design, classes); run them in a child to collect those lines
    proc = subprocess.run([sys.executable, __file__, "--_ranks", json.dumps([a.classes, a.repeats, a.old_max_classes])],
                          capture_output=True, text=True)
    sys.stderr.write(proc.stderr[-3000:])
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for line in lines:
        print(json.dumps(line))
    if proc.returncode != 0:
        sys.exit(proc.returncode)
    print()
    print(report(lines, a.classes, a.old_max_classes))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--_ranks":
        import torch.multiprocessing as mp

        classes, repeats, old_max = json.loads(sys.argv[2])
        mp.spawn(worker, args=(2, free_port(), classes, repeats, old_max), nprocs=2)
    else:
        main()
