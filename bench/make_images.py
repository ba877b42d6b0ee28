"""Generate a benchmark image set: N JPEGs of ~256 px as an ImageFolder tree, and the same as tldist shards.

Content comes from the two real photographs that scikit-learn ships (``china.jpg``, ``flower.jpg``)
plus two procedurally generated 1/f-noise "landscapes" (natural images have a ~1/f^2 power
spectrum, which is what makes JPEG decode cost realistic, unlike flat synthetic squares). Each
image is a random crop (10-100 % of the area, aspect 3/4-4/3) of one source, resized so its
shorter side is 256 px (the longer side 256-341 px), colour-jittered, maybe mirrored, and saved
as JPEG quality 90. No download, no extra package.

Layout under ``--out`` (default ``$TLDIST_BENCH_DIR`` or ``/tmp/tldist_bench``)::

    images/<class>/<key>.jpg          # ImageFolder tree (torchvision.datasets.ImageFolder)
    shards/train/{train-*.tar,manifest.json}   # the same files, as `tldist shards imagefolder` writes them

An existing set made with the same parameters is reused. Usage::

    python bench/make_images.py [--n 3000] [--classes 10] [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

import common  # noqa: F401  (puts the repo on sys.path)
from common import DEFAULT_ROOT, machine_line

PARAMS_FILE = "bench_images.json"
VERSION = 2


def _fractal(rng: np.random.Generator, size: int = 640, beta: float = 2.0) -> np.ndarray:
    """A size x size RGB image with a 1/f^beta power spectrum per channel (natural-image statistics)."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / size) ** (beta / 2)
    chans = []
    for _ in range(3):
        spec = amp * np.exp(2j * np.pi * rng.random(amp.shape))
        ch = np.fft.irfft2(spec, s=(size, size))
        ch = (ch - ch.mean()) / (ch.std() + 1e-9)
        chans.append(ch)
    mix = rng.normal(0, 1, (3, 3)) * 0.5 + np.eye(3)  # correlated colour channels, like photos
    img = np.tensordot(np.stack(chans, -1), mix, axes=1)
    img = 128 + 45 * img / (img.std() + 1e-9) + rng.uniform(-40, 40, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def _sources(seed: int) -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)  # 2 x (427, 640, 3) real photographs
    rng = np.random.default_rng([seed, 99])
    return photos + [_fractal(rng, beta=b) for b in (2.4, 2.8)]


_SRC: list[np.ndarray] = []


def _init(seed: int) -> None:
    global _SRC
    _SRC = _sources(seed)


def _make(args: tuple[int, int, int, int, str]) -> tuple[str, int]:
    """Render image ``i`` (deterministic in seed, i) and write it; returns (path, bytes)."""
    from PIL import Image, ImageEnhance

    i, seed, short, quality, path = args
    rng = np.random.default_rng([seed, i])
    # 3 of 4 images are crops of the two photographs, 1 of 4 of a fractal
    k = int(rng.integers(2)) if rng.random() < 0.75 else 2 + int(rng.integers(len(_SRC) - 2))
    src = Image.fromarray(_SRC[k])
    w, h = src.size
    # random crop: area fraction 0.1..1, aspect 3/4..4/3, clamped to the source
    for _ in range(10):
        area = w * h * rng.uniform(0.1, 1.0)
        ar = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw, ch = int(round(np.sqrt(area * ar))), int(round(np.sqrt(area / ar)))
        if cw <= w and ch <= h:
            break
    else:
        cw, ch = min(w, h), min(w, h)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    # shorter side -> `short` px, longer side at most 4/3 of it (typical photo aspect)
    scale = short / min(cw, ch)
    out_w, out_h = round(cw * scale), round(ch * scale)
    out_w, out_h = min(out_w, round(short * 4 / 3)), min(out_h, round(short * 4 / 3))
    img = src.resize((out_w, out_h), Image.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.6, 1.4))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    Path(path).write_bytes(buf.getvalue())
    return path, len(buf.getvalue())


def make_images(out: Path, n: int = 3000, classes: int = 10, short: int = 256, quality: int = 90, seed: int = 0,
                min_shards: int = 16, force: bool = False, verbose: bool = True) -> dict:
    """Write (or reuse) the ImageFolder tree and shard set; returns the parameters + paths."""
    from tldist.data.ingest import write_imagefolder

    out = Path(out)
    params = {"version": VERSION, "n": n, "classes": classes, "short": short, "quality": quality, "seed": seed,
              "min_shards": min_shards}
    stamp = out / PARAMS_FILE
    info = {**params, "images": str(out / "images"), "shards": str(out / "shards" / "train")}
    if not force and stamp.is_file() and json.loads(stamp.read_text()).get("params") == params \
            and (out / "shards" / "train" / "manifest.json").is_file():
        if verbose:
            print(f"reusing {out} (same parameters)")
        return json.loads(stamp.read_text())
    t0 = time.perf_counter()
    shutil.rmtree(out / "images", ignore_errors=True)
    shutil.rmtree(out / "shards", ignore_errors=True)
    names = [f"c{c:02d}" for c in range(classes)]
    for name in names:
        (out / "images" / name).mkdir(parents=True, exist_ok=True)
    jobs = [(i, seed, short, quality, str(out / "images" / names[i % classes] / f"img{i:06d}.jpg")) for i in range(n)]
    with get_context("fork").Pool(2, initializer=_init, initargs=(seed,)) as pool:
        sizes = [b for _, b in pool.imap_unordered(_make, jobs, chunksize=32)]
    t1 = time.perf_counter()
    # same as: tldist shards imagefolder OUT/images OUT/shards --min-shards 16 --check none
    written = write_imagefolder(out / "images", out / "shards", split="train", seed=seed, min_shards=min_shards,
                                check="none")
    t2 = time.perf_counter()
    info.update({"params": params, "mean_kb": round(sum(sizes) / len(sizes) / 1024, 1),
                 "shard_count": len(written["train"].shards), "seconds": round(t2 - t0, 1)})
    stamp.write_text(json.dumps(info, indent=1))
    if verbose:
        print(f"wrote {n} JPEGs (mean {info['mean_kb']} KB) in {t1 - t0:.1f}s and "
              f"{info['shard_count']} shards in {t2 - t1:.1f}s under {out}")
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_ROOT / "images256")
    p.add_argument("--n", type=int, default=3000, help="number of images (default 3000)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--short-side", type=int, default=256)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="regenerate even if a matching set exists")
    p.add_argument("--quick", action="store_true", help="200 images (smoke test)")
    a = p.parse_args(argv)
    if a.quick:
        a.n = 200
        if a.out == DEFAULT_ROOT / "images256":
            a.out = DEFAULT_ROOT / "images256_quick"
    print(machine_line())
    info = make_images(a.out, a.n, a.classes, a.short_side, a.quality, a.seed, force=a.force)
    from common import table

    print(table(["images", "classes", "short side", "JPEG q", "mean KB", "shards", "ImageFolder", "shards dir"],
                [[info["n"], info["classes"], info["short"], info["quality"], info["mean_kb"], info["shard_count"],
                  info["images"], info["shards"]]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
