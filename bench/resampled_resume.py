"""Resuming in ``data.resampled`` mode: time to the first record at a stream position, before and after.

Before (tldist at commit b0ce059): a slot's resampled stream was a chain of whole-shard draws, so finding
position ``p`` summed the counts of every draw since the start (``SlotStream._resampled_records``), each draw
costing one ``Generator.choice`` over all shards. After: a partition stream is a sequence of fixed-length
visits (:class:`tldist.data.stream.PartitionStream`), so position ``p`` is visit ``p // V``, found in O(1).

The set: ``--shards`` shards of 1,000 samples each (the manifest view); every URL points at one real tar
of 1,000 tiny samples, so the first record is really read. Positions are whole stream-epochs of one of
8 slots (1 rank x 8 workers before; one of 240 partitions after, the default). Needs the old tree:

    git worktree add --detach /tmp/tldist-b0ce059 b0ce059
    python bench/resampled_resume.py --old-tree /tmp/tldist-b0ce059 --shards 1000 10000 --epochs 0 5 50

Each (shards, epoch) cell runs both in fresh subprocesses, interleaved, ``--repeats`` times (median).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

from common import DEFAULT_ROOT, REPO, machine_line, table

PER_SHARD = 1000
OLD_SLOTS = 8


def make_tar(path: Path) -> None:
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(PER_SHARD):
            for ext, data in (("jpg", b"\xff\xd8x"), ("cls", b"0")):
                info = tarfile.TarInfo(f"s{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


PROBE = r"""
import sys, time, json
sys.path.insert(0, {tree!r})
t0 = time.perf_counter()
from tldist.data.stream import SourceSpec
src = SourceSpec("bench", tuple([{tar!r}] * {shards}), tuple([{per}] * {shards}))
epochs = {epochs}
if {old}:
    from tldist.data.stream import SlotStream
    s = SlotStream(src, 0, {slots}, seed=0, block_size=1000 // {slots} + 1, resampled=True)
    start = epochs * s.length
    t1 = time.perf_counter()
    pos, rec = next(s.records(start))
else:
    from tldist.data.stream import PartitionStream
    parts = 240
    s = PartitionStream(src, 0, parts, seed=0, block=-(-1000 // parts), resampled=True)
    start = epochs * s.length
    t1 = time.perf_counter()
    pos, rec = next(s.records(start))
t2 = time.perf_counter()
assert pos == start and rec.ok, (pos, start, rec)
print(json.dumps({{"seek_s": t2 - t1, "position": start}}))
"""


def probe(python: str, tree: str, tar: Path, shards: int, epochs: int, old: bool) -> dict:
    code = PROBE.format(tree=tree, tar=str(tar), shards=shards, per=PER_SHARD, epochs=epochs, old=old,
                        slots=OLD_SLOTS)
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-tree", required=True, help="a checkout of commit b0ce059 (git worktree add ...)")
    ap.add_argument("--shards", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--epochs", type=int, nargs="+", default=[0, 5, 50])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    tar = DEFAULT_ROOT / "resampled_resume" / "shard.tar"
    make_tar(tar)
    print(machine_line())
    print(f"# python bench/resampled_resume.py --old-tree {a.old_tree} --shards {' '.join(map(str, a.shards))} "
          f"--epochs {' '.join(map(str, a.epochs))} --repeats {a.repeats}", flush=True)
    rows = []
    for shards in a.shards:
        for epochs in a.epochs:
            old, new = [], []
            for _ in range(a.repeats):  # interleaved
                old.append(probe(sys.executable, a.old_tree, tar, shards, epochs, True)["seek_s"])
                new.append(probe(sys.executable, str(REPO), tar, shards, epochs, False)["seek_s"])
            o, n = sorted(old)[len(old) // 2], sorted(new)[len(new) // 2]
            row = {"shards": shards, "epochs": epochs, "before_s": round(o, 4), "after_s": round(n, 4),
                   "ratio": round(o / n, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(table(["shards", "stream-epochs", "before: to first record (s)", "after (s)", "before / after"],
                [[r["shards"], r["epochs"], r["before_s"], r["after_s"], r["ratio"]] for r in rows]))


if __name__ == "__main__":
    main()
