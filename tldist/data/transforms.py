"""Image decoding and augmentation for loader workers, and normalization for the trainer.

Workers turn raw image bytes into **uint8** CHW tensors of a fixed size; converting to
float and normalizing happens in the training process (ideally on the accelerator) with
:class:`Normalizer`. Passing uint8 instead of float32 batches between processes is 4x less
data and was measured at ~0.92 of the decode ceiling vs ~0.5 for float batches.

Training augmentation takes an explicit ``random.Random`` so that a sample's crop and flip
depend only on its position in the stream: a resumed run sees the same augmentations.
"""

from __future__ import annotations

import io
import math
import random
import re
import struct
import warnings
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from tldist.errors import ConfigError

DECODERS = ("pil", "torchvision")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
EVAL_CROP_PCT = 0.875
"""Default eval center-crop fraction (resize 256, crop 224: torchvision's reference recipe); a model's
own value comes from its weights (``ModelInfo.crop_pct``)."""

DecodedImage = Union[Image.Image, torch.Tensor]


def _check_interpolation(name: str) -> str:
    if name not in INTERPOLATIONS:
        raise ConfigError(f"interpolation '{name}' is not supported: choose one of {', '.join(INTERPOLATIONS)}")
    return name


def _pil_resample(name: str) -> int:
    return {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[name]


def tv_interpolation(name: str):
    """torchvision's ``InterpolationMode`` for ``nearest``/``bilinear``/``bicubic``."""
    from torchvision.transforms import InterpolationMode

    return {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR,
            "bicubic": InterpolationMode.BICUBIC}[name]


# ---------------------------------------------------------------------------------------
# Decoding: bytes -> RGB image (PIL image or uint8 [3, H, W] tensor)
# ---------------------------------------------------------------------------------------
# One rule for both decoders, so a shard set trains on the same pixels whichever is chosen:
#  * the EXIF Orientation tag (JPEG APP1, PNG eXIf, WebP EXIF, TIFF tag) is applied; orientation
#    found only in XMP or PNG text chunks is ignored (torchvision does not read it);
#  * 16-bit samples keep their high byte (v >> 8, torchvision's to_dtype(uint8, scale=True));
#    mode I (32-bit int) is clipped to 0..65535 first; mode F is taken as 0..1 and scaled by 255;
#  * grayscale and 1-bit are replicated to RGB, palettes are expanded, CMYK/YCbCr are converted
#    by the codec; alpha is DROPPED, not composited (the colour stored under it is kept), as
#    torchvision's ImageReadMode.RGB does.
# torchvision decodes JPEG, PNG and WebP without EXIF or animation; every other format (BMP,
# TIFF, PPM, GIF...) and those WebPs go through PIL with the same rule.

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_ORIENTATION = 0x0112


def _torchvision_reads(data: bytes) -> bool:
    """Whether torchvision.io decodes ``data`` by the rule above (from the first bytes only)."""
    if data[:3] == b"\xff\xd8\xff" or data[:8] == _PNG_MAGIC:
        return True
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        # extended WebP header: flags byte 20, 0x08 = EXIF (torchvision ignores its orientation),
        # 0x02 = animation (torchvision cannot decode it)
        return not (data[12:16] == b"VP8X" and len(data) > 20 and data[20] & 0x0A)
    return False


def exif_orientation(img: Image.Image) -> int:
    """The EXIF Orientation tag (1..8; 1 when absent), ignoring XMP as torchvision does."""
    tags = getattr(img, "tag_v2", None)  # TIFF: a tag of the image itself
    if tags is not None:
        return int(tags.get(_ORIENTATION, 1) or 1)
    raw = img.info.get("exif")
    return _orientation_in_exif(raw) if raw else 1


def _orientation_in_exif(raw: bytes) -> int:
    """Orientation from raw EXIF bytes (``Exif\\0\\0`` + TIFF header + IFD0); 1 if absent or malformed.

    Reads the one tag by hand: PIL's ``Image.Exif().load`` parses all of IFD0, ~60 us per camera
    JPEG, which is ~7% of decoding it.
    """
    if raw[:6] == b"Exif\x00\x00":
        raw = raw[6:]
    end = {b"II": "<", b"MM": ">"}.get(bytes(raw[:2]))
    if end is None:
        return 1
    try:
        (ifd,) = struct.unpack_from(end + "I", raw, 4)
        (count,) = struct.unpack_from(end + "H", raw, ifd)
        for i in range(min(count, 512)):
            tag, kind = struct.unpack_from(end + "HH", raw, ifd + 2 + 12 * i)
            if tag == _ORIENTATION:
                (value,) = struct.unpack_from(end + ("H" if kind == 3 else "I"), raw, ifd + 2 + 12 * i + 8)
                return value if 1 <= value <= 8 else 1
    except struct.error:
        return 1
    return 1


def to_8bit(img: Image.Image) -> Image.Image:
    """A PIL image of any mode as 8-bit ``L`` or ``RGB`` by the module's rule (alpha dropped,
    16-bit -> high byte, I clipped to 16 bits, F as 0..1). ``L``/``RGB`` come back unchanged."""
    mode = img.mode
    if mode in ("RGB", "L"):
        return img
    if mode.startswith("I;16"):
        return Image.fromarray((np.asarray(img) >> 8).astype(np.uint8))
    if mode == "I":
        return Image.fromarray((np.clip(np.asarray(img), 0, 65535) >> 8).astype(np.uint8))
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0)
        return Image.fromarray(np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8))
    if mode in ("1", "LA", "La"):
        return img.convert("L")
    if mode in ("P", "PA"):  # through RGBA: PIL warns when a palette with transparency goes straight to RGB
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")


def open_image(data: bytes) -> Image.Image:
    """Decode bytes with PIL, apply the EXIF orientation and convert to 8-bit ``L`` or ``RGB``.

    The PIL half of :func:`decode_image`, also used by the shard writer to re-encode exactly
    the pixels training sees. Raises PIL's errors (``OSError``, ``ValueError``...) on bad bytes.
    """
    img = Image.open(io.BytesIO(data))
    img.load()  # decode now so truncated files fail here, not later in the transform
    orientation = exif_orientation(img)
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
    return to_8bit(img)


_OBJECT_REPR = re.compile(r" ?<[\w.]+ object at 0x[0-9a-fA-F]+>")


def decode_error(e: BaseException) -> str:
    """``'<ExceptionType>: <message>'`` of a failed image decode, without the in-memory object's repr that
    PIL puts in its message (``cannot identify image file <_io.BytesIO object at 0x7f...>``): the text of
    every skip warning, skip count and one-line error about an unreadable image."""
    return f"{type(e).__name__}: {_OBJECT_REPR.sub('', str(e)).strip()}"


def decode_image(data: bytes, decoder: str = "pil") -> DecodedImage:
    """Decode image bytes to RGB: a PIL image (``pil``) or a uint8 [3,H,W] tensor (``torchvision``).

    Both decoders follow the rule above (EXIF orientation applied, 16-bit -> high byte, alpha
    dropped), so they give the same pixels up to JPEG decoder rounding; formats torchvision
    cannot read (BMP, TIFF, PPM, GIF...) are decoded by PIL and returned as a tensor. Raises
    (``OSError``, ``RuntimeError``, ``ValueError``...) on undecodable bytes; callers count and
    skip them.
    """
    if decoder == "pil":
        img = open_image(data)
        return img if img.mode == "RGB" else img.convert("RGB")
    if decoder == "torchvision":
        if not _torchvision_reads(data):
            return pil_to_tensor(decode_image(data, "pil"))
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_image as tv_decode

        # torchvision 0.29 deprecates its image codecs in favour of torchcodec; the user chose
        # this decoder explicitly (data.decode), so don't repeat the warning for every image
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                                category=DeprecationWarning)

        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        img = tv_decode(buf, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        if img.dtype != torch.uint8:  # 16-bit PNG: keep the high byte, as PIL does for 16-bit RGB
            from torchvision.transforms.v2.functional import to_dtype

            img = to_dtype(img, torch.uint8, scale=True)
        return img
    raise ConfigError(f"data.decode '{decoder}' is not supported: choose one of {', '.join(DECODERS)}")


def image_size_of(img: DecodedImage) -> tuple[int, int]:
    """(width, height) of a decoded image."""
    if isinstance(img, Image.Image):
        return img.size
    return int(img.shape[-1]), int(img.shape[-2])


def pil_to_tensor(img: Image.Image, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, H, W] tensor: written into ``out`` (a contiguous [3, H, W] uint8
    tensor, e.g. a row of a preallocated batch) when given, else a new contiguous tensor."""
    arr = np.asarray(img, dtype=np.uint8)
    if out is None:
        out = torch.empty(3, arr.shape[0], arr.shape[1], dtype=torch.uint8)
    # numpy's channel split is ~40x faster than torch's permute().contiguous() on a busy machine
    dst = out.numpy()
    for c in range(3):
        dst[c] = arr[..., c]
    return out


def _into(image: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    """A uint8 [3, H, W] tensor result, copied into ``out`` when given, else made contiguous."""
    if out is None:
        return image.contiguous()
    out.copy_(image)
    return out


# ---------------------------------------------------------------------------------------
# Training: RandomResizedCrop + horizontal flip with an explicit RNG
# ---------------------------------------------------------------------------------------

def random_resized_crop_params(width: int, height: int, scale: Sequence[float], rng: random.Random,
                               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """Crop box ``(top, left, h, w)`` as in torchvision's RandomResizedCrop, drawn from ``rng``."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    # fallback: the largest centered crop with the aspect ratio clamped into `ratio`
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TrainTransform:
    """Random resized crop to ``image_size`` (+ optional horizontal flip) -> uint8 [3,S,S]."""

    def __init__(self, image_size: int, crop_scale: Sequence[float] = (0.08, 1.0), hflip: bool = True,
                 interpolation: str = "bilinear", augment: Any = None):
        if image_size <= 0:
            raise ConfigError(f"image_size {image_size} must be > 0 (set data.image_size or use the model's default)")
        if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ConfigError(f"data.train_crop_scale {list(crop_scale)!r}: use [min, max] with 0 < min <= max <= 1")
        self.image_size = int(image_size)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.hflip = bool(hflip)
        self.interpolation = _check_interpolation(interpolation)
        self.augment = augment
        """``augment(pil_image, rng) -> pil_image`` after crop + flip (:class:`tldist.data.augment.WorkerAugment`)."""

    def __call__(self, img: DecodedImage, rng: Optional[random.Random] = None,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The augmented uint8 [3, S, S] image, written into ``out`` when given."""
        rng = rng if rng is not None else random.Random()
        params = self.draw(*image_size_of(img), rng)
        if self.augment is None:
            return self.apply(img, params, out)
        # policy/jitter on the cropped image, its seed drawn from rng after the crop and flip
        crop = self.apply(img, params, None if isinstance(img, Image.Image) else out, pil=True)
        return pil_to_tensor(self.augment(crop, rng), out)

    def draw(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int, bool]:
        """``(top, left, h, w, flip)`` for a ``width`` x ``height`` px image: all of this transform's draws from
        ``rng``, in order (``data.decode=nvjpeg`` workers draw them from the JPEG header alone)."""
        top, left, h, w = random_resized_crop_params(width, height, self.crop_scale, rng)
        return top, left, h, w, self.hflip and rng.random() < 0.5

    def apply(self, img: DecodedImage, params: Sequence, out: Optional[torch.Tensor] = None,
              pil: bool = False) -> Any:
        """``img`` cropped to ``params`` (from :meth:`draw`), resized to S x S and maybe flipped: uint8
        [3, S, S] on ``img``'s device, written into ``out`` when given; with ``pil`` an RGB PIL image
        (a tensor result, in ``out`` if given, is wrapped without another copy of its pixels)."""
        top, left, h, w, flip = (int(v) for v in params)
        size = self.image_size
        if isinstance(img, Image.Image):
            # PIL resizes straight from the crop box: one pass, no intermediate copy
            crop = img.resize((size, size), _pil_resample(self.interpolation), box=(left, top, left + w, top + h))
            if flip:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            return crop if pil else pil_to_tensor(crop, out)
        from torchvision.transforms.v2 import functional as F

        crop = F.resized_crop(img, top, left, h, w, [size, size], interpolation=tv_interpolation(self.interpolation),
                              antialias=True)
        crop = _into(crop.flip(-1) if flip else crop, out)
        return Image.fromarray(crop.permute(1, 2, 0).cpu().numpy(), "RGB") if pil else crop

    def __repr__(self) -> str:
        return (f"TrainTransform(size={self.image_size}, scale={self.crop_scale}, hflip={self.hflip}, "
                f"interpolation={self.interpolation}, augment={self.augment})")


# ---------------------------------------------------------------------------------------
# Evaluation: resize shorter side to size / crop_pct, center crop
# ---------------------------------------------------------------------------------------

def eval_resize_size(image_size: int, crop_pct: float = EVAL_CROP_PCT) -> int:
    """Shorter-side size (px) before the eval center crop: ``floor(image_size / crop_pct)`` (timm's rule).

    The one definition of eval resizing: training eval, ``tldist eval``, ``predict``, adapt,
    compress and ``model.json`` all go through it. A 1e-6 px tolerance keeps float error from
    losing a pixel (torchvision resnet50 V2 weights: 224 / (224/232) -> 232). Raises
    :class:`ConfigError` unless ``0 < crop_pct <= 1``.
    """
    if not (isinstance(crop_pct, (int, float)) and 0 < crop_pct <= 1):
        raise ConfigError(f"eval crop_pct {crop_pct!r} must be in (0, 1]: the fraction of the resized image "
                          "kept by the center crop (0.875 = resize 256, crop 224)")
    return int(math.floor(image_size / crop_pct + 1e-6))


def eval_preprocess(info: Any, image_size: int = 0) -> dict[str, Any]:
    """A model's eval preprocessing as recorded in ``model.json`` (``"preprocess"``).

    ``info`` is a :class:`tldist.models.factory.ModelInfo` (its ``input_size``, ``crop_pct``,
    ``interpolation``, ``mean``, ``std`` come from the weights' metadata: torchvision's
    ``weights.transforms()``, timm's ``pretrained_cfg``); ``image_size`` (0: the model's own)
    overrides the crop size. Returns ``{"image_size", "resize", "crop_pct", "interpolation",
    "mean", "std"}`` with ``resize = eval_resize_size(image_size, crop_pct)``.
    """
    size = int(image_size or info.input_size)
    return {"image_size": size, "resize": eval_resize_size(size, info.crop_pct), "crop_pct": float(info.crop_pct),
            "interpolation": info.interpolation, "mean": list(info.mean), "std": list(info.std)}


def preprocess_crop_pct(pre: dict[str, Any]) -> float:
    """``crop_pct`` of a ``model.json`` ``"preprocess"``: ``image_size / resize`` when it records the
    resize (so :func:`eval_resize_size` gives that resize back exactly), else its ``crop_pct``, else 0.875."""
    if pre.get("resize"):
        return int(pre["image_size"]) / int(pre["resize"])
    return float(pre.get("crop_pct") or EVAL_CROP_PCT)


class EvalTransform:
    """Resize the shorter side to :func:`eval_resize_size` ``(image_size, crop_pct)``, center-crop
    ``image_size`` -> uint8 [3,S,S]."""

    def __init__(self, image_size: int, interpolation: str = "bilinear", crop_pct: float = EVAL_CROP_PCT):
        if image_size <= 0:
            raise ConfigError(f"image_size {image_size} must be > 0 (set data.image_size or use the model's default)")
        self.image_size = int(image_size)
        self.crop_pct = float(crop_pct)
        self.resize_size = eval_resize_size(self.image_size, crop_pct)
        self.interpolation = _check_interpolation(interpolation)

    def __call__(self, img: DecodedImage, rng: Optional[random.Random] = None,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The preprocessed uint8 [3, S, S] image, written into ``out`` when given."""
        width, height = image_size_of(img)
        short = min(width, height)
        new_w = max(self.image_size, int(round(width * self.resize_size / short)))
        new_h = max(self.image_size, int(round(height * self.resize_size / short)))
        top, left = (new_h - self.image_size) // 2, (new_w - self.image_size) // 2
        if isinstance(img, Image.Image):
            resized = img.resize((new_w, new_h), _pil_resample(self.interpolation))
            return pil_to_tensor(resized.crop((left, top, left + self.image_size, top + self.image_size)), out)
        from torchvision.transforms.v2 import functional as F

        resized = F.resize(img, [new_h, new_w], interpolation=tv_interpolation(self.interpolation), antialias=True)
        return _into(resized[:, top:top + self.image_size, left:left + self.image_size], out)

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.image_size}, resize={self.resize_size}, interpolation={self.interpolation})"


def build_train_transform(image_size: int, crop_scale: Sequence[float] = (0.08, 1.0), hflip: bool = True,
                          interpolation: str = "bilinear", augment: Any = None) -> TrainTransform:
    """Training augmentation: ``t(decoded_image, rng=None) -> uint8 [3, image_size, image_size]``; ``augment``
    (:func:`tldist.data.augment.build_worker_augment`) runs on the cropped, flipped image."""
    return TrainTransform(image_size, crop_scale, hflip, interpolation, augment)


def build_eval_transform(image_size: int, interpolation: str = "bilinear",
                         crop_pct: float = EVAL_CROP_PCT) -> EvalTransform:
    """Eval preprocessing: ``t(decoded_image) -> uint8 [3, image_size, image_size]``: resize the shorter
    side to :func:`eval_resize_size` with ``interpolation``, center-crop ``image_size``. Pass the model's
    ``ModelInfo.crop_pct`` (or :func:`preprocess_crop_pct` of a ``model.json``)."""
    return EvalTransform(image_size, interpolation, crop_pct)


# ---------------------------------------------------------------------------------------
# Normalization in the training process
# ---------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalizer(torch.nn.Module):
    """uint8 [B,3,H,W] batch -> normalized float batch on ``device`` (optionally channels_last).

    ``mean``/``std`` are in [0, 1] units (torchvision weights' ``transforms().mean``). The
    copy to the device happens first (4x fewer bytes than float), conversion runs there.
    ``device`` has no default: the caller passes the model's device (``accelerator.device``),
    so a batch never takes a detour through the CPU. Buffers are non-persistent, so this module
    never appears in a model's state dict.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, *,
                 device: Any, channels_last: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ConfigError(f"normalization mean {list(mean)} / std {list(std)}: give 3 values each, std > 0")
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        # x_norm = (x / 255 - mean) / std = x * scale + shift
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", -mean_t / std_t, persistent=False)
        self.channels_last = channels_last
        self.dtype = dtype
        self.to(device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Normalizer expects a [B,3,H,W] batch, got shape {tuple(images.shape)}")
        x = images.to(self.scale.device, non_blocking=True).to(torch.float32)
        x = torch.addcmul(self.shift, x, self.scale)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.to(self.dtype) if self.dtype != torch.float32 else x
