"""The embedded demo data: real transfer learning with no downloads.

* Source domain (pretraining): printed characters rendered from 22 of matplotlib's bundled fonts
  with a random pen, affine and elastic distortions, then digitised the way the target was
  (:mod:`tldist.data.glyphs`): digits 0-9 by default (named like the target's classes), or
  digits plus lower-case letters; 32x32 grayscale-looking RGB PNG, deterministic given a seed.
* Target domain: scikit-learn's ``load_digits()`` handwriting (8x8, shipped with the
  package) upscaled bilinearly to 32x32 RGB PNG, with a seeded stratified train/val split
  and an optional stratified ``label_fraction`` of the train labels (low-label transfer).
* ``style`` shifts a domain deterministically (``invert``, ``color``, ``blur``, ``noise``, or a
  ``+``-joined combination such as ``color+blur``) for domain-adaptation experiments.
* The ``unlabelled`` digits split is the part of the train split that ``label_fraction`` drops:
  for semi-supervised work (pseudo-labelling). Its shards still store the *true* labels
  (manifest ``meta.true_labels = true``), only so that the precision of pseudo-labels can be
  measured; nothing may train on them as labels.

:func:`write_demo_shards` writes ``source/{train,val}`` and ``target/{train,val}`` shard sets (plus,
on request, ``target/unlabelled`` and ``shifted/<style>/{train,val}``) and skips any set whose
manifest already records the same parameters.
"""

from __future__ import annotations

import zlib
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from tldist.data.glyphs import render
from tldist.data.manifest import Manifest, load_manifest
from tldist.data.sources import Sample, SampleSource, encode_image, stratified_split
from tldist.data.writer import write_shards
from tldist.errors import ConfigError, DataError

DEMO_VERSION = 2
"""Bump when the generated images change, so cached demo shards are rewritten."""
DIGITS = [str(i) for i in range(10)]
STYLES = ("invert", "color", "blur", "noise")
CHAR_SETS = {"digits": tuple(DIGITS), "digits+letters": (*DIGITS, *(chr(ord("a") + i) for i in range(26)))}
SIZE = 32
"""Side of every demo image (px)."""


def _check_style(style: Optional[str]) -> list[str]:
    """The parts of ``style`` (``"color+blur"`` -> ``["color", "blur"]``); raises ConfigError if unknown."""
    parts = style.split("+") if style else []
    if any(p not in STYLES for p in parts) or len(set(parts)) != len(parts):
        raise ConfigError(f"demo style '{style}' is unknown; use one of {', '.join(STYLES)}, a '+'-joined "
                          "combination of different ones (e.g. color+blur), or none")
    return parts


def apply_style(gray: np.ndarray, style: Optional[str], rng: np.random.Generator) -> np.ndarray:
    """Turn a HxW uint8 gray image into HxWx3 uint8 RGB, shifted by ``style`` (None: plain gray).

    A combination applies its gray-level parts (invert, blur, noise) in the order given, then
    ``color`` (a random per-image colour ramp) last.
    """
    from PIL import Image, ImageFilter

    parts = _check_style(style)
    x = gray.astype(np.float32)
    for part in parts:
        if part == "invert":
            x = 255.0 - x
        elif part == "blur":
            g = np.clip(x + 0.5, 0, 255).astype(np.uint8)  # == gray when blur comes first
            x = np.asarray(Image.fromarray(g).filter(ImageFilter.GaussianBlur(1.2)), dtype=np.float32)
        elif part == "noise":
            x = x + rng.normal(0.0, 30.0, x.shape)
    if "color" in parts:
        lo, hi = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        rgb = lo + (hi - lo) * (np.clip(x, 0, 255)[..., None] / 255.0)
    else:
        rgb = np.repeat(x[..., None], 3, axis=2)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    return encode_image(Image.fromarray(rgb, "RGB"), "png")


def upscale(counts: np.ndarray) -> np.ndarray:
    """An 8x8 array of optdigits ink counts (0-16) as a SIZE x SIZE uint8 gray image (bilinear)."""
    from PIL import Image

    small = Image.fromarray(np.clip(counts * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8), "L")
    return np.asarray(small.resize((SIZE, SIZE), Image.Resampling.BILINEAR))


def glyph_classes(chars: str) -> list[str]:
    """The class names of a glyph source: ``digits`` (0-9) or ``digits+letters`` (0-9 then a-z)."""
    if chars not in CHAR_SETS:
        raise ConfigError(f"glyph chars '{chars}' is unknown; use one of {', '.join(CHAR_SETS)}")
    return list(CHAR_SETS[chars])


def glyphs_samples(per_class: int, *, chars: str = "digits", seed: int = 0, split: str = "train",
                   style: Optional[str] = None) -> tuple[list[str], SampleSource]:
    """``per_class`` printed glyphs of each class of ``chars`` (:func:`glyph_classes`), rendered by
    :func:`tldist.data.glyphs.render` from matplotlib's fonts in the look of the digits target, as
    SIZE x SIZE RGB PNG; the ``seed``/``split`` pair fixes every pixel. Digit classes are named
    ``"0"``-``"9"`` like the target's, so fine-tuning starts from their head rows."""
    if per_class < 1:
        raise ConfigError(f"glyphs per class must be >= 1, got {per_class}")
    classes = glyph_classes(chars)
    _check_style(style)
    n = per_class * len(classes)

    def generate() -> Iterator[Sample]:
        rng = np.random.default_rng([seed, zlib.crc32(split.encode()), 3])
        for i in range(n):
            label = i % len(classes)
            gray = upscale(render(classes[label], rng))
            yield Sample(f"g{i:06d}", _png(apply_style(gray, style, rng)), "png", label, f"glyphs[{i}]")

    info = {"type": "demo-glyphs", "chars": chars, "per_class": per_class, "seed": seed, "split": split,
            "style": style}
    return classes, SampleSource(n, generate, info)


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target.astype(int)


def digits_indices(split: str, *, seed: int = 0, val_fraction: float = 0.3, label_fraction: float = 1.0) -> list[int]:
    """Indices into ``load_digits()`` for ``split``, stratified and seeded.

    ``train`` keeps a stratified ``label_fraction`` of the train split; ``unlabelled`` is the rest
    of the train split (empty when ``label_fraction`` is 1); ``val`` ignores ``label_fraction``.
    """
    if split not in ("train", "val", "unlabelled"):
        raise ConfigError(f"digits split must be 'train', 'val' or 'unlabelled', got '{split}'")
    if not 0.0 < label_fraction <= 1.0:
        raise ConfigError(f"label_fraction must be in (0, 1], got {label_fraction}")
    labels = _digits()[1]
    train, val = stratified_split(labels, val_fraction, seed)
    if split == "val":
        return val
    if label_fraction < 1.0:
        dropped, kept = stratified_split(labels[train], label_fraction, seed + 1)
        return [train[j] for j in (dropped if split == "unlabelled" else kept)]
    return [] if split == "unlabelled" else train


def digits_samples(split: str, *, seed: int = 0, val_fraction: float = 0.3, label_fraction: float = 1.0,
                   style: Optional[str] = None) -> tuple[list[str], SampleSource]:
    """scikit-learn handwritten digits upscaled to 32x32 RGB PNG (see :func:`digits_indices`).

    Every sample carries its true label, the ``unlabelled`` split's included (see the module docstring).
    """
    _check_style(style)
    idx = digits_indices(split, seed=seed, val_fraction=val_fraction, label_fraction=label_fraction)
    order = list(np.random.default_rng([seed, 7]).permutation(idx))

    def generate() -> Iterator[Sample]:
        images, labels = _digits()
        rng = np.random.default_rng([seed, zlib.crc32(split.encode()), 2])
        for i in order:
            yield Sample(f"d{int(i):05d}", _png(apply_style(upscale(images[i]), style, rng)), "png", int(labels[i]),
                         f"digits[{i}]")

    info = {"type": "demo-digits", "split": split, "seed": seed, "val_fraction": val_fraction,
            "label_fraction": label_fraction, "style": style}
    return list(DIGITS), SampleSource(len(order), generate, info)


def _cached(out: Path, params: dict) -> Optional[Manifest]:
    try:
        m = load_manifest(out)
    except DataError:
        return None
    if m.meta.get("demo") != params or not all(Path(u).is_file() for u in m.shard_urls()):
        return None
    return m


def write_demo_shards(out_dir: str | Path, *, source_per_class: int = 500, source_val_per_class: int = 50,
                      source_chars: str = "digits", seed: int = 0, val_fraction: float = 0.3,
                      label_fraction: float = 1.0, source_style: Optional[str] = None, target_style: Optional[str] = None,
                      train_shards: int = 8, val_shards: int = 2, force: bool = False, unlabelled: bool = False,
                      shifted_styles: Sequence[str] = ()) -> dict[str, Manifest]:
    """Write the demo shard sets under ``out_dir``: ``source/train``, ``source/val``, ``target/train``, ``target/val``.

    The source sets hold ``source_per_class`` / ``source_val_per_class`` glyphs of each class of
    ``source_chars`` (:func:`glyph_classes`); the target sets are :func:`digits_samples`.

    With ``unlabelled`` (needs ``label_fraction < 1``) also ``target/unlabelled``: the train digits
    that ``label_fraction`` dropped, true labels kept for measurement only (``meta.true_labels``).
    Each style of ``shifted_styles`` (e.g. ``invert``, ``color+blur``) adds ``shifted/<style>/train``
    (the whole digits train split in that style, for label-free adaptation) and ``shifted/<style>/val``.
    Train-like sets get ``train_shards`` shards and val sets ``val_shards`` (fewer when there are
    fewer samples). A set whose manifest already records the same parameters is reused
    unless ``force``. Returns ``{'source/train': Manifest, ...}``.
    """
    if train_shards < 1 or val_shards < 1:
        raise ConfigError(f"train_shards and val_shards must be >= 1, got {train_shards} and {val_shards}")
    if unlabelled and label_fraction >= 1.0:
        raise ConfigError(f"an unlabelled digits split needs label_fraction < 1 (got {label_fraction}): it holds "
                          "the train samples whose labels label_fraction drops")
    for style in shifted_styles:
        _check_style(style)
    out_dir = Path(out_dir)
    plans = {
        "source/train": lambda: glyphs_samples(source_per_class, chars=source_chars, seed=seed, split="train",
                                               style=source_style),
        "source/val": lambda: glyphs_samples(source_val_per_class, chars=source_chars, seed=seed, split="val",
                                             style=source_style),
        "target/train": lambda: digits_samples("train", seed=seed, val_fraction=val_fraction,
                                               label_fraction=label_fraction, style=target_style),
        "target/val": lambda: digits_samples("val", seed=seed, val_fraction=val_fraction, style=target_style),
    }
    if unlabelled:
        plans["target/unlabelled"] = lambda: digits_samples("unlabelled", seed=seed, val_fraction=val_fraction,
                                                            label_fraction=label_fraction, style=target_style)
    for style in shifted_styles:
        for split in ("train", "val"):
            plans[f"shifted/{style}/{split}"] = (lambda split=split, style=style: digits_samples(
                split, seed=seed, val_fraction=val_fraction, style=style))
    result: dict[str, Manifest] = {}
    for name, make in plans.items():
        classes, samples = make()
        split = name.rsplit("/", 1)[1]
        params = {"version": DEMO_VERSION, "set": name, **samples.info,
                  "shards": val_shards if split == "val" else train_shards}
        cached = None if force else _cached(out_dir / name, params)
        if cached is not None:
            result[name] = cached
            continue
        meta: dict = {"demo": params}
        if split == "unlabelled":
            meta.update(true_labels=True, note="true labels kept only to measure pseudo-label precision; "
                                               "never train on them as labels")
        result[name] = write_shards(samples, out_dir / name, split, classes, max_count=None, max_size=None,
                                    min_shards=params["shards"], check="none", meta=meta)
    return result
