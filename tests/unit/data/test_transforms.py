"""Decoding, train/eval transforms (uint8 CHW output) and the Normalizer."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from tldist.data.transforms import (
    Normalizer,
    build_eval_transform,
    build_train_transform,
    decode_image,
    random_resized_crop_params,
)
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


@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
def test_augment_runs_on_the_cropped_image_after_its_draws(decoder):
    """``augment(pil, rng)`` gets the S x S crop (after flip), draws after the crop's draws, writes into ``out``."""
    from PIL import ImageOps

    seen = []

    def invert_and_draw(pil, rng):
        seen.append((pil.size, pil.mode, rng.random()))
        return ImageOps.invert(pil)

    img = decode_image(_encode(_gradient(50, 40), "PNG"), decoder)
    plain = build_train_transform(20, (0.3, 1.0), True)
    aug = build_train_transform(20, (0.3, 1.0), True, augment=invert_and_draw)
    batch = torch.zeros(2, 3, 20, 20, dtype=torch.uint8)
    for i in range(2):
        out = aug(img, random.Random(i), out=batch[i])
        assert out.data_ptr() == batch[i].data_ptr()
        assert torch.equal(batch[i], 255 - plain(img, random.Random(i)))  # same crop + flip, then the augment
        rng = random.Random(i)
        plain.draw(50, 40, rng)
        assert seen[-1] == ((20, 20), "RGB", rng.random())  # its draws follow the crop/flip draws


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
    out = Normalizer(mean, std, device="cpu")(x)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-5)
    cl = Normalizer(mean, std, device="cpu", channels_last=True)(x)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.allclose(cl, ref, atol=1e-5)
    assert Normalizer(mean, std, device="cpu", dtype=torch.bfloat16)(x).dtype == torch.bfloat16
    assert not Normalizer(device="cpu").state_dict()  # non-persistent buffers
    with pytest.raises(ValueError):
        Normalizer(device="cpu")(x[0])


# ---------------------------------------------------------------------------------------
# One decoding rule for both decoders (issue 12: 16-bit, modes, formats, EXIF orientation)
# ---------------------------------------------------------------------------------------

def _png_raw(arr: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG from big-endian uint16 [H, W, C] (PIL cannot write 16-bit RGB/LA/RGBA)."""
    import struct
    import zlib

    h, w = arr.shape[:2]
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


RAMP16 = np.tile(np.linspace(0, 65535, 64), (64, 1)).astype(np.uint16)  # 64x64 horizontal 16-bit ramp
RAMP8 = np.repeat((RAMP16 >> 8).astype(np.uint8)[None], 3, 0)  # what it must decode to: the high byte


def _mode_cases() -> dict[str, tuple[bytes, "np.ndarray | None"]]:
    """name -> (encoded bytes, expected uint8 [3,H,W] or None when lossy)."""
    rgb = _gradient(30, 20)
    rgb_chw = np.asarray(rgb).transpose(2, 0, 1)
    gray = np.repeat(np.asarray(rgb.convert("L"))[None], 3, 0)
    pal = rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    rgba = np.dstack([np.asarray(rgb), np.linspace(0, 255, 30, dtype=np.uint8)[None, :].repeat(20, 0)])
    ramp16_rgb = np.repeat(RAMP16[:, :, None], 3, 2)
    bilevel = rgb.convert("1")
    return {
        "L png": (_encode(rgb.convert("L"), "PNG"), gray),
        "I;16 png ramp": (_encode(Image.fromarray(RAMP16), "PNG"), RAMP8),
        "I;16 tiff ramp": (_encode(Image.fromarray(RAMP16), "TIFF"), RAMP8),
        "I 32-bit tiff": (_encode(Image.fromarray(RAMP16.astype(np.int32)), "TIFF"), RAMP8),
        "F tiff 0..1": (_encode(Image.fromarray(RAMP16.astype(np.float32) / 65535), "TIFF"),
                        np.repeat(np.rint(RAMP16 / 65535 * 255).astype(np.uint8)[None], 3, 0)),
        "RGB 16-bit png": (_png_raw(ramp16_rgb, 2), RAMP8),
        "LA 16-bit png": (_png_raw(np.dstack([RAMP16, RAMP16[::-1]]), 4), RAMP8),
        "RGBA 16-bit png": (_png_raw(np.dstack([ramp16_rgb, RAMP16[::-1]]), 6), RAMP8),
        "LA png": (_encode(rgb.convert("LA"), "PNG"), gray),
        "RGBA png (alpha dropped)": (_encode(Image.fromarray(rgba, "RGBA"), "PNG"), rgb_chw),
        "P png with transparency": (_encode(pal, "PNG"), np.asarray(pal.convert("RGB")).transpose(2, 0, 1)),
        "1-bit png": (_encode(bilevel, "PNG"), np.repeat(np.asarray(bilevel.convert("L"))[None], 3, 0)),
        "RGBA webp lossless": (_encode_kw(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True, exact=True), rgb_chw),
        "BMP": (_encode(rgb, "BMP"), rgb_chw),
        "PPM": (_encode(rgb, "PPM"), rgb_chw),
        "TIFF": (_encode(rgb, "TIFF"), rgb_chw),
        "CMYK jpeg": (_encode_kw(rgb.convert("CMYK"), "JPEG", quality=95), None),
        "gray jpeg": (_encode(rgb.convert("L"), "JPEG"), None),
        "RGB jpeg": (_encode(rgb, "JPEG"), None),
    }


def _encode_kw(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _as_tensor(img) -> torch.Tensor:
    if isinstance(img, Image.Image):
        assert img.mode == "RGB"
        return torch.from_numpy(np.array(img)).permute(2, 0, 1)
    return img


@pytest.mark.parametrize("name", list(_mode_cases()))
def test_both_decoders_give_the_same_8bit_rgb_for_every_mode(name):
    data, expected = _mode_cases()[name]
    pil = _as_tensor(decode_image(data, "pil"))
    tv = decode_image(data, "torchvision")
    for out in (pil, tv):
        assert isinstance(out, torch.Tensor) and out.dtype == torch.uint8 and out.dim() == 3 and out.shape[0] == 3
    assert pil.shape == tv.shape
    assert (pil.int() - tv.int()).abs().max() <= (2 if expected is None else 0), name
    if expected is not None:
        assert torch.equal(pil, torch.from_numpy(np.ascontiguousarray(expected))), name
    if "ramp" in name or "0..1" in name:
        assert abs(pil.float().mean().item() - 127.5) < 1 and abs(tv.float().mean().item() - 127.5) < 1


def _oriented(fmt: str, orientation: int, **kw) -> bytes:
    """48x32 blocky image tagged with an EXIF orientation."""
    base = Image.fromarray(np.kron(np.random.default_rng(3).integers(0, 255, (4, 6, 3), dtype=np.uint8),
                                   np.ones((8, 8, 1), dtype=np.uint8)))
    exif = Image.Exif()
    exif[0x010F] = "Camera"
    exif[0x0112] = orientation
    return _encode_kw(base, fmt, exif=exif.tobytes(), **kw)


@pytest.mark.parametrize("fmt,kw", [("JPEG", {"quality": 95}), ("PNG", {}), ("WEBP", {"lossless": True}),
                                    ("TIFF", {})])
def test_exif_orientation_applied_by_both_decoders(fmt, kw):
    from PIL import ImageOps

    for orientation in range(1, 9):
        data = _oriented(fmt, orientation, **kw)
        reference = _as_tensor(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
        assert reference.shape[1:] == ((48, 32) if orientation >= 5 else (32, 48))
        for decoder in ("pil", "torchvision"):
            assert torch.equal(_as_tensor(decode_image(data, decoder)), reference), (fmt, orientation, decoder)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_orientation_only_from_exif_and_malformed_exif_is_ignored():
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    for data in (_encode_kw(_gradient(48, 32), "JPEG", xmp=xmp),  # torchvision ignores XMP: so does the rule
                 _encode_kw(_gradient(48, 32), "JPEG", exif=b"Exif\x00\x00MM\x00\x2a\x00\x00\xff\xff")):
        pil, tv = _as_tensor(decode_image(data, "pil")), decode_image(data, "torchvision")
        assert pil.shape == tv.shape == (3, 32, 48) and (pil.int() - tv.int()).abs().max() <= 2


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v3_large", "resnet18", "efficientnet_b1", "vit_b_16"])
def test_eval_preprocess_matches_the_weights_transforms(name):
    """At the weights' own size the resize, crop and interpolation are those of the torchvision weights
    (``weights.transforms()``: resnet50/mobilenet_v3_large 232, efficientnet_b1 255...)."""
    from torchvision.models import get_model_weights

    from tldist.config import ModelConfig
    from tldist.data.transforms import build_eval_transform, eval_preprocess
    from tldist.models.factory import build_model

    t = get_model_weights(name).DEFAULT.transforms()
    _, info = build_model(ModelConfig(name=name, pretrained=False), 3)
    pre = eval_preprocess(info)
    assert (pre["image_size"], pre["resize"], pre["interpolation"]) == \
        (t.crop_size[0], t.resize_size[0], t.interpolation.value)
    assert build_eval_transform(pre["image_size"], pre["interpolation"], info.crop_pct).resize_size == pre["resize"]


def test_old_model_json_keeps_its_recorded_resize():
    """Exports written before ``crop_pct`` was recorded: the recorded ``resize`` is what they get."""
    from tldist.data.transforms import (
        build_eval_transform,
        eval_resize_size,
        preprocess_crop_pct,
    )

    for size, resize in ((16, 18), (224, 232), (240, 255), (224, 256), (384, 384)):
        crop_pct = preprocess_crop_pct({"image_size": size, "resize": resize})
        assert eval_resize_size(size, crop_pct) == build_eval_transform(size, crop_pct=crop_pct).resize_size == resize
    assert preprocess_crop_pct({"image_size": 224}) == 0.875
    assert math.isclose(preprocess_crop_pct({"image_size": 224, "crop_pct": 0.95}), 0.95)


def test_decode_errors_name_the_error_without_an_object_repr():
    """PIL's 'cannot identify image file <_io.BytesIO object at 0x7f...>' reaches users (skip warnings, skip
    counts, `tldist predict`) without the in-memory object's address."""
    import io

    from PIL import Image

    from tldist.data.transforms import decode_error

    try:
        Image.open(io.BytesIO(b"definitely not an image"))
    except Exception as e:  # noqa: BLE001 - whatever PIL raises
        msg = decode_error(e)
    assert msg == "UnidentifiedImageError: cannot identify image file", msg
