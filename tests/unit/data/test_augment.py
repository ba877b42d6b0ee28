"""Strong augmentation (issue 15): timm/torchvision policies + colour jitter in the workers, random erasing on
the device batch; every draw seeded per sample, so loaders agree with each other and with a resumed loader."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from tldist.config import DataConfig, load_config
from tldist.data.augment import build_worker_augment, check_auto_augment, erase_batch, erase_fields
from tldist.data.pipeline import build_eval_loader, build_train_loader
from tldist.data.transforms import IMAGENET_MEAN, build_train_transform, decode_image
from tldist.errors import ConfigError
from tldist.world import World

SIZE = 16
POLICIES = ["rand-m9-mstd0.5-inc1", "original", "v0", "trivialaugment"]


def _image(seed: int = 0, size: int = 48) -> Image.Image:
    """Smooth gradients plus blocks: geometric and colour ops both change it visibly."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, size)[None, :].repeat(size, 0)
    blocks = np.kron(rng.integers(0, 60, (size // 8, size // 8, 3)), np.ones((8, 8, 1)))
    arr = np.stack([x, x.T, 255 - x], axis=2) + blocks
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _global_states():
    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()


def validated(overrides):
    """The config of ``overrides`` after the job's and the data's checks (what training runs first)."""
    from tldist.data.pipeline import check_data_config

    cfg = load_config(None, overrides).validate()
    check_data_config(cfg.data)
    return cfg


@pytest.mark.parametrize("policy", ["rand-m9-foo", "randaugment", "v1", "augmix-m5-w3", "rand-m9-tbogus",
                                    "original-m5", "rand-m", "TrivialAugment"])
def test_unknown_policy_is_one_line_error_naming_the_key(policy):
    with pytest.raises(ConfigError) as e:
        validated(["data.train=[x]", f"data.auto_augment={policy}"])
    msg = str(e.value)
    assert "data.auto_augment" in msg and repr(policy) in msg and "\n" not in msg
    assert "rand-m9-mstd0.5-inc1" in msg and "trivialaugment" in msg  # lists the accepted forms


@pytest.mark.parametrize("override,key", [("data.color_jitter=-0.1", "data.color_jitter"),
                                          ("data.random_erasing=1.5", "data.random_erasing")])
def test_bad_jitter_and_erasing_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        validated(["data.train=[x]", override])


def test_worker_augmentation_is_refused_with_nvjpeg_but_erasing_is_not():
    for extra in ("data.auto_augment=original", "data.color_jitter=0.4"):
        with pytest.raises(ConfigError, match=f"'{extra.split('=')[0]}'.*nvjpeg") as e:
            validated(["data.train=[x]", "data.decode=nvjpeg", extra])
        assert "\n" not in str(e.value)
    validated(["data.train=[x]", "data.decode=nvjpeg", "data.random_erasing=0.25"])


def test_accepted_policy_strings():
    for policy in POLICIES + ["", "rand-m9-n3-mstd0.5", "rand-mstd1-tweights", "originalr-mstd0.5", "v0r", "3a",
                              "rand-m7-mmax10-p0.8-inc0"]:
        assert check_auto_augment(policy) == policy
    assert DataConfig().auto_augment == "" and DataConfig().color_jitter == 0 and DataConfig().random_erasing == 0


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
def test_policy_is_seeded_by_the_sample_rng_only(policy, decoder):
    """Same sample RNG -> same pixels; other samples -> other ops; the global generators are left as they were."""
    augment = build_worker_augment(policy, 0.3, image_size=32, mean=IMAGENET_MEAN)
    plain = build_train_transform(32, (1.0, 1.0), hflip=False)  # crop = whole image: differences come from the policy
    t = build_train_transform(32, (1.0, 1.0), hflip=False, augment=augment)
    img = decode_image(_png_bytes(_image()), decoder)
    random.seed(123)
    before = _global_states()
    a = t(img, random.Random("s/0/0/7"))
    after = _global_states()
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and torch.equal(before[2], after[2])
    random.random()  # a moved global stream changes nothing
    torch.rand(3)
    assert a.dtype == torch.uint8 and a.shape == (3, 32, 32)
    assert torch.equal(a, t(img, random.Random("s/0/0/7")))
    outs = [t(img, random.Random(f"s/0/0/{i}")) for i in range(12)]
    base = plain(img, random.Random(0))
    assert len({o.numpy().tobytes() for o in outs}) >= 10  # different samples, different ops/magnitudes
    assert sum(not torch.equal(o, base) for o in outs) >= 10  # the policy really changes pixels


@pytest.mark.parametrize("policy", ["v0", "rand-m10-inc1", "rand-mstd101", "rand-m9-mstd0.5-inc1"])
def test_high_magnitude_posterize_does_not_fail(policy):
    """timm 1.0.31 asks Pillow 13 for 0 bits at high magnitudes (ValueError; the loader would skip the sample)."""
    augment = build_worker_augment(policy, 0.0, image_size=16, mean=IMAGENET_MEAN)
    img = _image(1, 16)
    for i in range(600):
        out = augment(img, random.Random(i))
        assert out.size == (16, 16) and out.mode == "RGB"


def _png_bytes(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_erase_batch_seeded_per_sample_and_off_for_eval():
    base = torch.randn(6, 3, 24, 24)
    seeds = [11, 12, 13, 11, 14, 15]
    x = base.clone().contiguous(memory_format=torch.channels_last)
    before = _global_states()
    out = erase_batch(x, {"_erase": erase_fields(1.0, seeds)["_erase"]})
    after = _global_states()
    assert out is x and before[0] == after[0] and torch.equal(before[2], after[2])
    changed = (x != base).any(dim=1)  # [B, H, W] erased box per image
    assert all(changed[i].any() for i in range(6))  # p=1: every image has a box
    assert torch.equal(changed[0], changed[3]) and torch.equal(x[0][:, changed[0]], x[3][:, changed[3]])  # same seed
    assert not torch.equal(changed[1], changed[2])  # other seeds, other boxes
    frac = changed.float().mean(dim=(1, 2))
    assert ((frac >= 0.015) & (frac <= 0.34)).all()  # timm's default area range [0.02, 1/3], rounded
    y = base.clone()
    assert torch.equal(erase_batch(y, {"label": torch.zeros(6)}), base)  # eval batches carry no seeds
    assert erase_fields(0.0, seeds) == {}
    z = base.clone()
    erase_batch(z, {"_erase": erase_fields(0.5, seeds)["_erase"]})
    assert 0 < sum((z[i] != base[i]).any().item() for i in range(6)) <= 6


def _cfg(shards, **kw) -> DataConfig:
    base = dict(train=[str(shards / "train")], val=str(shards / "val"), batch_size=8, num_workers=2,
                shuffle_buffer=16, pin_memory=False, decode="torchvision", auto_augment="rand-m9-mstd0.5-inc1",
                color_jitter=0.4, random_erasing=0.5)
    base.update(kw)
    return DataConfig(**base)


def _take(loader, n):
    out = [next(loader) for _ in range(n)]
    return [{"key": b["key"], "image": b["image"].clone(), "seeds": b["_erase"]["seeds"].clone()} for b in out]


def test_loader_augmentation_identical_across_loaders_and_after_resume(shards):
    c = _cfg(shards)
    ref = build_train_loader(c, World(0, 1), image_size=SIZE)
    full = _take(ref, 7)
    ref.close()
    first = build_train_loader(c, World(0, 1), image_size=SIZE)
    again = _take(first, 3)
    sd = first.state_dict()
    first.close()
    assert all(a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["seeds"], b["seeds"])
               for a, b in zip(again, full))
    second = build_train_loader(c, World(0, 1), image_size=SIZE)
    second.load_state_dict(sd)
    cont = _take(second, 4)
    second.close()
    for a, b in zip(cont, full[3:]):  # the resumed loader continues with the very same pixels and erase seeds
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["seeds"], b["seeds"])
    seeds = torch.cat([b["seeds"] for b in full])
    assert len(set(seeds.tolist())) == len(seeds)  # one seed per sample
    # same samples in the same order without augmentation, but other pixels
    plain = build_train_loader(_cfg(shards, auto_augment="", color_jitter=0.0, random_erasing=0.0), World(0, 1),
                               image_size=SIZE)
    p = [next(plain) for _ in range(3)]
    plain.close()
    assert [b["key"] for b in p] == [b["key"] for b in full[:3]] and all("_erase" not in b for b in p)
    diff = sum(not torch.equal(a["image"][i], b["image"][i]) for a, b in zip(p, full) for i in range(8))
    assert diff >= 20  # of 24 images
    # eval never augments: its batches equal an eval loader built without augmentation
    ev = next(iter(build_eval_loader(c, World(0, 1), image_size=SIZE)))
    ev_plain = next(iter(build_eval_loader(_cfg(shards, auto_augment="", color_jitter=0.0, random_erasing=0.0),
                                           World(0, 1), image_size=SIZE)))
    assert torch.equal(ev["image"], ev_plain["image"]) and "_erase" not in ev
