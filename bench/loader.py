"""Loader throughput (issues 4 & 6): tldist's shard loader vs torchvision ImageFolder vs the decode ceiling.

Variants, measured interleaved in one run (A B C.., ..C B A, A B C), ``--repeats`` times:

* ``shard``       tldist ``build_train_loader`` (PIL decode), W workers, batch B, RandomResizedCrop(224)
                  + flip, uint8 batches in recycled shared-memory buffers (as the trainer builds
                  it); the consumer only counts them.
* ``shard+norm``  the same, plus the float conversion + normalization the trainer does in the
                  consuming process (``Normalizer``): the like-for-like counterpart of ImageFolder's
                  float, normalized batches.
* ``shard-tv``    the same loader with ``data.decode=torchvision``.
* ``shard-nvjpeg`` the same loader with ``data.decode=nvjpeg``, the consumer decoding + cropping each batch
                  with ``images_on(batch, DEVICE)``. With the default ``--device cpu`` (one torch thread) this
                  is the device path run on the CPU, NOT a GPU figure; its img/CPU-second vs ``shard-tv`` is the
                  work the header-only workers + batched decode add or save. ``--device cuda`` decodes on the
                  GPU (nvjpeg; ``bench/gpu_check.py`` runs it so).

``--device cuda``: every ``shard*`` consumer puts each batch on the GPU with ``images_on(batch, "cuda")``
(the trainer's own call: a host-to-device copy of the uint8 batch, or the nvjpeg decode + crop), the
``+norm`` variant normalizes there, and each timed window ends with ``torch.cuda.synchronize()``; so
``shard-tv`` vs ``shard-nvjpeg`` compares uint8 batches *on the GPU* at the same worker count.
* ``imagefolder`` ``torchvision.datasets.ImageFolder`` + ``DataLoader(shuffle=True)``, same W and B,
                  the torchvision reference transforms (RandomResizedCrop(224) + RandomHorizontalFlip +
                  ToTensor + Normalize): float32 batches cross the process boundary.
* ``shard-ra``    ``shard`` with ``data.auto_augment=rand-m9-mstd0.5-inc1`` (timm's RandAugment in the workers, on
                  the cropped 224 px image; ``--policy`` changes it); ``ceiling-ra``: the ceiling below with the
                  same policy, its own decode + augment ceiling.
* ``shard+norm+re`` ``shard+norm`` with ``data.random_erasing=0.25`` (timm's RandomErasing, pixel mode, on the
                  normalized batch in the consuming process, per-sample seeds from the workers): what erasing
                  on the device batch adds to the consumer.
* ``shard-wds``   ``shard`` on the same images written by ``wds.ShardWriter`` (``.jpg`` + ``.cls``, webdataset's own
                  tar writer: tarfile headers, sorted members) and indexed in place by ``tldist shards index``
                  (issue 26: "training reads such shards as fast as its own", target >= 0.95 of ``shard``).
* ``shard-i2d``   the same images in img2dataset's layout (``.jpg`` + ``.txt`` caption + ``.json`` with the class
                  name under ``label``), indexed with ``--label json:label``: extra members are passed over
                  and every label is a JSON parse plus a class-name lookup.
* ``ceiling``     tldist's own decode + train transform on in-memory JPEG bytes in a W-process
                  ``multiprocessing.Pool``; nothing but a count comes back (no IPC, no tar reading,
                  no batching): what W cores can do at best. ``ceiling-tv``: the same with
                  torchvision's decoder.

Two figures per measurement: wall-clock images/s, and images per CPU-second (user + system time of
every process involved, workers and consumer, from /proc). On a machine shared with other jobs the
wall-clock rate swings with their load; CPU time per image hardly does, so the CPU-time ratio is the
steadier measure of how much work the pipeline adds on top of decode + augment (it does not see
pipeline stalls, which the wall-clock ratio does).

Each loader is created fresh for each measurement; its first ``--warmup`` batches (worker start,
first shuffle block) are not timed. Both loaders hand out batches round-robin over their W workers,
which produce them in parallel; so the warm-up and the timed window are rounded up to whole rounds
of W batches and the clock runs from the arrival of one round's last batch to another's: the
window then spans whole production periods of every worker (timing, say, 3 batches after 1 would
count batches that were made during the warm-up and overstate the rate up to W-fold). All
processes, the consumer included, use one torch thread. Ratios are taken per repeat, then the
median and spread over repeats is reported. Usage::

    python bench/loader.py [--batches 30] [--repeats 3] [--device cpu|cuda] [--json OUT.json] [--quick]
"""

from __future__ import annotations

import argparse
import os
import random
import time
from multiprocessing import get_context
from pathlib import Path

import common  # noqa: F401  (puts the repo on sys.path)
from common import DEFAULT_ROOT, abba, fmt_ms, loadavg, machine_line, table

IMAGE_SIZE = 224
_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pids) -> float:
    """User + system CPU seconds of processes ``pids`` (Linux /proc), plus this process's own."""
    total = time.process_time()
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total
VARIANTS = ("shard", "shard+norm", "shard-tv", "shard-nvjpeg", "imagefolder", "ceiling", "ceiling-tv", "shard-ra",
            "ceiling-ra", "shard+norm+re", "shard-wds", "shard-i2d")
POLICY = "rand-m9-mstd0.5-inc1"

# ---------------------------------------------------------------------------------------
# ceiling: decode + augment in a process pool on in-memory bytes
# ---------------------------------------------------------------------------------------
_BYTES: list[bytes] = []


def _train_transform(size: int, policy: str = ""):
    """The loader's train transform, with ``data.auto_augment=policy`` as ``build_train_loader`` builds it."""
    from tldist.data.augment import build_worker_augment
    from tldist.data.transforms import IMAGENET_MEAN, build_train_transform

    return build_train_transform(size, augment=build_worker_augment(policy, 0.0, image_size=size, mean=IMAGENET_MEAN))


def _pool_init(policy: str = "") -> None:
    import torch

    from tldist.data.transforms import decode_image

    torch.set_num_threads(1)  # as in DataLoader workers
    for p in dict.fromkeys(["", policy]):
        t = _train_transform(IMAGE_SIZE, p)
        for decoder in ("pil", "torchvision"):  # first-use imports/initialisation stay out of the timing
            t(decode_image(_BYTES[0], decoder), random.Random(0))


def _ceiling_chunk(args: tuple[int, int, str, int, str]) -> int:
    from tldist.data.transforms import decode_image

    start, count, decoder, size, policy = args
    transform = _train_transform(size, policy)
    for k in range(count):
        i = start + k
        transform(decode_image(_BYTES[i % len(_BYTES)], decoder), random.Random(i))
    return count


class Ceiling:
    def __init__(self, files: list[Path], workers: int, policy: str = ""):
        global _BYTES
        _BYTES = [f.read_bytes() for f in files]  # before the fork: the workers inherit them
        self.workers = workers
        self.pool = get_context("fork").Pool(workers, initializer=_pool_init, initargs=(policy,))
        self.offset = 0

    def run(self, n: int, decoder: str, policy: str = "") -> tuple[float, float]:
        """(images/s, images per CPU-second) for ``n`` images split evenly over the workers."""
        per = n // self.workers
        jobs = [(self.offset + w * per, per, decoder, IMAGE_SIZE, policy) for w in range(self.workers)]
        self.offset += n
        pids = [w.pid for w in self.pool._pool]  # noqa: SLF001  (the pool's worker processes)
        c0, t0 = proc_cpu_seconds(pids), time.perf_counter()
        done = sum(self.pool.map(_ceiling_chunk, jobs, chunksize=1))
        wall, cpu = time.perf_counter() - t0, proc_cpu_seconds(pids) - c0
        return done / wall, done / cpu

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


# ---------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------

def _time_batches(it, warmup: int, batches: int, pids, consume=None, sync=None) -> tuple[float, float]:
    """(images/s, images per CPU-second of the workers and this process) over ``batches`` batches.

    ``sync`` (e.g. ``torch.cuda.synchronize``) is called before the clock starts and before it stops,
    so that work a consumer queued on a device is inside the window."""
    for _ in range(warmup):
        b = next(it)
        if consume is not None:
            consume(b)
    if sync is not None:
        sync()
    worker_pids = pids()
    n = 0
    c0, t0 = proc_cpu_seconds(worker_pids), time.perf_counter()
    for _ in range(batches):
        b = next(it)
        if consume is not None:
            consume(b)
        img = b["image"] if isinstance(b, dict) else b[0]
        n += img.shape[0]
    if sync is not None:
        sync()
    wall, cpu = time.perf_counter() - t0, proc_cpu_seconds(worker_pids) - c0
    return n / wall, n / cpu


def run_shard(shards: str, workers: int, batch: int, warmup: int, batches: int, decode: str, normalize: bool,
              seed: int, device: str = "cpu", policy: str = "", erase: float = 0.0) -> tuple[float, float]:
    """(images/s, images per CPU-second) of tldist's train loader; on a ``device`` other than the CPU
    every batch is put there by ``images_on`` (nvjpeg: decoded there) and timing windows are synchronized."""
    import torch

    from tldist.config import DataConfig
    from tldist.data.augment import erase_batch
    from tldist.data.device_decode import images_on
    from tldist.data.pipeline import build_train_loader
    from tldist.data.transforms import Normalizer
    from tldist.world import World

    cfg = DataConfig(train=[shards], batch_size=batch, num_workers=workers, decode=decode, seed=seed,
                     auto_augment=policy, random_erasing=erase)
    loader = build_train_loader(cfg, World(), image_size=IMAGE_SIZE, recycle_batches=True)  # as the trainer does
    norm = Normalizer(device=device) if normalize else None  # conversion where the batch is, as the trainer
    on_device = torch.device(device).type != "cpu"
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else None
    try:
        it = iter(loader)
        consume = (lambda b: erase_batch(norm(images_on(b, device)), b)) if norm else (lambda b: images_on(b, device))
        return _time_batches(it, warmup, batches, lambda: [w.pid for w in loader._it._workers],  # noqa: SLF001
                             consume if norm or decode == "nvjpeg" or on_device else None, sync)
    finally:
        loader.close()


def foreign_sets(shards: str) -> dict[str, str]:
    """The images of the tldist shard set ``shards`` rewritten by webdataset's ``ShardWriter`` (``shard-wds``)
    and in img2dataset's layout (``shard-i2d``), same samples in the same order and shard sizes, each indexed
    in place with ``tldist shards index``; made once next to ``shards``. Returns ``{variant: manifest dir}``."""
    import json

    import webdataset as wds

    from tldist.data.index import index_shards
    from tldist.data.manifest import load_manifest
    from tldist.data.stream import read_shard

    m = load_manifest(shards)
    root = Path(shards).parent
    out = {"shard-wds": str(root / "wds_index"), "shard-i2d": str(root / "i2d_index")}
    if all((Path(d) / "manifest.json").is_file() for d in out.values()):
        return out
    per_shard = m.shards[0].num_samples
    for name in ("wds", "i2d"):
        (root / name).mkdir(exist_ok=True)
        with wds.ShardWriter(str(root / name / "train-%06d.tar"), maxcount=per_shard, verbose=0) as w:
            for url, info in zip(m.shard_urls(), m.shards):
                for rec in read_shard(url, 0, info.num_samples):
                    label = int(rec.fields["cls"])
                    if name == "wds":
                        w.write({"__key__": rec.key, "jpg": rec.fields["jpg"], "cls": str(label).encode()})
                    else:
                        doc = {"key": rec.key, "status": "success", "label": m.classes[label], "width": 256}
                        w.write({"__key__": rec.key, "jpg": rec.fields["jpg"], "txt": b"a photo of a thing",
                                 "json": json.dumps(doc).encode()})
    index_shards([str(root / "wds")], out["shard-wds"], workers=2)  # = tldist shards index DIR OUT --workers 2
    index_shards([str(root / "i2d")], out["shard-i2d"], label="json:label", workers=2)
    return out


def run_imagefolder(root: str, workers: int, batch: int, warmup: int, batches: int, seed: int) -> tuple[float, float]:
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.RandomResizedCrop(IMAGE_SIZE),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    ds = datasets.ImageFolder(root, tf)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True, generator=g)
    it = iter(loader)
    try:
        return _time_batches(it, warmup, batches, lambda: [w.pid for w in it._workers])  # noqa: SLF001, F821 (called before the del)
    finally:
        del it


def erase_micro(repeats: int, batch: int, probability: float) -> dict[str, list[float]]:
    """ms per batch of ``batch`` 224 px images, interleaved A/B ``repeats`` times, one torch thread:
    ``device``: :func:`~tldist.data.augment.erase_batch` on a normalized float batch (timm's RandomErasing,
    pixel mode: what the trainer runs); ``worker``: the alternative, torchvision v2 ``RandomErasing(value=0)``
    on each uint8 image as a worker would (torch generator seeded per sample; uint8 cannot hold timm's
    N(0, 1) noise in normalized units, so this is the constant-fill variant)."""
    import torch
    from torchvision.transforms import v2

    from tldist.data.augment import erase_batch, erase_fields

    x = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE)
    u8 = torch.randint(0, 256, (batch, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    tv = v2.RandomErasing(p=probability, value=0)
    out: dict[str, list[float]] = {"device": [], "worker": []}
    for r in range(repeats):
        for v in (("device", "worker") if r % 2 == 0 else ("worker", "device")):
            t0 = time.perf_counter()
            if v == "device":
                erase_batch(x, erase_fields(probability, list(range(r * batch, (r + 1) * batch))))
            else:
                for i in range(batch):
                    torch.default_generator.manual_seed(r * batch + i)
                    u8[i] = tv(u8[i])
            out[v].append((time.perf_counter() - t0) * 1e3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=None, help="output dir of make_images.py (made if missing)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=4, help="untimed batches per measurement")
    p.add_argument("--batches", type=int, default=30,
                   help="timed batches per measurement (rounded up to a multiple of --workers)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--policy", default=POLICY, help="data.auto_augment of the -ra variants")
    p.add_argument("--device", default="cpu", help="where shard* consumers put batches (cpu, cuda): see the docstring")
    p.add_argument("--json", type=Path, default=None, help="also write the per-repeat figures to this JSON file")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny data, 3 batches, 1 repeat")
    p.add_argument("--erase-micro", type=int, default=0, metavar="N",
                   help="only time random erasing on the batch vs per image in a worker, N interleaved repeats")
    a = p.parse_args(argv)
    from make_images import make_images

    if a.quick:
        a.batch, a.warmup, a.batches, a.repeats = 16, 2, 4, 1
    if a.erase_micro:
        import torch

        torch.set_num_threads(1)
        print(machine_line())
        res_e = {p: erase_micro(a.erase_micro, a.batch, p) for p in (0.25, 1.0)}
        print(f"# random erasing, ms per batch of {a.batch} at {IMAGE_SIZE} px, one thread, median [min-max] of "
              f"{a.erase_micro} interleaved repeats; load {loadavg()}\n")
        print(table(["probability", "device: erase_batch (float batch)", "worker: v2.RandomErasing per uint8 image"],
                    [[p, fmt_ms(r["device"], 1), fmt_ms(r["worker"], 1)] for p, r in res_e.items()]))
        if a.json is not None:
            import json

            a.json.write_text(json.dumps({"erase_ms_per_batch": {str(p): r for p, r in res_e.items()},
                                          "batch": a.batch, "image_size": IMAGE_SIZE}, indent=1))
        return 0
    rounds = lambda n: max(1, -(-n // max(a.workers, 1))) * max(a.workers, 1)  # noqa: E731  (see docstring)
    a.warmup, a.batches = rounds(a.warmup), rounds(a.batches)
    import torch

    torch.set_num_threads(1)
    data = a.data or DEFAULT_ROOT / ("images256_quick" if a.quick else "images256")
    info = make_images(data, 200 if a.quick else 3000, verbose=False)
    files = sorted(Path(info["images"]).rglob("*.jpg"))
    variants = [v for v in a.variants.split(",") if v]
    print(machine_line())
    print(f"# {len(files)} JPEGs, mean {info['mean_kb']} KB, {info['shard_count']} shards; workers={a.workers} "
          f"batch={a.batch} size={IMAGE_SIZE}; {a.batches} timed batches after {a.warmup} warm-up, "
          f"{a.repeats} repeats interleaved; shard batches to device {a.device}")
    ceiling = Ceiling(files, a.workers, a.policy) if any(v.startswith("ceiling") for v in variants) else None
    if ceiling is not None:
        ceiling.run(4 * a.workers, "pil")  # start the pool
    n_ceiling = a.batch * a.batches
    foreign = foreign_sets(info["shards"]) if {"shard-wds", "shard-i2d"} & set(variants) else {}
    res: dict[str, list[float]] = {v: [] for v in variants}  # images/s (wall clock)
    cpu: dict[str, list[float]] = {v: [] for v in variants}  # images per CPU-second
    load_before = loadavg()
    try:
        for r, v in abba(variants, a.repeats):
            seed = 1000 + r
            if v == "shard":
                ips, per_cpu = run_shard(info["shards"], a.workers, a.batch, a.warmup, a.batches, "pil", False, seed,
                                         a.device)
            elif v == "shard+norm":
                ips, per_cpu = run_shard(info["shards"], a.workers, a.batch, a.warmup, a.batches, "pil", True, seed,
                                         a.device)
            elif v == "shard-tv":
                ips, per_cpu = run_shard(info["shards"], a.workers, a.batch, a.warmup, a.batches, "torchvision", False,
                                         seed, a.device)
            elif v == "shard-nvjpeg":
                ips, per_cpu = run_shard(info["shards"], a.workers, a.batch, a.warmup, a.batches, "nvjpeg", False, seed,
                                         a.device)
            elif v == "imagefolder":
                ips, per_cpu = run_imagefolder(info["images"], a.workers, a.batch, a.warmup, a.batches, seed)
            elif v == "ceiling":
                ips, per_cpu = ceiling.run(n_ceiling, "pil")
            elif v == "ceiling-tv":
                ips, per_cpu = ceiling.run(n_ceiling, "torchvision")
            elif v == "shard-ra":
                ips, per_cpu = run_shard(info["shards"], a.workers, a.batch, a.warmup, a.batches, "pil", False, seed,
                                         a.device, policy=a.policy)
            elif v == "ceiling-ra":
                ips, per_cpu = ceiling.run(n_ceiling, "pil", a.policy)
            elif v == "shard+norm+re":
                ips, per_cpu = run_shard(info["shards"], a.workers, a.batch, a.warmup, a.batches, "pil", True, seed,
                                         a.device, erase=0.25)
            elif v in ("shard-wds", "shard-i2d"):
                ips, per_cpu = run_shard(foreign[v], a.workers, a.batch, a.warmup, a.batches, "pil", False, seed,
                                         a.device)
            else:
                raise SystemExit(f"unknown variant {v}; choose from {', '.join(VARIANTS)}")
            res[v].append(ips)
            cpu[v].append(per_cpu)
            print(f"  repeat {r} {v:12s} {ips:8.1f} img/s  {per_cpu:7.1f} img/CPU-s  (load {loadavg()})", flush=True)
    finally:
        if ceiling is not None:
            ceiling.close()
    print(f"# load average before {load_before}, after {loadavg()}")
    print("\n## Throughput (median [min-max] over repeats)\n")
    print(table(["variant", "img/s (wall)", "img/s per worker", "img per CPU-second"],
                [[v, fmt_ms(res[v], 0), fmt_ms([x / a.workers for x in res[v]], 0), fmt_ms(cpu[v], 0)]
                 for v in variants]))

    def ratio(num: str, den: str, target: str = "") -> list[object] | None:
        if num not in res or den not in res:
            return None
        rs = [x / y for x, y in zip(res[num], res[den])]
        cs = [x / y for x, y in zip(cpu[num], cpu[den])]
        met = lambda v: "" if not target else ("yes" if sorted(v)[len(v) // 2] >= float(target) else "NO")  # noqa: E731
        return [f"{num} / {den}", fmt_ms(rs, 2), met(rs), fmt_ms(cs, 2), met(cs), target and f">= {target}"]

    rows = [ratio("shard", "ceiling", "0.9"), ratio("shard", "imagefolder", "1.0"),
            ratio("shard+norm", "ceiling"), ratio("shard+norm", "imagefolder", "1.0"),
            ratio("shard-tv", "ceiling-tv", "0.9"), ratio("shard-tv", "ceiling"), ratio("shard-tv", "imagefolder"),
            ratio("shard-nvjpeg", "shard-tv"), ratio("shard-nvjpeg", "ceiling-tv"),
            ratio("imagefolder", "ceiling"), ratio("ceiling-tv", "ceiling"),
            ratio("shard-ra", "ceiling-ra", "0.9"), ratio("shard-ra", "shard"), ratio("ceiling-ra", "ceiling"),
            ratio("shard+norm+re", "shard+norm"), ratio("shard-wds", "shard", "0.95"),
            ratio("shard-i2d", "shard", "0.95")]
    print("\n## Ratios (per repeat, median [min-max]): wall-clock img/s, and images per CPU-second\n")
    print(table(["ratio", "wall", "met", "per CPU-second", "met", "target"], [r for r in rows if r is not None]))
    if a.json is not None:
        import json

        a.json.write_text(json.dumps({"device": a.device, "workers": a.workers, "batch": a.batch, "policy": a.policy,
                                      "image_size": IMAGE_SIZE, "images_per_s": res, "images_per_cpu_s": cpu},
                                     indent=1))
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
