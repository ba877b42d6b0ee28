"""Sample sources (image folders, CSV lists) and image encoding, on real files in tmp_path."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from tldist.data.sources import encode_image, samples_from_csv, samples_from_imagefolder, scan_imagefolder
from tldist.errors import DataError


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def tree(root, classes=("a", "b"), per_class=2):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            (root / c / f"{i}.png").write_bytes(png(i))
    return root


def test_empty_class_folder_is_refused_or_kept_with_a_warning(tmp_path, caplog):
    """Issue 12 #8: a class folder holding only .DS_Store must not silently become a class."""
    root = tree(tmp_path / "src")
    (root / "c").mkdir()
    (root / "c" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "c" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder\(s\) with no images: \['c'\].*--keep-empty-classes"):
        samples_from_imagefolder(root)
    with caplog.at_level(logging.WARNING, logger="tldist.data"):
        classes, samples = samples_from_imagefolder(root, keep_empty_classes=True)
    assert classes == ["a", "b", "c"] and len(samples) == 4
    assert "no images for 1 of 3 classes: ['c']" in caplog.text


def test_forced_classes_missing_from_a_tree_are_named(tmp_path, caplog):
    """A val tree scanned with train's classes warns about the classes it lacks."""
    val = tree(tmp_path / "val", classes=("a",))
    with caplog.at_level(logging.WARNING, logger="tldist.data"):
        classes, items = scan_imagefolder(val, ["a", "b", "c"])
    assert classes == ["a", "b", "c"] and len(items) == 2
    assert "no images for 2 of 3 classes: ['b', 'c']" in caplog.text


def test_csv_classes_without_rows_are_named(tmp_path, caplog):
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(png(i))
    (tmp_path / "one_based.csv").write_text("".join(f"{i}.png,{1 + i % 2}\n" for i in range(4)))
    with caplog.at_level(logging.WARNING, logger="tldist.data"):
        classes, _ = samples_from_csv(tmp_path / "one_based.csv")
    assert classes == ["0", "1", "2"] and "no rows for 1 of 3 classes: ['0'] (integer labels with gaps)" in caplog.text
    caplog.clear()
    (tmp_path / "named.csv").write_text("0.png,cat\n1.png,dog\n")
    with caplog.at_level(logging.WARNING, logger="tldist.data"):
        samples_from_csv(tmp_path / "named.csv", classes=["cat", "dog", "eel"])
    assert "no rows for 1 of 3 classes: ['eel']" in caplog.text


def test_csv_val_fraction_is_a_seeded_stratified_split(tmp_path):
    rows = []
    for i in range(20):
        (tmp_path / f"{i}.png").write_bytes(png(i))
        rows.append(f"{i}.png,{'ab'[i % 2]}\n")
    (tmp_path / "list.csv").write_text("path,label\n" + "".join(rows))
    _, train = samples_from_csv(tmp_path / "list.csv", split="train", val_fraction=0.2, seed=3)
    classes, val = samples_from_csv(tmp_path / "list.csv", split="val", val_fraction=0.2, seed=3)
    train_keys, val_keys = {s.key for s in train}, {s.key for s in val}
    assert classes == ["a", "b"] and len(train_keys) == 16 and len(val_keys) == 4 and not train_keys & val_keys
    assert sorted(s.label for s in val) == [0, 0, 1, 1]  # 20% of each class
    assert val_keys == {s.key for s in samples_from_csv(tmp_path / "list.csv", split="val", val_fraction=0.2,
                                                         seed=3)[1]}
    assert val_keys != {s.key for s in samples_from_csv(tmp_path / "list.csv", split="val", val_fraction=0.2,
                                                         seed=4)[1]}
    assert val.info["val_fraction"] == 0.2 and val.info["split"] == "val"


@pytest.mark.parametrize("fmt", ["jpg", "png", "webp"])
def test_encode_image_keeps_the_decoding_rule(fmt):
    """Modes a format cannot hold go to 8 bits by the decoders' rule, not by PIL's clipping convert."""
    from tldist.data.transforms import decode_image

    ramp = np.tile(np.linspace(0, 65535, 64), (64, 1))
    for img in (Image.fromarray(ramp.astype(np.uint16)), Image.fromarray(ramp.astype(np.int32)),
                Image.fromarray((ramp / 65535).astype(np.float32))):
        data = encode_image(img, fmt, quality=95)
        for decoder in ("pil", "torchvision"):
            out = decode_image(data, decoder)
            mean = np.asarray(out).mean() if isinstance(out, Image.Image) else out.float().mean().item()
            assert abs(mean - 127.5) < 2, (img.mode, fmt, decoder, mean)
