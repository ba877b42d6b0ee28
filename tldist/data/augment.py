"""Strong training augmentation: policies and colour jitter in the loader workers, random erasing on the device batch.

The methods are the libraries' own; this module only parses the config, builds them and seeds them
per sample so that a sample's augmentation depends only on its stream position (a resumed run sees
the same pixels):

* ``data.auto_augment`` — timm's policy strings (:mod:`timm.data.auto_augment`):
  ``rand-m9-mstd0.5-inc1`` is RandAugment (Cubuk et al. 2020, arXiv:1909.13719) with magnitude 9
  of 10, magnitude noise std 0.5, the "increasing" op set; ``original``/``originalr``/``v0``/``v0r``/
  ``3a`` are AutoAugment (Cubuk et al. 2019, arXiv:1805.09501; ``original`` is the paper's ImageNet
  policy, ``v0`` the TPU EfficientNet one); ``trivialaugment`` is TrivialAugmentWide (Müller & Hutter
  2021, arXiv:2103.10158) from ``torchvision.transforms.v2``. They run on the cropped, flipped
  ``image_size`` PIL image in the worker (timm's ops are PIL ops; a torchvision-decoded tensor is
  handed over as a PIL image), with timm's hyper-parameters as ``create_transform`` sets them:
  ``translate_const = 0.45 * image_size`` px, fill = the normalization mean in 0..255, the train
  interpolation.
* ``data.color_jitter`` — ``torchvision.transforms.v2.ColorJitter(x, x, x)`` (timm's scalar
  semantics: brightness = contrast = saturation = x, no hue), after the policy. Unlike timm's
  ``create_transform`` (whose default jitter is 0.4) it is NOT switched off by a policy: both run
  when both are set.
* ``data.random_erasing`` — timm's :class:`~timm.data.random_erasing.RandomErasing` (Zhong et al.
  2020, arXiv:1708.04896) with ``mode='pixel'``: per-pixel N(0, 1) noise in the *normalized* image,
  so it runs in the training process after :class:`~tldist.data.transforms.Normalizer`, on the
  device (as timm's own ``PrefetchLoader`` does). The workers draw one seed per sample and ship it
  in the batch (``_erase``); :func:`erase_batch` erases each image under its own seed.

Seeding: the libraries draw from global generators (Python's ``random``, NumPy's legacy
``np.random``, torch's default generator). Each augmented image gets a 63-bit seed drawn from its
sample's own ``random.Random`` (after the crop and flip draws); the global generators the call uses
are seeded with it right before it (:func:`seeded`). In the training process (``data.num_workers=0``,
and erasing) their states are restored afterwards, so nothing else sees a changed stream; loader
worker processes skip the restore (nothing else draws there). Eval never augments.
"""

from __future__ import annotations

import contextlib
import random
import re
from typing import Any, Iterator, Optional, Sequence

from tldist.data.transforms import tv_interpolation
from tldist.errors import ConfigError

AUTO_AUGMENT_POLICIES = ("original", "originalr", "v0", "v0r", "3a")
"""timm's AutoAugment policy names (``original``: the AutoAugment paper's ImageNet policy)."""
TRIVIAL_AUGMENT = "trivialaugment"
ACCEPTED_FORMS = ("'' (off), 'rand-m9-mstd0.5-inc1' (RandAugment; sections m<int> magnitude 0-10+, n<int> ops, "
                  "mstd<float> magnitude std, mmax<int>, p<float> op probability, inc<0|1>, t<weights|3a|3aw>), "
                  "'original', 'originalr', 'v0', 'v0r' or '3a' (AutoAugment, optionally -mstd<float>), "
                  "'trivialaugment' (TrivialAugmentWide)")
_RAND_SECTION = re.compile(r"^(m\d+|n\d+|mmax\d+|inc[01]|p\d*\.?\d+|mstd\d*\.?\d+|t(weights|3a|3aw))$")
_AA_SECTION = re.compile(r"^mstd\d*\.?\d+$")
_SEED_BITS = 63


def check_auto_augment(policy: str, key: str = "data.auto_augment") -> str:
    """``policy`` if it is a form :func:`create_auto_augment` accepts, else :class:`ConfigError` naming ``key``
    and the accepted forms. Stricter than timm's own parsers, which skip sections they cannot read."""
    if not isinstance(policy, str):
        raise ConfigError(f"config key '{key}' has bad value {policy!r}: use a string, one of {ACCEPTED_FORMS}")
    if policy in ("", TRIVIAL_AUGMENT):
        return policy
    head, *sections = policy.split("-")
    if head == "rand":
        pattern = _RAND_SECTION
    elif head in AUTO_AUGMENT_POLICIES:
        pattern = _AA_SECTION
    else:
        raise ConfigError(f"config key '{key}' has bad value {policy!r}: unknown policy '{head}'; "
                          f"accepted forms: {ACCEPTED_FORMS}")
    bad = [s for s in sections if not pattern.match(s)]
    if bad:
        raise ConfigError(f"config key '{key}' has bad value {policy!r}: section '{bad[0]}' is not understood; "
                          f"accepted forms: {ACCEPTED_FORMS}")
    return policy


def check_augment(data: Any) -> None:
    """Check a :class:`~tldist.config.DataConfig`'s ``auto_augment``, ``color_jitter`` and ``random_erasing``;
    raises :class:`ConfigError` naming the key. The worker augmentations need a worker decoder: with
    ``decode=nvjpeg`` the crop happens on the training device, after the workers, so they are refused."""
    check_auto_augment(data.auto_augment)
    _check_jitter(data.color_jitter)
    check_random_erasing(data.random_erasing)
    if data.decode == "nvjpeg":
        for key in ("auto_augment", "color_jitter"):
            if getattr(data, key):
                raise ConfigError(f"config key 'data.{key}' has bad value {getattr(data, key)!r}: it runs in the "
                                  "loader workers on the cropped image, but data.decode=nvjpeg crops on the training "
                                  "device; use data.decode=torchvision or pil, or turn it off")


def _check_jitter(factor: float) -> None:
    if not (isinstance(factor, (int, float)) and factor >= 0):
        raise ConfigError(f"config key 'data.color_jitter' has bad value {factor!r}: use a factor >= 0 "
                          "(0 = off; 0.4 = brightness/contrast/saturation x [0.6, 1.4])")


def _pil_interp(name: str) -> Any:
    from PIL import Image

    return {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[name]


def create_auto_augment(policy: str, *, image_size: int, mean: Sequence[float], interpolation: str = "bilinear") -> Any:
    """The library transform for a ``data.auto_augment`` string: ``t(PIL image) -> PIL image``.

    timm's ``rand_augment_transform`` / ``auto_augment_transform`` (draw from Python's ``random`` and
    NumPy's ``np.random``) or torchvision v2's ``TrivialAugmentWide`` (draws from torch's generator);
    hparams as timm's ``create_transform``: ``translate_const = int(0.45 * image_size)`` px, fill
    ``img_mean`` = ``mean`` (0..1 units) x 255. Raises :class:`ConfigError` for a bad string.
    """
    check_auto_augment(policy)
    fill = tuple(min(255, round(255 * m)) for m in mean)
    if policy == TRIVIAL_AUGMENT:
        from torchvision.transforms import v2

        return v2.TrivialAugmentWide(interpolation=tv_interpolation(interpolation), fill=fill)
    from timm.data.auto_augment import auto_augment_transform, rand_augment_transform

    hparams = {"translate_const": int(image_size * 0.45), "img_mean": fill, "interpolation": _pil_interp(interpolation)}
    if policy.startswith("rand"):
        transform = rand_augment_transform(policy, hparams)
        ops = transform.ops
    else:
        transform = auto_augment_transform(policy, hparams)
        ops = [op for sub in transform.policy for op in sub]
    _fix_posterize(ops)
    return transform


def _fix_posterize(ops: Sequence[Any]) -> None:
    """Let timm's Posterize ops keep 0 (or fewer) bits again: a black image, as with Pillow < 13 and in the
    TF reference (``x >> 8 << 8``). Pillow 13's ``ImageOps.posterize`` raises ValueError for bits < 1, which
    timm 1.0.31 passes at high magnitudes (``PosterizeIncreasing`` at m=10, ``v0``'s ``Posterize`` at level
    < 2.5): 3.5% of ``v0`` samples and 0.1% of ``rand-m9-mstd0.5-inc1`` samples failed, and the loader
    skipped them as undecodable."""
    from timm.data import auto_augment as aa

    for op in ops:
        if op.aug_fn is aa.posterize:
            op.aug_fn = _posterize


def _posterize(img: Any, bits_to_keep: int, **kwargs: Any) -> Any:
    from PIL import Image
    from timm.data.auto_augment import posterize

    return posterize(img, bits_to_keep, **kwargs) if bits_to_keep >= 1 else Image.new(img.mode, img.size)


def _torch_generator(device: Any) -> Any:
    """torch's default generator of ``device`` (what ``torch.empty(..., device=device).normal_()`` draws from)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.init()  # fills default_generators (a no-op once CUDA is up)
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    if device.type != "cpu":
        raise ValueError(f"per-sample seeding supports cpu and cuda devices, not {device}")
    return torch.default_generator


@contextlib.contextmanager
def seeded(seed: int, *, numpy: bool = False, torch_device: Any = None, restore: bool = True) -> Iterator[None]:
    """Seed the global generators with ``seed`` inside the block; with ``restore``, put their states back after it.

    Always Python's :mod:`random`; with ``numpy`` NumPy's legacy ``np.random`` (seed mod 2**32); with
    ``torch_device`` torch's default generator of that device (only that one: ``torch.manual_seed`` seeds
    every backend and costs ~0.5 ms). ``restore=False`` is for loader worker processes, where these
    generators serve nothing else (restoring NumPy's state alone costs ~0.3 ms).
    """
    import numpy as np

    gen = _torch_generator(torch_device) if torch_device is not None else None
    states = (random.getstate(), np.random.get_state() if numpy else None,
              gen.get_state() if gen is not None else None) if restore else None
    random.seed(seed)
    if numpy:
        np.random.seed(seed % 2 ** 32)
    if gen is not None:
        gen.manual_seed(seed)
    try:
        yield
    finally:
        if states is not None:
            random.setstate(states[0])
            if numpy:
                np.random.set_state(states[1])
            if gen is not None:
                gen.set_state(states[2])


class WorkerAugment:
    """``data.auto_augment`` then ``data.color_jitter`` on a cropped PIL image, seeded per sample.

    ``augment(img, rng)``: draws one seed from ``rng`` (the sample's ``random.Random``), seeds the
    global generators the libraries use with it (:func:`seeded`), applies the policy (timm / torchvision)
    and ``ColorJitter``, and returns the augmented RGB PIL image of the same size.
    """

    def __init__(self, auto_augment: str = "", color_jitter: float = 0.0, *, image_size: int,
                 mean: Sequence[float], interpolation: str = "bilinear"):
        _check_jitter(color_jitter)
        self.auto_augment, self.color_jitter = check_auto_augment(auto_augment), float(color_jitter)
        self.policy = (create_auto_augment(auto_augment, image_size=image_size, mean=mean, interpolation=interpolation)
                       if auto_augment else None)
        self.jitter = None
        if self.color_jitter > 0:
            from torchvision.transforms import v2

            self.jitter = v2.ColorJitter(self.color_jitter, self.color_jitter, self.color_jitter)
        self._torch = self.jitter is not None or auto_augment == TRIVIAL_AUGMENT  # draws from torch's generator
        self._numpy = auto_augment.startswith("rand")  # timm's RandAugment picks its ops with np.random.choice

    def __call__(self, img: Any, rng: random.Random) -> Any:
        from torch.utils.data import get_worker_info

        seed = rng.getrandbits(_SEED_BITS)
        with seeded(seed, numpy=self._numpy, torch_device="cpu" if self._torch else None,
                    restore=get_worker_info() is None):  # restored in the training process (data.num_workers=0)
            if self.policy is not None:
                img = self.policy(img)
            if self.jitter is not None:
                img = self.jitter(img)
        return img

    def __repr__(self) -> str:
        return f"WorkerAugment(auto_augment={self.auto_augment!r}, color_jitter={self.color_jitter})"


def build_worker_augment(auto_augment: str, color_jitter: float, *, image_size: int, mean: Sequence[float],
                         interpolation: str = "bilinear") -> Optional[WorkerAugment]:
    """The workers' augmentation for ``data.auto_augment`` / ``data.color_jitter``; None when both are off."""
    if not auto_augment and not color_jitter:
        return None
    return WorkerAugment(auto_augment, color_jitter, image_size=image_size, mean=mean, interpolation=interpolation)


# ---------------------------------------------------------------------------------------
# Random erasing on the device batch, seeded per sample by the workers
# ---------------------------------------------------------------------------------------

def check_random_erasing(probability: float, key: str = "data.random_erasing") -> float:
    """``probability`` if in [0, 1], else :class:`ConfigError` naming ``key``."""
    if not (isinstance(probability, (int, float)) and 0 <= probability <= 1):
        raise ConfigError(f"config key '{key}' has bad value {probability!r}: use a probability in [0, 1] "
                          "(0 = off; timm's re_prob, 0.25 in its ImageNet recipes)")
    return float(probability)


def erase_fields(probability: float, seeds: list[int]) -> dict[str, Any]:
    """The ``_erase`` batch field a worker adds: ``{"_erase": {"p": float, "seeds": int64 [B]}}``, ``{}`` when off."""
    if probability <= 0:
        return {}
    import torch

    return {"_erase": {"p": float(probability), "seeds": torch.tensor(seeds, dtype=torch.int64)}}


def erase_batch(images: Any, batch: dict[str, Any]) -> Any:
    """Random erasing of a normalized float [B, C, H, W] batch on its device, in place (and returned).

    Applies timm's ``RandomErasing(p, mode='pixel')`` to image ``i`` under seed ``batch["_erase"]["seeds"][i]``
    (drawn in the worker from the sample's own RNG), so the erased boxes and noise depend only on the
    sample's stream position. The field is removed from ``batch``; batches without it (eval, or
    ``data.random_erasing=0``) are returned unchanged. No host synchronisation (the seeds are on the CPU).
    """
    spec = batch.pop("_erase", None)
    if spec is None:
        return images
    from timm.data.random_erasing import RandomErasing

    eraser = RandomErasing(spec["p"], mode="pixel", device=images.device)
    gen = _torch_generator(images.device)
    with seeded(0, torch_device=images.device):  # the trainer's generators are restored afterwards
        for i, seed in enumerate(spec["seeds"].tolist()):
            random.seed(seed)
            gen.manual_seed(seed)
            eraser(images[i])
    return images
