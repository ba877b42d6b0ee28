"""Costs that should stay flat as the data grows (issue 25), before and after, side by side in one run.

Each probe runs in a fresh subprocess against a source tree: ``--old-tree`` (tldist at commit b0ce059, the
design before) and this checkout, interleaved, ``--repeats`` times (median); peak RSS is sampled every
10 ms above the probe's start (after imports).

* ``ingest``: ``tldist shards imagefolder SRC OUT --part 0/8`` on trees of tiny PNG files (100 classes): peak
  memory of the part and the time until its first shard is staged. Before, every part listed, ``stat``-ed
  and planned the whole tree first; after, a part lists names twice (no ``stat``) and keeps only its share.
* ``verify``: ``tldist shards verify --no-decode`` of a set of tiny samples: peak memory (before: a dict of
  every key; after: 12 bytes per key).
* ``subset``: ``tldist shards subset`` with 5 labels per class: peak memory (before: every key by class;
  after: O(classes x k)).
* ``pseudo``: ``tldist pseudo-label``'s selection over ``N`` confident candidates on 2 gloo ranks, capped per
  class: peak memory per rank (before: every rank all-gathered every candidate and sorted them all; after:
  per-class counts and bisected cut-offs are all-reduced, no candidate leaves its rank).
* ``resume``: bytes transferred to reach sample ``p`` of a 4,096-sample shard read as a stream (an
  ``http(s)://``, ``s3://`` or ``pipe:`` shard: skipping is reading). Before: everything from the start;
  after: from the nearest seek-index entry of the manifest (an HTTP Range request / ranged GET). On local
  files both seek over member data; the index then saves the header reads (512 B per member).

    git worktree add --detach /tmp/tldist-b0ce059 b0ce059
    python bench/flat_costs.py --old-tree /tmp/tldist-b0ce059 ingest --files 10000 50000 200000
    python bench/flat_costs.py --old-tree /tmp/tldist-b0ce059 verify subset --samples 100000 400000 1600000
    python bench/flat_costs.py --old-tree /tmp/tldist-b0ce059 resume pseudo --candidates 100000 400000 1600000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from common import DEFAULT_ROOT, REPO, machine_line, table

ROOT = DEFAULT_ROOT / "flat_costs"
PNG = None  # one tiny image, made once


def tiny_png() -> bytes:
    global PNG
    if PNG is None:
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, "PNG")
        PNG = buf.getvalue()
    return PNG


def make_tree(n: int, classes: int = 100) -> Path:
    root = ROOT / f"tree_{n}"
    if (root / ".done").exists():
        return root
    data = tiny_png()
    for i in range(n):
        d = root / f"class{i % classes:03d}"
        if i < classes:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"img{i:08d}.png").write_bytes(data)
    (root / ".done").write_text("")
    return root


def make_set(n: int, classes: int = 100, per_shard: int = 10000) -> Path:
    """A shard set of ``n`` tiny samples (tiny JPEG-looking bytes + .cls) with a tldist manifest, written
    with tarfile directly (fast)."""
    root = ROOT / f"set_{n}"
    if (root / "manifest.json").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, n, per_shard):
        name = f"train-{s // per_shard:06d}.tar"
        with tarfile.open(root / name, "w") as tar:
            for i in range(s, min(n, s + per_shard)):
                for ext, data in (("png", tiny_png()), ("cls", str(i % classes).encode())):
                    info = tarfile.TarInfo(f"k{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append({"name": name, "num_samples": min(n, s + per_shard) - s})
    manifest = {"format_version": 1, "split": "train", "classes": [f"c{i}" for i in range(classes)],
                "shards": shards, "meta": {}, "num_samples": n}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


PROBE = r"""
import os, sys, threading, time, json
sys.path.insert(0, {tree!r})
PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20
from tldist.cli import main as cli_main  # imports first: the probe measures the work, not the imports
import tldist.data.ingest, tldist.data.verify, tldist.data.subset  # noqa
base = peak = rss()
stop = False
first = [None]
stage = {stage!r}
t0 = time.perf_counter()
def sample():
    global peak
    while not stop:
        peak = max(peak, rss())
        if stage and first[0] is None and os.path.isdir(stage) and any(
                n.endswith(".tar") for n in os.listdir(stage)):
            first[0] = time.perf_counter() - t0
        time.sleep(0.01)
th = threading.Thread(target=sample, daemon=True); th.start()
try:
    cli_main({argv!r})
except SystemExit:
    pass
stop = True; th.join()
print(json.dumps({{"peak_mb": max(peak, rss()) - base, "seconds": time.perf_counter() - t0,
                  "first_shard_s": first[0]}}))
"""


def probe(tree: str, argv: list[str], stage: str = "") -> dict:
    if stage:  # a fresh output every time: a staged shard of an earlier repeat would be kept, not written
        subprocess.run(["rm", "-rf", str(Path(stage).parents[1])])
    code = PROBE.format(tree=tree, argv=argv, stage=stage)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": tree}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"probe failed: {argv}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def side_by_side(old: str, argv_for, repeats: int, stage_for=lambda tree: "") -> dict:
    res = {"before": [], "after": []}
    for _ in range(repeats):
        for name, tree in (("before", old), ("after", str(REPO))):
            res[name].append(probe(tree, argv_for(name), stage_for(name)))
    med = lambda rows, k: sorted(r[k] for r in rows if r[k] is not None)[len(rows) // 2] if any(  # noqa: E731
        r[k] is not None for r in rows) else None
    return {name: {k: med(rows, k) for k in rows[0]} for name, rows in res.items()}


def bench_ingest(a) -> None:
    rows = []
    for n in a.files:
        src = make_tree(n)
        out = ROOT / "ingest_out"

        def argv(name, n=n):
            return ["shards", "imagefolder", str(src), str(out / name / str(n)), "--part", "0/8", "--workers", "1",
                    "--max-count", "1000", "--check", "none", "--no-progress"]

        r = side_by_side(a.old_tree, argv, a.repeats, lambda name, n=n: str(out / name / str(n) / "train" / ".ingest"))
        for name in ("before", "after"):
            subprocess.run(["rm", "-rf", str(out / name)])
        print(json.dumps({"probe": "ingest", "files": n, **r}), flush=True)
        rows.append([n, f"{r['before']['peak_mb']:.0f}", f"{r['after']['peak_mb']:.0f}",
                     f"{r['before']['first_shard_s']:.1f}", f"{r['after']['first_shard_s']:.1f}",
                     f"{r['before']['seconds']:.1f}", f"{r['after']['seconds']:.1f}"])
    print(table(["files", "peak MB before", "after", "first shard s before", "after", "part 0/8 total s before",
                 "after"], rows))


def bench_per_sample(a, kind: str) -> None:
    rows = []
    for n in a.samples:
        src = make_set(n)
        out = ROOT / "subset_out"

        def argv(name, n=n):
            if kind == "verify":
                return ["shards", "verify", str(src), "--no-decode"]
            return ["shards", "subset", str(src), str(out / name / str(n)), "--labels-per-class", "5"]

        r = side_by_side(a.old_tree, argv, a.repeats)
        subprocess.run(["rm", "-rf", str(out)])
        print(json.dumps({"probe": kind, "samples": n, **r}), flush=True)
        rows.append([n, f"{r['before']['peak_mb']:.0f}", f"{r['after']['peak_mb']:.0f}",
                     f"{r['before']['seconds']:.1f}", f"{r['after']['seconds']:.1f}"])
    print(table(["samples", f"{kind} peak MB before", "after", "seconds before", "after"], rows))


RESUME = r"""
import sys, json
sys.path.insert(0, {repo!r})
from tldist.data import retry, stream
from tldist.data.manifest import load_manifest
read = [0]
real_open = retry.open_shard
class Counting:
    def __init__(self, f): self.f = f
    def read(self, n=-1):
        b = self.f.read(n); read[0] += len(b); return b
    def close(self): self.f.close()
def counting_open(url, offset=0):
    return Counting(real_open(url, offset))
stream.open_shard = counting_open
m = load_manifest({src!r})
url, info = m.shard_urls()[0], m.shards[0]
out = {{}}
for p in {positions!r}:
    for label, offsets in (("before", ()), ("after", info.offsets)):
        read[0] = 0
        recs = list(stream.read_shard(url, p, 1, offsets=offsets))
        assert recs[0].ok
        out.setdefault(str(p), {{}})[label] = read[0]
print(json.dumps(out))
"""


def bench_resume(a) -> None:
    """Bytes read to reach sample p: the same read_shard with and without the seek index (the old reader read
    every byte up to p)."""
    from tldist.data.sources import Sample
    from tldist.data.writer import write_shards

    src = ROOT / "resume_set"
    if not (src / "manifest.json").exists():
        rng_bytes = os.urandom
        samples = [Sample(f"k{i:06d}", tiny_png() + rng_bytes(20_000), "png", i % 4) for i in range(4096)]
        write_shards(samples, src, "train", ["a", "b", "c", "d"], max_count=None, max_size=None, check="none")
    positions = [0, 100, 1000, 2000, 4000]
    code = RESUME.format(repo=str(REPO), src=str(src), positions=positions)
    got = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True).stdout.strip().splitlines()[-1])
    rows = [[p, f"{got[str(p)]['before'] / 2**20:.1f}", f"{got[str(p)]['after'] / 2**20:.2f}"] for p in positions]
    print(json.dumps({"probe": "resume", "bytes": got}))
    print(table(["resume at sample p of a 4,096-sample streamed shard (20 KB samples)", "MB transferred before",
                 "after"], rows))


PSEUDO = r"""
import json, os, random, sys, threading, time
import torch.distributed as dist
import torch.multiprocessing as mp
PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20
def old_select(local, num_classes, cap):  # the design before: every rank gathers every candidate
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    cands = sorted((c for p in parts for c in p), key=lambda c: c[0])
    by_class = [[] for _ in range(num_classes)]
    for c in cands:
        by_class[c[1]].append(c)
    kept = []
    for rows in by_class:
        rows.sort(key=lambda c: (-c[2], c[0]))
        kept.extend(rows[:cap])
    return kept
def worker(rank, port, n, mode, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from tldist.adapt.pseudo_label import select
    rng = random.Random(rank)
    local = [(f"k{rank}_{i:09d}", rng.randrange(1000), rng.random(), -1) for i in range(n // 2)]
    base = peak = rss(); stop = False
    def sample():
        nonlocal peak
        while not stop:
            peak = max(peak, rss()); time.sleep(0.005)
    th = threading.Thread(target=sample, daemon=True); th.start()
    t0 = time.perf_counter()
    if mode == "before":
        kept = [c for c in old_select(local, 1000, 100) if c[0].startswith(f"k{rank}_")]
    else:
        kept, _ = select(local, 1000, balance=False, max_per_class=100)
    dt = time.perf_counter() - t0
    stop = True; th.join()
    out[rank] = {"peak_mb": max(peak, rss()) - base, "seconds": dt, "kept": len(kept)}
    dist.destroy_process_group()
if __name__ == "__main__":
    n, mode, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    out = mp.get_context("spawn").Manager().dict()
    mp.spawn(worker, args=(port, n, mode, out), nprocs=2)
    print(json.dumps({"peak_mb": [out[0]["peak_mb"], out[1]["peak_mb"]], "seconds": max(out[0]["seconds"], out[1]["seconds"]),
                      "kept": out[0]["kept"] + out[1]["kept"]}))
"""


def bench_pseudo(a) -> None:
    from common import free_port

    script = ROOT / "pseudo_probe.py"
    script.write_text(PSEUDO)
    rows = []
    for n in a.candidates:
        res = {"before": [], "after": []}
        for _ in range(a.repeats):
            for mode in ("before", "after"):
                env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
                out = subprocess.run([sys.executable, str(script), str(n), mode, str(free_port())], capture_output=True,
                                     text=True, env=env)
                if out.returncode:
                    raise SystemExit(out.stderr[-2000:])
                res[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
        med = {m: sorted(r, key=lambda x: max(x["peak_mb"]))[len(r) // 2] for m, r in res.items()}
        assert med["before"]["kept"] == med["after"]["kept"], med
        print(json.dumps({"probe": "pseudo", "candidates": n, **med}), flush=True)
        rows.append([n, "/".join(f"{v:.0f}" for v in med["before"]["peak_mb"]),
                     "/".join(f"{v:.0f}" for v in med["after"]["peak_mb"]),
                     f"{med['before']['seconds']:.2f}", f"{med['after']['seconds']:.2f}"])
    print(table(["candidates (2 ranks, 1,000 classes, cap 100)", "peak MB per rank before", "after",
                 "seconds before", "after"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("probes", nargs="+", choices=("ingest", "verify", "subset", "resume", "pseudo"))
    ap.add_argument("--old-tree", required=True)
    ap.add_argument("--files", type=int, nargs="+", default=[10000, 50000, 200000])
    ap.add_argument("--samples", type=int, nargs="+", default=[100000, 400000, 1600000])
    ap.add_argument("--candidates", type=int, nargs="+", default=[100000, 400000, 1600000])
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    ROOT.mkdir(parents=True, exist_ok=True)
    print(machine_line())
    print("# python bench/flat_costs.py " + " ".join(sys.argv[1:]), flush=True)
    for p in a.probes:
        if p == "ingest":
            bench_ingest(a)
        elif p == "resume":
            bench_resume(a)
        elif p == "pseudo":
            bench_pseudo(a)
        else:
            bench_per_sample(a, p)


if __name__ == "__main__":
    main()
