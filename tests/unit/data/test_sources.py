"""Sample sources (image folders, CSV lists) and image encoding, on real files in tmp_path."""

from __future__ import annotations

import io
import logging
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from helpers import image_bytes, make_image_tree as make_tree, read_tar_samples as read_shard
from tldist.data.sources import (
    encode_image,
    samples_from_csv,
    samples_from_imagefolder,
    samples_from_torchvision,
    scan_imagefolder,
)
from tldist.data.writer import write_shards
from tldist.errors import ConfigError, DataError


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
        len(samples_from_imagefolder(root)[1])  # found when the tree is listed
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


def test_csv_names_ints_and_errors(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(4):
        (imgs / f"{i}.png").write_bytes(image_bytes(i, "PNG"))
    (tmp_path / "named.csv").write_text("path,label\nimgs/0.png,dog\nimgs/1.png,cat\n\nimgs/2.png,dog\n")
    classes, samples = samples_from_csv(tmp_path / "named.csv")
    assert classes == ["cat", "dog"] and sorted(s.label for s in samples) == [0, 1, 1]
    (tmp_path / "ints.tsv").write_text("".join(f"{imgs / f'{i}.png'}\t{i % 3}\n" for i in range(4)))
    classes, samples = samples_from_csv(tmp_path / "ints.tsv")
    assert classes == ["0", "1", "2"] and sorted(s.label for s in samples) == [0, 0, 1, 2]
    m = write_shards(samples, tmp_path / "out", "train", classes)
    assert m.num_samples == 4 and m.meta["source"]["type"] == "csv"
    (tmp_path / "rel.csv").write_text("0.png,a\n1.png,b\n")
    assert len(samples_from_csv(tmp_path / "rel.csv", root=imgs)[1]) == 2
    cases = {
        "short.csv": ("imgs/0.png,dog\nimgs/1.png\n", r"short\.csv:2: expected 'path,label'"),
        "missing.csv": ("imgs/0.png,dog\nimgs/9.png,cat\n", r"missing\.csv:2: image 'imgs/9.png' not found"),
        "mixed.csv": ("imgs/0.png,dog\nimgs/1.png,cat\nimgs/2.png,1\n", r"mixed\.csv:3: label '1' is an integer"),
        "range.csv": ("imgs/0.png,0\nimgs/1.png,1\n", r"range\.csv:2: label 1 is out of range"),
    }
    for name, (text, match) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=match):  # bad rows when read; a missing file when its sample is read
            list(samples_from_csv(tmp_path / name, classes=["only"] if name == "range.csv" else None)[1])


def test_torchvision_fakedata_and_imagefolder(tmp_path):
    classes, samples = samples_from_torchvision("FakeData", tmp_path, size=10, image_size=(3, 8, 8), num_classes=3)
    assert classes == ["0", "1", "2"] and len(samples) == 10
    m = write_shards(samples, tmp_path / "fake", "train", classes, max_count=3)
    assert m.num_samples == 10 and len(m.shards) == 4 and m.meta["source"]["name"] == "FakeData"
    first = next(iter(read_shard(m.shard_urls()[0]).values()))
    assert Image.open(io.BytesIO(first["png"])).size == (8, 8)
    files = make_tree(tmp_path / "tree", per_class=2)
    classes, samples = samples_from_torchvision("ImageFolder", tmp_path / "tree")
    assert classes == ["cat", "dog", "eel"]
    assert Counter((s.data, s.label) for s in samples) == Counter((p.read_bytes(), c) for p, c in files.items())
    with pytest.raises(ConfigError, match="did you mean"):
        samples_from_torchvision("CIFAR11", tmp_path)
    with pytest.raises(DataError, match="MNIST"):
        samples_from_torchvision("MNIST", tmp_path / "nothing")


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        samples_from_imagefolder(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(image_bytes(0))
    with pytest.raises(DataError, match="no class subdirectories"):
        samples_from_imagefolder(tmp_path / "flat")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        len(samples_from_imagefolder(tmp_path / "empty")[1])
