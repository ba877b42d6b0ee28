"""Shard-writing throughput (``tldist shards imagefolder --workers N``) and what each ``--check`` level costs and catches.

Part 1, write: the benchmark JPEGs (``bench/make_images.py``, 3,000 x ~23 KB, shorter side 256 px)
written as shards by the planned writer at ``--workers 1`` and ``2`` for ``--check header`` (the
default), ``--check decode`` and ``resize160`` (``--max-side 160``: decode, resize, re-encode every
image; CPU-bound, so it shows the scaling with processes best), interleaved (A B B A...) and repeated; images/s and the ratio to
1 worker; images per CPU-second (this process + the workers: on a machine shared with other
jobs the wall-clock rate follows their load, CPU time per image does not, so an unchanged per-CPU
rate at N workers means throughput grows with the cores the job gets), plus a byte-for-byte comparison of the outputs (shards + manifest) across worker counts.

Part 2, checks: per-image cost of each check level on the same JPEGs (one process, in-memory bytes,
so file reads are excluded), and which level flags each corrupt/odd file (truncated JPEG, garbage,
cut PNG, empty, 16-bit PNG, CMYK JPEG, EXIF-rotated JPEG, bit-flipped JPEG). Usage::

    python bench/ingest.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the repo on sys.path)
from common import DEFAULT_ROOT, abba, fmt_ms, machine_line, table


def _odd_files() -> dict[str, bytes]:
    sys.path.insert(0, str(common.REPO / "tests"))
    from test_ingest import odd_files, photo

    files = odd_files()
    good = bytearray(photo(95, 64))
    for i in range(len(good) // 3, len(good) // 3 + 40):  # corrupt entropy data, file complete
        good[i] ^= 0x5A
    files["bitflip.jpg"] = bytes(good)
    return files


def bench_writes(images: Path, repeats: int, workers: list[int], checks: list[str]) -> tuple[str, str]:
    from tldist.data.ingest import write_planned
    from tldist.data.sources import samples_from_imagefolder

    classes, samples = samples_from_imagefolder(images)
    variants = [f"{c}/{w}" for c in checks for w in workers]
    rate: dict[str, list[float]] = {v: [] for v in variants}
    per_cpu: dict[str, list[float]] = {v: [] for v in variants}  # images per CPU-second (this + worker processes)
    tmp = Path(tempfile.mkdtemp(prefix="ingest_bench_"))
    outputs: dict[str, dict[str, bytes]] = {}
    try:
        for _, v in abba(variants, repeats):
            check, w = v.split("/")
            out = tmp / v.replace("/", "_")
            shutil.rmtree(out, ignore_errors=True)
            kw = {"check": "header", "max_side": 160} if check == "resize160" else {"check": check}
            c0, t0 = os.times(), time.perf_counter()
            write_planned(samples, out, "train", classes, min_shards=16, workers=int(w), **kw)
            rate[v].append(len(samples) / (time.perf_counter() - t0))
            c1 = os.times()  # the pool's processes are joined (reaped) when write_planned returns
            cpu = sum(getattr(c1, f) - getattr(c0, f) for f in ("user", "system", "children_user", "children_system"))
            per_cpu[v].append(len(samples) / cpu)
            outputs[v] = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for v in variants:
        check, w = v.split("/")
        base = rate[f"{check}/{workers[0]}"]
        ratios = [a / b for a, b in zip(rate[v], base)]
        cpu_ratios = [a / b for a, b in zip(per_cpu[v], per_cpu[f"{check}/{workers[0]}"])]
        same = outputs[v] == outputs[f"{check}/{workers[0]}"]
        rows.append([check, w, fmt_ms(rate[v], 0), fmt_ms(ratios), fmt_ms(per_cpu[v], 0), fmt_ms(cpu_ratios),
                     "yes" if same else "NO"])
    return table(["--check", "workers", "images/s (wall)", f"x {workers[0]} worker", "images per CPU-s",
                  f"x {workers[0]} worker", "bytes identical"], rows), \
        f"{len(samples)} images, {repeats} repeats"


def bench_checks(images: Path, n: int, repeats: int) -> tuple[str, str]:
    from tldist.data.sources import Sample
    from tldist.data.writer import CHECKS, DECODERS, SkipSample as _Skip, prepare_image as _prepare

    files = sorted(images.rglob("*.jpg"))[:n]
    blobs = [p.read_bytes() for p in files]
    levels = [c for c in CHECKS]
    per: dict[str, list[float]] = {c: [] for c in levels}
    for c in levels:  # warm up: imports, decoder initialisation
        for i, b in enumerate(blobs[:20]):
            _prepare(Sample(f"k{i}", b, "jpg", 0), None, 90, 0, c, list(DECODERS))
    for _, c in abba(levels, repeats):
        t0 = time.perf_counter()
        for i, b in enumerate(blobs):
            _prepare(Sample(f"k{i}", b, "jpg", 0), None, 90, 0, c, list(DECODERS))
        per[c].append((time.perf_counter() - t0) / len(blobs) * 1e6)
    odd = _odd_files()
    caught: dict[str, list[str]] = {c: [] for c in levels}
    for name, data in odd.items():
        for c in levels:
            try:
                _prepare(Sample("k", data, Path(name).suffix[1:], 0), None, 90, 0, c, list(DECODERS))
            except _Skip:
                caught[c].append(name)
    none_us = sorted(per["none"])[len(per["none"]) // 2]
    rows = []
    for c in levels:
        med = sorted(per[c])[len(per[c]) // 2]
        rows.append([c, fmt_ms(per[c], 0), f"{med - none_us:.0f}", ", ".join(caught[c]) or "-",
                     ", ".join(k for k in odd if k not in caught[c]) or "-"])
    return table(["--check", "us/image", "us/image over none", "flags", "passes"], rows), \
        f"{len(blobs)} images in memory, {repeats} repeats; decode = both decoders (pil + torchvision)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="the 200-image set, 1 repeat")
    a = p.parse_args(argv)
    from make_images import make_images

    root = DEFAULT_ROOT / ("images256_quick" if a.quick else "images256")
    info = make_images(root, 200 if a.quick else 3000, verbose=False)
    repeats = 1 if a.quick else a.repeats
    print(machine_line())
    t, note = bench_checks(Path(info["images"]), 200 if a.quick else 1000, repeats)
    print(f"\ncheck levels ({note})\n{t}")
    t, note = bench_writes(Path(info["images"]), repeats, [1, 2], ["header", "decode", "resize160"])
    print(f"\nwrite throughput ({note})\n{t}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
