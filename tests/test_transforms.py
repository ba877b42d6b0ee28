"""Decoding, train/eval transforms (uint8 CHW output) and the Normalizer."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from tldist.data.transforms import (Normalizer, build_eval_transform, build_train_transform, decode_image,
                                    random_resized_crop_params)
from tldist.errors import ConfigError


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _gradient(w=40, h=30) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :, None].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.uint8)[:, None, None].repeat(w, 1)
    return Image.fromarray(np.concatenate([x, y, 255 - x], axis=2), "RGB")


def _modes() -> dict[str, bytes]:
    rgb = _gradient()
    pal = rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    return {"jpeg-rgb": _encode(rgb, "JPEG"), "png-gray": _encode(rgb.convert("L"), "PNG"),
            "png-rgba": _encode(rgb.convert("RGBA"), "PNG"), "png-palette": _encode(pal, "PNG"),
            "jpeg-gray": _encode(rgb.convert("L"), "JPEG")}


@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
def test_decode_any_mode_to_rgb_uint8(decoder):
    train = build_train_transform(16, (0.5, 1.0), True)
    evalt = build_eval_transform(16)
    for name, data in _modes().items():
        img = decode_image(data, decoder)
        for t in (train, evalt):
            out = t(img, random.Random(0))
            assert out.dtype == torch.uint8 and out.shape == (3, 16, 16), (name, out.shape)
    with pytest.raises(Exception):
        decode_image(b"not an image", decoder)
    with pytest.raises(Exception):
        decode_image(_modes()["jpeg-rgb"][:60], decoder)  # truncated JPEG


def test_train_transform_deterministic_given_rng():
    t = build_train_transform(24, (0.08, 1.0), True, "bicubic")
    img = _gradient(64, 48)
    a, b = t(img, random.Random("x")), t(img, random.Random("x"))
    assert torch.equal(a, b)
    outs = {t(img, random.Random(i)).sum().item() for i in range(10)}
    assert len(outs) > 5  # different seeds -> different crops/flips
    for i in range(200):
        top, left, h, w = random_resized_crop_params(64, 48, (0.08, 1.0), random.Random(i))
        assert 0 <= top and top + h <= 48 and 0 <= left and left + w <= 64 and h > 0 and w > 0


def test_hflip_and_full_crop_match_resize():
    img = _gradient(32, 32)
    t = build_train_transform(32, (1.0, 1.0), hflip=False)
    assert torch.equal(t(img, random.Random(1)), torch.from_numpy(np.array(img)).permute(2, 0, 1))
    flips = build_train_transform(32, (1.0, 1.0), hflip=True)
    outs = [flips(img, random.Random(i)) for i in range(8)]
    ref = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    assert any(torch.equal(o, ref.flip(-1)) for o in outs) and any(torch.equal(o, ref) for o in outs)


def test_eval_transform_center_crop_pil_vs_torchvision():
    data = _encode(_gradient(80, 60), "PNG")
    t = build_eval_transform(28)
    a = t(decode_image(data, "pil"))
    b = t(decode_image(data, "torchvision"))
    assert a.shape == b.shape == (3, 28, 28)
    assert (a.float() - b.float()).abs().mean() < 3  # same geometry, resamplers differ slightly


@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
def test_transforms_write_into_a_batch_row(decoder):
    """``out=batch[i]`` (how loader workers fill a preallocated batch) gives the very same pixels."""
    img = decode_image(_encode(_gradient(50, 40), "PNG"), decoder)
    batch = torch.full((2, 3, 20, 20), 7, dtype=torch.uint8)
    train = build_train_transform(20, (0.3, 1.0), True)
    for i in range(2):
        assert train(img, random.Random(i), out=batch[i]).data_ptr() == batch[i].data_ptr()
        assert torch.equal(batch[i], train(img, random.Random(i)))
    ev = build_eval_transform(20)
    ev(img, out=batch[1])
    assert torch.equal(batch[1], ev(img)) and torch.equal(batch[0], train(img, random.Random(0)))


def test_bad_settings_raise_config_error():
    with pytest.raises(ConfigError, match="lanczos2"):
        build_train_transform(16, (0.1, 1.0), True, "lanczos2")
    with pytest.raises(ConfigError, match="train_crop_scale"):
        build_train_transform(16, (0.5, 0.2), True)
    with pytest.raises(ConfigError, match="data.decode"):
        decode_image(b"", "cv2")


def test_normalizer_matches_reference_and_channels_last():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    out = Normalizer(mean, std)(x)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-5)
    cl = Normalizer(mean, std, channels_last=True)(x)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.allclose(cl, ref, atol=1e-5)
    assert Normalizer(mean, std, dtype=torch.bfloat16)(x).dtype == torch.bfloat16
    assert not Normalizer().state_dict()  # non-persistent buffers
    with pytest.raises(ValueError):
        Normalizer()(x[0])
