"""The shard writer (tldist.data.writer): real images in tmp_path, real shards written and read back."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from helpers import (
    BAD_ODD_FILES as BAD,
    image_bytes,
    make_image_tree as make_tree,
    odd_files,
    read_tar_samples as read_shard,
)
from tldist.data.manifest import load_manifest, resolve_shard_urls
from tldist.data.sources import Sample, samples_from_imagefolder
from tldist.data.writer import header_problem, write_shards
from tldist.errors import ConfigError, DataError


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


def test_corrupt_images_skipped_and_counted(tmp_path):
    make_tree(tmp_path / "src", per_class=2)
    whole = image_bytes(7, "JPEG", size=64)
    (tmp_path / "src" / "cat" / "broken.jpg").write_bytes(whole[: len(whole) * 6 // 10])  # valid header, cut data
    (tmp_path / "src" / "dog" / "garbage.png").write_bytes(b"definitely not a png")
    classes, samples = samples_from_imagefolder(tmp_path / "src")
    m = write_shards(samples, tmp_path / "out", "train", classes)
    assert m.num_samples == 6 and m.meta["skipped"] == 2
    assert any("broken.jpg" in e for e in m.meta["skipped_examples"])
    assert sum(m.meta["skipped_reasons"].values()) == 2 and len(m.meta["skipped_reasons"]) == 2, m.meta  # by reason
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
                       (Sample("a", b"x", "xyz", 0), "extension")]:
        with pytest.raises(DataError, match=match):
            write_shards([bad], tmp_path / "bad", "train", ["a"])
    with pytest.raises(DataError, match="duplicate"):
        write_shards(samples * 2, tmp_path / "dup", "train", ["a"])
    with pytest.raises(ConfigError, match="split name"):
        write_shards(samples, tmp_path / "x", "tr/ain", ["a"])
    with pytest.raises(ConfigError, match="max_count"):
        write_shards(samples, tmp_path / "x", "train", ["a"], max_count=0)


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


def test_header_check_catches_what_decode_catches_on_the_odd_files():
    for name, data in odd_files().items():
        problem = header_problem(data) if data else "empty"
        assert bool(problem) == (name in BAD), (name, problem)
