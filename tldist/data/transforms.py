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
import warnings
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from tldist.errors import ConfigError

DECODERS = ("pil", "torchvision")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
EVAL_CROP_RATIO = 0.875  # resize to size / 0.875 then center-crop, torchvision's reference recipe

DecodedImage = Union[Image.Image, torch.Tensor]


def _check_interpolation(name: str) -> str:
    if name not in INTERPOLATIONS:
        raise ConfigError(f"interpolation '{name}' is not supported: choose one of {', '.join(INTERPOLATIONS)}")
    return name


def _pil_resample(name: str) -> int:
    return {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[name]


def _tv_mode(name: str):
    from torchvision.transforms import InterpolationMode

    return {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR,
            "bicubic": InterpolationMode.BICUBIC}[name]


# ---------------------------------------------------------------------------------------
# Decoding: bytes -> RGB image (PIL image or uint8 [3, H, W] tensor)
# ---------------------------------------------------------------------------------------

def decode_image(data: bytes, decoder: str = "pil") -> DecodedImage:
    """Decode image bytes to RGB: a PIL image (``pil``) or a uint8 [3,H,W] tensor (``torchvision``).

    Grayscale, RGBA and palette images are converted to RGB. Raises (``OSError``,
    ``RuntimeError``, ``ValueError``...) on undecodable bytes; callers count and skip them.
    """
    if decoder == "pil":
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now so truncated files fail here, not later in the transform
        if img.mode == "P":  # palette (maybe with transparency): go through RGBA to avoid PIL warnings
            img = img.convert("RGBA")
        if img.mode != "RGB":
            img = img.convert("RGB")
        return img
    if decoder == "torchvision":
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_image as tv_decode

        # torchvision 0.29 deprecates its image codecs in favour of torchcodec; the user chose
        # this decoder explicitly (data.decode), so don't repeat the warning for every image
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                                category=DeprecationWarning)

        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return tv_decode(buf, mode=ImageReadMode.RGB)
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
                 interpolation: str = "bilinear"):
        if image_size <= 0:
            raise ConfigError(f"image_size {image_size} must be > 0 (set data.image_size or use the model's default)")
        if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ConfigError(f"data.train_crop_scale {list(crop_scale)!r}: use [min, max] with 0 < min <= max <= 1")
        self.image_size = int(image_size)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.hflip = bool(hflip)
        self.interpolation = _check_interpolation(interpolation)

    def __call__(self, img: DecodedImage, rng: Optional[random.Random] = None,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The augmented uint8 [3, S, S] image, written into ``out`` when given."""
        rng = rng if rng is not None else random.Random()
        width, height = image_size_of(img)
        top, left, h, w = random_resized_crop_params(width, height, self.crop_scale, rng)
        flip = self.hflip and rng.random() < 0.5
        size = self.image_size
        if isinstance(img, Image.Image):
            # PIL resizes straight from the crop box: one pass, no intermediate copy
            crop = img.resize((size, size), _pil_resample(self.interpolation), box=(left, top, left + w, top + h))
            if flip:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            return pil_to_tensor(crop, out)
        from torchvision.transforms.v2 import functional as F

        crop = F.resized_crop(img, top, left, h, w, [size, size], interpolation=_tv_mode(self.interpolation),
                              antialias=True)
        return _into(crop.flip(-1) if flip else crop, out)

    def __repr__(self) -> str:
        return (f"TrainTransform(size={self.image_size}, scale={self.crop_scale}, hflip={self.hflip}, "
                f"interpolation={self.interpolation})")


# ---------------------------------------------------------------------------------------
# Evaluation: resize shorter side to size / 0.875, center crop
# ---------------------------------------------------------------------------------------

class EvalTransform:
    """Resize the shorter side to ``image_size / 0.875``, center-crop ``image_size`` -> uint8 [3,S,S]."""

    def __init__(self, image_size: int, interpolation: str = "bilinear", crop_ratio: float = EVAL_CROP_RATIO):
        if image_size <= 0:
            raise ConfigError(f"image_size {image_size} must be > 0 (set data.image_size or use the model's default)")
        self.image_size = int(image_size)
        self.resize_size = int(math.floor(image_size / crop_ratio))
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

        resized = F.resize(img, [new_h, new_w], interpolation=_tv_mode(self.interpolation), antialias=True)
        return _into(resized[:, top:top + self.image_size, left:left + self.image_size], out)

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.image_size}, resize={self.resize_size}, interpolation={self.interpolation})"


def build_train_transform(image_size: int, crop_scale: Sequence[float] = (0.08, 1.0), hflip: bool = True,
                          interpolation: str = "bilinear") -> TrainTransform:
    """Training augmentation: ``t(decoded_image, rng=None) -> uint8 [3, image_size, image_size]``."""
    return TrainTransform(image_size, crop_scale, hflip, interpolation)


def build_eval_transform(image_size: int, interpolation: str = "bilinear") -> EvalTransform:
    """Eval preprocessing: ``t(decoded_image) -> uint8 [3, image_size, image_size]``."""
    return EvalTransform(image_size, interpolation)


# ---------------------------------------------------------------------------------------
# Normalization in the training process
# ---------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalizer(torch.nn.Module):
    """uint8 [B,3,H,W] batch -> normalized float batch on ``device`` (optionally channels_last).

    ``mean``/``std`` are in [0, 1] units (torchvision weights' ``transforms().mean``). The
    copy to the device happens first (4x fewer bytes than float), conversion runs there.
    Buffers are non-persistent, so this module never appears in a model's state dict.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 device: Any = None, channels_last: bool = False, dtype: torch.dtype = torch.float32):
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
        if device is not None:
            self.to(device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Normalizer expects a [B,3,H,W] batch, got shape {tuple(images.shape)}")
        x = images.to(self.scale.device, non_blocking=True).to(torch.float32)
        x = torch.addcmul(self.shift, x, self.scale)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.to(self.dtype) if self.dtype != torch.float32 else x
