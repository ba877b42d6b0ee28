"""Embedded demo data: printed glyphs (source) and scikit-learn digits (target); the `tldist demo --quick`
path is in e2e/test_demo.py."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from tldist.data.demo import DIGITS, digits_indices, digits_samples, glyphs_samples, write_demo_shards
from tldist.data.manifest import load_manifest
from tldist.errors import ConfigError


def pixels(sample) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(sample.data)))


def test_glyphs_deterministic_balanced_and_varied():
    classes, samples = glyphs_samples(3, seed=5)
    assert classes == DIGITS and len(samples) == 30  # named like the target's classes
    a, b = list(samples), list(glyphs_samples(3, seed=5)[1])
    assert [s.data for s in a] == [s.data for s in b]
    assert [s.data for s in a] != [s.data for s in glyphs_samples(3, seed=6)[1]]
    assert [s.data for s in a] != [s.data for s in glyphs_samples(3, seed=5, split="val")[1]]
    assert Counter(s.label for s in a) == {i: 3 for i in range(10)}
    img = pixels(a[0])
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()  # grayscale-looking
    assert img.std() > 10  # something was drawn
    assert len({s.key for s in a}) == 30
    wide, more = glyphs_samples(1, chars="digits+letters")
    assert wide[:10] == DIGITS and wide[10:] == [chr(ord("a") + i) for i in range(26)] and len(more) == 36
    with pytest.raises(ConfigError, match="glyph chars 'greek'"):
        glyphs_samples(1, chars="greek")


def test_source_looks_like_the_target():
    """Both domains go through the same 8x8 -> 32 px path: same value grid, similar ink and height."""
    glyph = np.stack([pixels(s)[..., 0] for s in glyphs_samples(20)[1]]).astype(float)
    digit = np.stack([pixels(s)[..., 0] for s in list(digits_samples("val")[1])[:200]]).astype(float)
    assert abs(glyph.mean() - digit.mean()) < 0.35 * digit.mean()
    assert glyph[:, 0].max() > 0 and digit[:, 0].max() > 0  # the character fills the height, as in optdigits
    assert glyph[:, :, 0].mean() < 0.2 * glyph.mean() and digit[:, :, 0].mean() < 0.2 * digit.mean()  # centred


def test_digits_split_label_fraction_and_styles():
    train, val = digits_indices("train", seed=0), digits_indices("val", seed=0)
    assert not set(train) & set(val) and len(train) + len(val) == 1797
    assert 0.28 < len(val) / 1797 < 0.32
    few = digits_indices("train", seed=0, label_fraction=0.1)
    assert set(few) <= set(train) and 100 < len(few) < 152
    classes, samples = digits_samples("train", label_fraction=0.02)
    assert classes == DIGITS and set(Counter(s.label for s in samples)) == set(range(10))  # every class kept
    plain = pixels(next(iter(digits_samples("val")[1])))
    assert plain.shape == (32, 32, 3)
    for style in ("invert", "color", "blur", "noise"):
        styled = pixels(next(iter(digits_samples("val", style=style)[1])))
        assert styled.shape == (32, 32, 3) and not np.array_equal(styled, plain)
    assert np.array_equal(pixels(next(iter(digits_samples("val", style="invert")[1]))), 255 - plain)
    with pytest.raises(ConfigError, match="style"):
        digits_samples("val", style="sepia")
    with pytest.raises(ConfigError, match="label_fraction"):
        digits_indices("train", label_fraction=0)


def test_write_demo_shards_and_reuse(tmp_path):
    out = write_demo_shards(tmp_path, source_per_class=4, source_val_per_class=1, label_fraction=0.5)
    assert set(out) == {"source/train", "source/val", "target/train", "target/val"}
    assert out["source/train"].num_samples == 40 and len(out["source/train"].shards) == 8
    assert out["source/val"].num_samples == 10 and len(out["source/val"].shards) == 2
    assert out["source/train"].classes == DIGITS
    assert out["target/train"].classes == DIGITS and len(out["target/train"].shards) == 8
    assert abs(out["target/train"].num_samples - 629) <= 10
    assert load_manifest(tmp_path / "target" / "val").num_samples == len(digits_indices("val"))
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.tar")}
    again = write_demo_shards(tmp_path, source_per_class=4, source_val_per_class=1, label_fraction=0.5)
    assert {k: m.num_samples for k, m in again.items()} == {k: m.num_samples for k, m in out.items()}
    assert stamps == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.tar")}  # nothing rewritten
    changed = write_demo_shards(tmp_path, source_per_class=4, source_val_per_class=1, label_fraction=1.0)
    assert changed["target/train"].num_samples == len(digits_indices("train"))
    rewritten = {p for p in tmp_path.rglob("*.tar") if stamps.get(p) != p.stat().st_mtime_ns}
    assert rewritten and all("target/train" in p.as_posix() for p in rewritten)


def _keys(manifest_dir) -> set[str]:
    from tldist.data.manifest import resolve_shard_urls
    from tldist.data.stream import read_shard

    m = load_manifest(manifest_dir)
    return {rec.key for url, s in zip(resolve_shard_urls(m), m.shards) for rec in read_shard(url, 0, s.num_samples)}


def test_unlabelled_and_shifted_splits(tmp_path):
    out = write_demo_shards(tmp_path, source_per_class=2, source_val_per_class=1, label_fraction=0.2, unlabelled=True,
                            shifted_styles=["invert", "color+blur"], train_shards=3, val_shards=1)
    assert set(out) == {"source/train", "source/val", "target/train", "target/val", "target/unlabelled",
                        "shifted/invert/train", "shifted/invert/val", "shifted/color+blur/train",
                        "shifted/color+blur/val"}
    labelled, unlabelled = _keys(tmp_path / "target/train"), _keys(tmp_path / "target/unlabelled")
    full = {f"d{i:05d}" for i in digits_indices("train")}
    assert not labelled & unlabelled and labelled | unlabelled == full  # the 80% that label_fraction dropped
    assert out["target/unlabelled"].meta["true_labels"] is True and "true_labels" not in out["target/train"].meta
    assert out["target/unlabelled"].classes == DIGITS and len(out["target/unlabelled"].shards) == 3
    for style in ("invert", "color+blur"):
        assert _keys(tmp_path / f"shifted/{style}/train") == full  # the whole train split, restyled
        assert _keys(tmp_path / f"shifted/{style}/val") == {f"d{i:05d}" for i in digits_indices("val")}
    assert digits_indices("unlabelled", label_fraction=1.0) == []
    # a combination applies every part: color+blur is coloured and differs from color alone
    plain = pixels(next(iter(digits_samples("val")[1])))
    combo = pixels(next(iter(digits_samples("val", style="color+blur")[1])))
    assert combo.shape == (32, 32, 3) and not (combo[..., 0] == combo[..., 1]).all()  # coloured
    assert not np.array_equal(combo, pixels(next(iter(digits_samples("val", style="color")[1]))))  # and blurred
    assert np.array_equal(pixels(next(iter(digits_samples("val", style="invert")[1]))), 255 - plain)
    with pytest.raises(ConfigError, match="label_fraction < 1"):
        write_demo_shards(tmp_path / "x", label_fraction=1.0, unlabelled=True)
    for bad in ("sepia+blur", "blur+blur"):
        with pytest.raises(ConfigError, match="style"):
            write_demo_shards(tmp_path / "y", shifted_styles=[bad])
