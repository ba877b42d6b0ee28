"""tldist vs the streaming peers, side by side: MDSWriter/StreamingDataset (mosaicml-streaming) and litdata.

On the loader benchmark's JPEGs (``bench/make_images.py``: 3,000 x ~23 KB, shorter side 256 px):

* **ingest** images/s writing the JPEG bytes + label as each tool's shards, at 1 and 2 processes:
  tldist ``write_planned`` (``--workers N``; ``--check header``, its default, and ``none``);
  streaming ``MDSWriter`` (one writer per process on a slice of the list, then ``merge_index``: its
  documented parallel conversion); ``litdata.optimize(num_workers=N)``. Timed inside the process,
  from the listed files to the finished dataset (interpreter start, imports and the directory
  listing excluded; tldist's shard planning, which stats every file, included). Neither peer
  checks the images; ``tldist-none`` (``--check none``) is the like-for-like row.
* **load** train-loader images/s, every loader doing the same per-sample work: tldist's PIL decode +
  ``TrainTransform`` (RandomResizedCrop 224 + flip, uint8 out; imported from tldist by the peers),
  batch 64, 2 workers, shuffled; each in its recommended setup (tldist ``build_train_loader`` as the
  trainer builds it; ``StreamingDataset(batch_size=B)`` + ``StreamingDataLoader``; litdata
  ``StreamingDataset`` + ``StreamingDataLoader``). Warm-up batches untimed.
* **resume** ``state_dict()`` after 90 % of an epoch, then a new loader in a new process:
  seconds from constructing it (+ ``load_state_dict``) to its first batch, and whether the resumed
  batches (sample ids, in order) equal the uninterrupted run's.

Peers have conflicting pins, so each gets its own virtual environment under ``--root`` (``pip install
torch==2.14.1 torchvision==0.29.1 <peer>``; torch comes from the local disk); install time, size and
versions are recorded, and an install failure is printed verbatim. Usage::

    python bench/peers.py [--repeats 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEERS = {"streaming": "mosaicml-streaming", "litdata": "litdata"}
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
SIZE = 224


# ------------------------------------------------------------------------------------ inside one tool's venv
def _files(images: str) -> list[tuple[str, int, int]]:
    classes = sorted(p.name for p in Path(images).iterdir() if p.is_dir())
    files = [(str(p), c) for c, name in enumerate(classes) for p in sorted((Path(images) / name).glob("*.jpg"))]
    random.Random(0).shuffle(files)
    return [(p, c, i) for i, (p, c) in enumerate(files)]


def _sample(item: tuple[str, int, int]) -> dict:
    path, label, idx = item
    return {"image": Path(path).read_bytes(), "label": label, "idx": idx}


def _mds_part(args: tuple[str, list]) -> None:
    from streaming import MDSWriter

    out, items = args
    with MDSWriter(out=out, columns={"image": "bytes", "label": "int", "idx": "int"}, size_limit="64mb") as w:
        for it in items:
            w.write(_sample(it))


def ingest(tool: str, images: str, out: str, procs: int, check: str = "header") -> float:
    """Seconds to write ``images`` as ``tool``'s dataset at ``out`` with ``procs`` processes."""
    shutil.rmtree(out, ignore_errors=True)
    items = _files(images)
    if tool == "tldist":  # imports and the file listing outside the timed window, for every tool
        from tldist.data.ingest import write_planned
        from tldist.data.sources import samples_from_imagefolder

        classes, samples = samples_from_imagefolder(images)
    elif tool == "streaming":
        from streaming import MDSWriter  # noqa: F401
        from streaming.base.util import merge_index
    else:
        import litdata
    t0 = time.perf_counter()
    if tool == "tldist":
        write_planned(samples, out, "train", classes, min_shards=16, workers=procs, check=check)
    elif tool == "streaming":
        if procs == 1:
            _mds_part((out, items))
        else:
            from multiprocessing import get_context

            parts = [(f"{out}/part{r}", items[r::procs]) for r in range(procs)]
            with get_context("fork").Pool(procs) as pool:
                pool.map(_mds_part, parts)
            merge_index(out, keep_local=True)
    elif tool == "litdata":
        litdata.optimize(fn=_sample, inputs=items, output_dir=out, num_workers=procs, chunk_bytes="64MB",
                         mode="overwrite")
    return time.perf_counter() - t0


def _transform():
    sys.path.insert(0, str(REPO))
    from tldist.data.transforms import build_train_transform, decode_image

    t = build_train_transform(SIZE)
    return lambda data, seed: t(decode_image(data, "pil"), random.Random(seed))


def _imports(tool: str) -> None:
    """Import a tool's loader modules (kept out of timed windows)."""
    sys.path.insert(0, str(REPO))
    import tldist.data.transforms  # noqa: F401
    if tool == "tldist":
        import tldist.data.pipeline  # noqa: F401
    elif tool == "streaming":
        import streaming  # noqa: F401
    else:
        import litdata  # noqa: F401


def make_loader(tool: str, data: str, batch: int, workers: int, seed: int):
    """(loader, batches per epoch, ids-of-batch function) in the tool's recommended setup."""
    import torch

    if tool == "tldist":
        sys.path.insert(0, str(REPO))
        from tldist.config import DataConfig
        from tldist.data.pipeline import build_train_loader
        from tldist.world import World

        cfg = DataConfig(train=[data], batch_size=batch, num_workers=workers, decode="pil", seed=seed)
        loader = build_train_loader(cfg, World(), image_size=SIZE, recycle_batches=True)
        return loader, loader.steps_per_epoch, lambda b: list(b["key"])
    tf = _transform()
    if tool == "streaming":
        from streaming import StreamingDataLoader, StreamingDataset
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()

        class DS(StreamingDataset):
            def __getitem__(self, i):
                s = super().__getitem__(i)
                return {"image": tf(s["image"], seed * 100003 + int(s["idx"])), "label": s["label"], "idx": s["idx"]}

        ds = DS(local=data, shuffle=True, shuffle_seed=seed, batch_size=batch)
        loader = StreamingDataLoader(ds, batch_size=batch, num_workers=workers, drop_last=True)
    else:
        from litdata import StreamingDataLoader, StreamingDataset

        class DS(StreamingDataset):
            def __getitem__(self, i):
                s = super().__getitem__(i)
                return {"image": tf(s["image"], seed * 100003 + int(s["idx"])), "label": s["label"], "idx": s["idx"]}

        ds = DS(input_dir=data, shuffle=True, seed=seed, drop_last=True)
        loader = StreamingDataLoader(ds, batch_size=batch, num_workers=workers, drop_last=True)
    torch.set_num_threads(1)
    return loader, len(loader), lambda b: [int(x) for x in b["idx"]]


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of this process and ``pids`` (Linux /proc)."""
    total = time.process_time()
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def _children() -> list[int]:
    """Pids of this process's child processes (the loader workers), from /proc."""
    me, kids = str(os.getpid()), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[1] == me:
                kids.append(int(stat.parent.name))
        except (OSError, IndexError):
            pass
    return kids


def load(tool: str, data: str, batch: int, workers: int, warmup: int, batches: int, seed: int) -> list[float]:
    """[images/s (wall), images per CPU-second of the consumer + loader workers]."""
    _imports(tool)
    loader, _, _ = make_loader(tool, data, batch, workers, seed)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    pids = _children()
    c0, t0, n = _cpu_seconds(pids), time.perf_counter(), 0
    for _ in range(batches):
        n += next(it)["image"].shape[0]
    rates = [n / (time.perf_counter() - t0), n / (_cpu_seconds(pids) - c0)]
    if hasattr(loader, "close"):
        loader.close()
    return rates


def resume(tool: str, data: str, batch: int, workers: int, seed: int, state: str, phase: str) -> dict:
    """phase 'run': consume 90 % of an epoch, save state, record the rest; 'resume': load state, time the
    first batch, record the rest."""
    import pickle

    _imports(tool)
    t0 = time.perf_counter()
    loader, per_epoch, ids = make_loader(tool, data, batch, workers, seed)
    at = int(per_epoch * 0.9)
    if phase == "resume":
        with open(state, "rb") as f:
            loader.load_state_dict(pickle.load(f))
        it = iter(loader)
        rest = [ids(next(it))]
        first = time.perf_counter() - t0
    else:
        it = iter(loader)
        next(it)
        first = time.perf_counter() - t0  # a fresh start, for comparison
        for _ in range(at - 1):
            next(it)
        with open(state, "wb") as f:
            pickle.dump(loader.state_dict(), f)
        rest = [ids(next(it))]
    for _ in range(per_epoch - at - 1):
        rest.append(ids(next(it)))
    if hasattr(loader, "close"):
        loader.close()
    return {"first_batch_s": first, "rest": rest, "at": at, "per_epoch": per_epoch}


def worker_main(argv: list[str]) -> None:
    task, tool, *rest = argv
    kw = json.loads(rest[0])
    out = {"ingest": ingest, "load": load, "resume": resume}[task](tool, **kw)
    print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------ driver (project venv)
def venv_python(root: Path, tool: str) -> str:
    return sys.executable if tool == "tldist" else str(root / f"venv-{tool}" / "bin" / "python")


def install(root: Path, tool: str) -> dict:
    """Make (or reuse) ``root/venv-<tool>``; returns seconds, size, versions or the pip error."""
    venv, marker = root / f"venv-{tool}", root / f"venv-{tool}.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    shutil.rmtree(venv, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    t0 = time.perf_counter()
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", *TORCH, PEERS[tool]], capture_output=True, text=True)
    info: dict = {"seconds": round(time.perf_counter() - t0, 1)}
    if pip.returncode:
        info["error"] = (pip.stderr.strip() or pip.stdout.strip()).splitlines()[-5:]
        return info
    size = subprocess.run(["du", "-sm", str(venv)], capture_output=True, text=True).stdout.split()[0]
    code = f"import importlib.metadata as m; print({PEERS[tool]!r}, m.version({PEERS[tool]!r}), m.version('numpy'))"
    versions = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True).stdout
    info.update(size_mb=int(size), versions=versions.strip())
    marker.write_text(json.dumps(info))
    return info


def call(root: Path, task: str, tool: str, timeout: int = 900, **kw) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) if tool == "tldist" else ""}
    p = subprocess.run([venv_python(root, tool), str(Path(__file__).resolve()), "--worker", task, tool,
                        json.dumps(kw)], capture_output=True, text=True, env=env, timeout=timeout, cwd=str(root))
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        raise RuntimeError(f"{tool} {task} failed ({p.returncode}): {p.stderr.strip()[-1500:]}")
    return json.loads(lines[-1][7:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path(os.environ.get("TLDIST_PEERS_DIR", "/tmp/tldist_peers")))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=30, help="timed loader batches")
    p.add_argument("--quick", action="store_true", help="200 images, 1 repeat, few batches")
    p.add_argument("--only", default="ingest,load,resume")
    a = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import common  # noqa: F401
    from common import DEFAULT_ROOT, abba, fmt_ms, machine_line, table
    from make_images import make_images

    info = make_images(DEFAULT_ROOT / ("images256_quick" if a.quick else "images256"), 200 if a.quick else 3000,
                       verbose=False)
    if a.quick:
        a.repeats, a.batches, a.batch = 1, 4, 16
    a.root.mkdir(parents=True, exist_ok=True)
    print(machine_line())
    tools = ["tldist"]
    for peer in PEERS:
        inst = install(a.root, peer)
        print(f"# {peer}: " + (f"{inst['versions']}; venv {inst['size_mb']} MB, install {inst['seconds']} s"
                               if "error" not in inst else f"INSTALL FAILED after {inst['seconds']} s: {inst['error']}"))
        if "error" not in inst:
            tools.append(peer)
    data = {t: str(a.root / "data" / t) for t in tools}
    if "ingest" in a.only:
        variants = [f"{t}/{n}" for t in tools for n in (1, 2)] + ["tldist-none/1", "tldist-none/2"]
        secs: dict[str, list[float]] = {v: [] for v in variants}
        for _, v in abba(variants, a.repeats):
            tool, n = v.split("/")
            check = "none" if tool == "tldist-none" else "header"
            out = data["tldist"] + "-none" if tool == "tldist-none" else data[tool]
            secs[v].append(call(a.root, "ingest", tool.split("-")[0], images=info["images"], out=out, procs=int(n),
                                **({"check": check} if tool.startswith("tldist") else {})))
        n_img = info["n"]
        rows = [[v.split("/")[0], v.split("/")[1], fmt_ms([n_img / s for s in secs[v]], 0),
                 fmt_ms([secs[f"tldist/{v.split('/')[1]}"][i] / s for i, s in enumerate(secs[v])])] for v in variants]
        print(f"\n## Ingest ({n_img} JPEGs, {a.repeats} repeats interleaved)\n")
        print(table(["tool", "processes", "images/s", "rate / tldist's (same processes)"], rows))
    if "load" in a.only:
        rate: dict[str, list[float]] = {t: [] for t in tools}
        cpu: dict[str, list[float]] = {t: [] for t in tools}
        for r, t in abba(tools, a.repeats):
            wall, per_cpu = call(a.root, "load", t, data=data[t], batch=a.batch, workers=a.workers, warmup=4,
                                 batches=a.batches, seed=r)
            rate[t].append(wall)
            cpu[t].append(per_cpu)
        print(f"\n## Loading (batch {a.batch}, {a.workers} workers, {a.batches} timed batches after 4, "
              f"{a.repeats} repeats interleaved)\n")
        print(table(["loader", "images/s (wall)", "tldist / this", "images per CPU-s", "tldist / this"],
                    [[t, fmt_ms(rate[t], 0), fmt_ms([x / y for x, y in zip(rate['tldist'], rate[t])]),
                      fmt_ms(cpu[t], 0), fmt_ms([x / y for x, y in zip(cpu['tldist'], cpu[t])])] for t in tools]))
    if "resume" in a.only:
        rows = []
        for t in tools:
            kw = dict(data=data[t], batch=a.batch, workers=a.workers, seed=7, state=str(a.root / f"{t}.state"))
            ref = call(a.root, "resume", t, phase="run", **kw)
            res = call(a.root, "resume", t, phase="resume", **kw)
            rows.append([t, f"{ref['at']} of {ref['per_epoch']}", f"{ref['first_batch_s']:.2f}",
                     f"{res['first_batch_s']:.2f}",
                         "yes" if res["rest"] == ref["rest"] else
                         f"NO ({sum(x == y for x, y in zip(res['rest'], ref['rest']))}/{len(ref['rest'])} batches equal)"])
        print("\n## Resume at 90 % of an epoch\n")
        print(table(["loader", "resumed after batch", "s to 1st batch, fresh start", "s to 1st batch, resumed",
                           "same batches as uninterrupted"], rows))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2:])
    else:
        raise SystemExit(main())
