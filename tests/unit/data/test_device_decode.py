"""``data.decode=nvjpeg`` (issue 13): JPEGs decoded, cropped and resized by the trainer on its device.

Without CUDA the very same code runs with device "cpu", where torchvision.io.decode_jpeg is the
libjpeg-turbo decoder ``data.decode=torchvision`` uses and the crop/resize is the CPU path's own
code: batches must then be bit-identical to ``data.decode=torchvision`` (same crops, same pixels).
Against ``data.decode=pil`` they differ only by the resampler (PIL's vs torch's antialiased
bilinear): mean |diff| < 3 levels, as between the two CPU decoders (test_transforms).
"""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import exif_jpeg as _jpeg
from tldist.config import DataConfig, load_config
from tldist.data.device_decode import JpegRows, images_on, jpeg_header
from tldist.data.pipeline import check_data_config, build_eval_loader, build_train_loader
from tldist.data.transforms import build_eval_transform, build_train_transform, decode_image, image_size_of
from tldist.errors import ConfigError
from tldist.world import World

SIZE = 24


def _png(w: int, h: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _device_batch(transform, samples: list[tuple[bytes, object]]) -> dict:
    """A batch as a worker makes it: JPEGs left encoded, other images decoded on the CPU."""
    rows = JpegRows(transform)
    image = torch.zeros(len(samples), 3, SIZE, SIZE, dtype=torch.uint8)
    for i, (data, rng) in enumerate(samples):
        if not rows.add(i, data, rng):
            transform(decode_image(data, "torchvision"), rng, out=image[i])
    return {"image": image, "mask": torch.ones(len(samples), dtype=torch.bool),
            "key": [f"k{i}" for i in range(len(samples))], **rows.take()}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_crops_and_pixels_equal_the_cpu_path(orientation):
    """The worker draws each crop from the JPEG header (size after EXIF orientation) with the very
    draws of the CPU path; the device decode then gives the CPU path's pixels exactly."""
    train = build_train_transform(SIZE, (0.08, 1.0), hflip=True)
    datas = [_jpeg(70, 45, s, orientation) for s in range(3)] + [_jpeg(33, 90, 9, orientation, mode="L")]
    for k, data in enumerate(datas):
        shown = decode_image(data, "torchvision")  # EXIF applied: the image training sees
        assert jpeg_header(data) == (*image_size_of(shown), orientation)
        for seed in range(6):
            rows, a, b = JpegRows(train), random.Random(seed), random.Random(seed)
            assert rows.add(0, data, a)
            assert rows.meta[0][1:] == train.draw(*image_size_of(shown), b)
            assert a.random() == b.random()  # no extra or missing draws: later draws stay aligned
    eval_t = build_eval_transform(SIZE)
    for transform, rng in ((train, lambda i: random.Random(i)), (eval_t, lambda i: None)):
        batch = _device_batch(transform, [(d, rng(i)) for i, d in enumerate(datas)])
        assert batch["_jpeg"]["rows"].tolist() == [0, 1, 2, 3]
        got = images_on(batch, "cpu")
        for i, data in enumerate(datas):
            ref = transform(decode_image(data, "torchvision"), rng(i))
            assert torch.equal(got[i], ref), (type(transform).__name__, orientation, i)
        assert batch["image"] is got and "_jpeg" not in batch and torch.equal(images_on(batch, "cpu"), got)


def test_other_images_fall_back_to_worker_decoding():
    """PNG and CMYK JPEG rows are decoded by the worker and carried in ``image``; JPEGs that do not
    end with EOI (truncated) too, so CPU decoding skips them as before."""
    train = build_train_transform(SIZE, (0.3, 1.0))
    cmyk = _jpeg(40, 40, 3, mode="CMYK")
    assert jpeg_header(cmyk) is None and jpeg_header(_png(20, 20, 1)) is None
    assert jpeg_header(_jpeg(40, 40, 3)[:-300]) is None
    datas = [_png(50, 40, 1), _jpeg(60, 50, 2), cmyk, _jpeg(45, 64, 4, orientation=6), _png(30, 70, 5)]
    batch = _device_batch(train, [(d, random.Random(i)) for i, d in enumerate(datas)])
    assert batch["_jpeg"]["rows"].tolist() == [1, 3]
    got = images_on(batch, "cpu")
    for i, data in enumerate(datas):
        assert torch.equal(got[i], train(decode_image(data, "torchvision"), random.Random(i))), i


def test_undecodable_jpeg_row_is_zeros_and_masked(caplog):
    """A JPEG whose header reads but whose data does not decode: zeros, mask False, a warning naming it."""
    good = _jpeg(40, 30, 1)
    bad = good[:len(good) // 2] + bytes(np.random.default_rng(0).integers(0, 255, len(good) // 2, dtype=np.uint8))
    bad = bad + b"\xff\xd9"
    with pytest.raises(RuntimeError):
        decode_image(bad, "torchvision")
    batch = _device_batch(build_eval_transform(SIZE), [(good, None), (bad, None)])
    got = images_on(batch, "cpu")
    assert torch.equal(got[0], build_eval_transform(SIZE)(decode_image(good, "torchvision")))
    assert not got[1].any() and batch["mask"].tolist() == [True, False]
    assert "k1" in caplog.text and "nvjpeg" in caplog.text


def _batches(cfg: DataConfig, n: int) -> list[dict]:
    loader = build_train_loader(cfg, World(), image_size=SIZE, recycle_batches=True)  # as the trainer builds it
    try:
        out = []
        for _ in range(n):
            b = next(loader)
            jpegs = len(b["_jpeg"]["rows"]) if "_jpeg" in b else 0
            out.append({**b, "jpegs": jpegs, "image": images_on(b, "cpu").clone()})  # recycled buffers get refilled
        return out
    finally:
        loader.close()


@pytest.mark.parametrize("source", ["train", "mixed"])
def test_train_loader_batches_equal_torchvision_decode(jpeg_shards, source):
    """Through the real loader (2 worker processes, recycled buffers): the same samples, crops and
    pixels as data.decode=torchvision; within the resampler tolerance of data.decode=pil."""
    base = dict(train=[str(jpeg_shards / source)], batch_size=8, num_workers=2, shuffle_buffer=32, seed=3)
    dev = _batches(DataConfig(**base, decode="nvjpeg"), 6)
    tv = _batches(DataConfig(**base, decode="torchvision"), 6)
    pil = _batches(DataConfig(**base, decode="pil"), 6)
    for d, t, p in zip(dev, tv, pil):
        assert d["key"] == t["key"] and torch.equal(d["label"], t["label"])
        assert torch.equal(d["image"], t["image"])
        assert (d["image"].float() - p["image"].float()).abs().mean() < 3
    jpegs = sum(d["jpegs"] for d in dev)
    assert jpegs == 6 * 8 if source == "train" else 0 < jpegs < 6 * 8  # mixed: PNG rows decoded by the workers


def test_eval_loader_batches_equal_torchvision_decode(jpeg_shards):
    base = dict(val=str(jpeg_shards / "val"), batch_size=8, num_workers=2)
    dev = list(build_eval_loader(DataConfig(**base, decode="nvjpeg"), World(), image_size=SIZE))
    tv = list(build_eval_loader(DataConfig(**base, decode="torchvision"), World(), image_size=SIZE))
    assert len(dev) == len(tv) > 1
    for d, t in zip(dev, tv):
        assert d["key"] == t["key"] and torch.equal(d["mask"], t["mask"])
        assert torch.equal(images_on(d, "cpu"), t["image"])


def test_bad_decode_value_is_one_line_naming_the_key(jpeg_shards):
    with pytest.raises(ConfigError, match=r"data\.decode.*nvjpeg") as e:
        check_data_config(load_config(None, ["data.train=[a]", "data.decode=nvjpg"]).validate().data)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"config key 'data\.decode' has bad value 'cuda'") as e:
        build_train_loader(DataConfig(train=[str(jpeg_shards / "train")], decode="cuda"), World(), image_size=SIZE)
    assert "\n" not in str(e.value)
