"""Shard writer and sources: real images in tmp_path, real shards written and read back."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from tldist.data.manifest import load_manifest, resolve_shard_urls
from tldist.data.writer import (Sample, samples_from_csv, samples_from_imagefolder, samples_from_torchvision,
                                write_imagefolder, write_shards)
from tldist.errors import ConfigError, DataError


def image_bytes(seed: int, fmt: str = "JPEG", size: int = 12) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def make_tree(root: Path, per_class: int = 5, classes=("cat", "dog", "eel")) -> dict[Path, int]:
    """Class tree with mixed formats, upper-case extensions, a nested dir and a non-image file."""
    files = {}
    for c, name in enumerate(classes):
        for i in range(per_class):
            ext, fmt = [("jpg", "JPEG"), ("PNG", "PNG"), ("jpeg", "JPEG")][i % 3]
            sub = root / name / ("nested" if i == 4 else "")
            sub.mkdir(parents=True, exist_ok=True)
            path = sub / f"img.{i}.{ext}"
            path.write_bytes(image_bytes(100 * c + i, fmt))
            files[path] = c
        (root / name / "notes.txt").write_text("not an image")
    return files


def read_shard(path: str | Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def test_imagefolder_round_trip(tmp_path):
    files = make_tree(tmp_path / "src")
    classes, samples = samples_from_imagefolder(tmp_path / "src")
    assert classes == ["cat", "dog", "eel"] and len(samples) == 15
    m = write_shards(samples, tmp_path / "out", "train", classes, max_count=4)
    assert [s.num_samples for s in m.shards] == [4, 4, 4, 3]
    assert [s.name for s in m.shards] == [f"train-{i:06d}.tar" for i in range(4)]
    loaded = load_manifest(tmp_path / "out")
    assert loaded.classes == classes and loaded.num_samples == 15 and loaded.split == "train"
    assert loaded.meta["source"]["type"] == "imagefolder" and loaded.meta["skipped"] == 0
    assert "tldist_version" in loaded.meta and loaded.meta["writer"]["max_count"] == 4
    got = Counter()
    for shard, info in zip(resolve_shard_urls(loaded), loaded.shards):
        members = read_shard(shard)
        assert len(members) == info.num_samples
        for key, parts in members.items():
            assert "." not in key and set(parts) in ({"jpg", "cls"}, {"png", "cls"})
            data = parts.get("jpg") or parts["png"]
            got[(data, int(parts["cls"]))] += 1
    assert got == Counter((p.read_bytes(), c) for p, c in files.items())  # bytes stored untouched
    assert not list((tmp_path / "out").glob("*.partial"))
    # WebDataset itself reads the shards with the same grouping
    ds = wds.WebDataset(resolve_shard_urls(loaded), shardshuffle=False, empty_check=False)
    assert sum(1 for s in ds if "cls" in s) == 15


def test_deterministic_and_byte_limit(tmp_path):
    make_tree(tmp_path / "src", per_class=3)
    classes, samples = samples_from_imagefolder(tmp_path / "src", seed=3)
    a = write_shards(samples, tmp_path / "a", "train", classes, max_size=1)  # one sample per shard
    b = write_shards(samples, tmp_path / "b", "train", classes, max_size=1)
    assert len(a.shards) == 9 and all(s.num_samples == 1 for s in a.shards)
    for sa, sb in zip(a.shard_urls(), b.shard_urls()):
        assert Path(sa).read_bytes() == Path(sb).read_bytes()
    c = write_shards(samples, tmp_path / "c", "train", classes, min_shards=4)
    assert len(c.shards) == 3 and c.num_samples == 9  # ceil(9 / 4) = 3 per shard


def test_val_fraction_and_split_layout(tmp_path):
    files = make_tree(tmp_path / "src", per_class=6)
    out = write_imagefolder(tmp_path / "src", tmp_path / "out", val_fraction=0.34, seed=1)
    tr, va = out["train"], out["val"]
    assert tr.num_samples + va.num_samples == len(files) and va.num_samples == 6  # 2 of 6 per class
    keys = [set().union(*(read_shard(u) for u in m.shard_urls())) for m in (tr, va)]
    assert not keys[0] & keys[1]
    labels = Counter(int(read_shard(u)[k]["cls"]) for u in va.shard_urls() for k in read_shard(u))
    assert labels == {0: 2, 1: 2, 2: 2}
    # ROOT/train + ROOT/val trees: both written, val uses train's classes
    make_tree(tmp_path / "tv" / "train", per_class=3)
    make_tree(tmp_path / "tv" / "val", per_class=1, classes=("dog",))
    out = write_imagefolder(tmp_path / "tv", tmp_path / "out2")
    assert out["val"].classes == ["cat", "dog", "eel"] and out["val"].num_samples == 1
    assert int(next(iter(read_shard(out["val"].shard_urls()[0]).values()))["cls"]) == 1
    with pytest.raises(ConfigError, match="drop the val fraction"):
        write_imagefolder(tmp_path / "tv", tmp_path / "out3", val_fraction=0.2)


def test_corrupt_images_skipped_and_counted(tmp_path):
    make_tree(tmp_path / "src", per_class=2)
    whole = image_bytes(7, "JPEG", size=64)
    (tmp_path / "src" / "cat" / "broken.jpg").write_bytes(whole[: len(whole) * 6 // 10])  # valid header, cut data
    (tmp_path / "src" / "dog" / "garbage.png").write_bytes(b"definitely not a png")
    classes, samples = samples_from_imagefolder(tmp_path / "src")
    m = write_shards(samples, tmp_path / "out", "train", classes)
    assert m.num_samples == 6 and m.meta["skipped"] == 2
    assert any("broken.jpg" in e for e in m.meta["skipped_examples"])
    bad = [Sample(f"k{i}", b"junk", "jpg", 0) for i in range(3)]
    with pytest.raises(DataError, match="no usable samples"):
        write_shards(bad, tmp_path / "none", "train", ["a"])
    assert not (tmp_path / "none" / "manifest.json").exists()
    assert not list((tmp_path / "none").glob("*.tar*"))


def test_crash_keeps_old_set_and_rewrite_removes_stale(tmp_path):
    samples = [Sample(f"s{i}", image_bytes(i, "PNG"), "png", i % 2) for i in range(6)]
    old = write_shards(samples, tmp_path / "out", "train", ["a", "b"], max_count=2)
    assert len(old.shards) == 3

    def crashing():
        yield from samples[:3]
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError):
        write_shards(crashing(), tmp_path / "out", "train", ["a", "b"], max_count=1)
    assert load_manifest(tmp_path / "out").num_samples == 6  # the old, complete set still stands
    assert not list((tmp_path / "out").glob("*.partial"))
    new = write_shards(samples[:2], tmp_path / "out", "train", ["a", "b"], max_count=2)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["train-000000.tar"]
    assert new.num_samples == 2
    with pytest.raises(DataError, match="already holds the 'train'"):
        write_shards(samples, tmp_path / "out", "val", ["a", "b"])


def test_reencode_resize_and_sample_validation(tmp_path):
    samples = [Sample("big", image_bytes(1, "PNG", size=40), "png", 0)]
    m = write_shards(samples, tmp_path / "out", "train", ["a"], reencode="jpeg", max_side=20, quality=80)
    parts = read_shard(m.shard_urls()[0])["big"]
    assert Image.open(io.BytesIO(parts["jpg"])).size == (20, 20)
    for bad, match in [(Sample("a.b", b"x", "jpg", 0), "key"), (Sample("a", b"x", "jpg", 5), "label"),
                       (Sample("a", b"x", "gif", 0), "extension")]:
        with pytest.raises(DataError, match=match):
            write_shards([bad], tmp_path / "bad", "train", ["a"])
    with pytest.raises(DataError, match="duplicate"):
        write_shards(samples * 2, tmp_path / "dup", "train", ["a"])
    with pytest.raises(ConfigError, match="split name"):
        write_shards(samples, tmp_path / "x", "tr/ain", ["a"])
    with pytest.raises(ConfigError, match="max_count"):
        write_shards(samples, tmp_path / "x", "train", ["a"], max_count=0)


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
        with pytest.raises(DataError, match=match):
            samples_from_csv(tmp_path / name, classes=["only"] if name == "range.csv" else None)


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
        samples_from_imagefolder(tmp_path / "empty")


def _decoded(data: bytes, decoder: str):
    import torch

    from tldist.data.transforms import decode_image

    img = decode_image(data, decoder)
    return img if isinstance(img, torch.Tensor) else torch.from_numpy(np.array(img)).permute(2, 0, 1)


def _orientation6_jpeg(w: int, h: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise (portrait)
    buf = io.BytesIO()
    Image.fromarray(np.kron(np.random.default_rng(5).integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8),
                            np.ones((8, 8, 1), dtype=np.uint8))).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_exif_orientation_same_for_stored_and_reencoded_images(tmp_path):
    """Issue 12 #6: one rule at decode time; a re-encode stores the oriented pixels and no tag."""
    small = _orientation6_jpeg(48, 32)
    stored = {}
    for name, kw in {"kept": {}, "resized": {"max_side": 40}, "png": {"reencode": "png"},
                     "jpg": {"reencode": "jpg", "quality": 95}}.items():
        m = write_shards([Sample("k", small, "jpg", 0)], tmp_path / name, "train", ["a"], **kw)
        (parts,) = read_shard(m.shard_urls()[0]).values()
        (data,) = [v for e, v in parts.items() if e != "cls"]
        if name != "kept":
            assert Image.open(io.BytesIO(data)).getexif().get(0x0112, 1) == 1, name  # no tag left to re-apply
        stored[name] = data
    for decoder in ("pil", "torchvision"):
        outs = {name: _decoded(data, decoder) for name, data in stored.items()}
        assert outs["kept"].shape == outs["png"].shape == outs["jpg"].shape == (3, 48, 32)  # portrait
        assert outs["resized"].shape == (3, 40, 27)
        assert torch_equal(outs["kept"], outs["png"])  # PNG re-encode = the decoded pixels
        assert (outs["kept"].int() - outs["jpg"].int()).abs().float().mean() < 8  # JPEG re-encode loss only
        assert (outs["kept"].int() - outs["jpg"].flip(1, 2).int()).abs().float().mean() > 30  # not upside down


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_reencode_uses_the_decoding_rule_for_16_bit(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64), (64, 1)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    for kw in ({"max_side": 32}, {"reencode": "jpg"}, {"reencode": "png"}):
        m = write_shards([Sample("r", buf.getvalue(), "png", 0)], tmp_path / str(len(kw)) / next(iter(kw)),
                         "train", ["a"], **kw)
        (parts,) = read_shard(m.shard_urls()[0]).values()
        (data,) = [v for e, v in parts.items() if e != "cls"]
        for decoder in ("pil", "torchvision"):
            assert abs(_decoded(data, decoder).float().mean().item() - 127.5) < 2, (kw, decoder)


def test_check_decodes_with_the_training_decoders(tmp_path, caplog):
    """--check decode runs decode_image with each data.decode value: an image PIL reads but
    torchvision rejects is skipped (both decoders) or kept (pil only)."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    cut = buf.getvalue()[:-20]  # IEND and the last IDAT checksum gone
    from tldist.data.transforms import decode_image

    decode_image(cut, "pil")  # PIL reads it...
    with pytest.raises(RuntimeError):
        decode_image(cut, "torchvision")  # ...torchvision does not
    good = [Sample(f"g{i}", image_bytes(i, fmt), fmt.lower(), 0) for i, fmt in enumerate(["BMP", "TIFF", "PPM"])]
    samples = good + [Sample("cut", cut, "png", 0)]
    m = write_shards(samples, tmp_path / "both", "train", ["a"], check="decode")
    assert m.num_samples == 3 and m.meta["skipped"] == 1 and "torchvision" in m.meta["skipped_examples"][0]
    assert m.meta["writer"]["decoders"] == ["pil", "torchvision"]
    assert write_shards(samples, tmp_path / "pil", "train", ["a"], check="decode", decoders=["pil"]).num_samples == 4
    header = write_shards(samples, tmp_path / "header", "train", ["a"])  # the default: no IEND, caught cheaply
    assert header.num_samples == 3 and header.meta["skipped_examples"] == ["cut: truncated PNG (no IEND chunk)"]
    with pytest.raises(ConfigError, match="decoders"):
        write_shards(samples, tmp_path / "x", "train", ["a"], decoders=["cv2"])
