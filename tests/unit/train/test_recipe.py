"""Mixup/CutMix and the criterion (tldist.train.recipe), checked against timm's own behaviour, and the
config checks of the recipe keys."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from tldist.config import TrainConfig, load_config
from tldist.errors import ConfigError
from tldist.train.recipe import DeterministicMixup, build_criterion, build_mixup

K = 6


def _batch(b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 16, 16, generator=g), torch.randint(0, K, (b,), generator=g)


def _mixup(rank=0, **kw):
    args = dict(mixup_alpha=0.0, cutmix_alpha=0.0, prob=1.0, switch_prob=0.5, label_smoothing=0.0, seed=3)
    args.update(kw)
    return DeterministicMixup(num_classes=K, rank=rank, **args)


def _lam_from_targets(targets, labels, smoothing):
    """lam such that targets = lam * smooth(y) + (1 - lam) * smooth(y.flip(0)), read off one row."""
    from timm.data.mixup import one_hot

    off, on = smoothing / K, 1 - smoothing + smoothing / K
    a, b = one_hot(labels, K, on, off), one_hot(labels.flip(0), K, on, off)
    i = int(torch.nonzero(labels != labels.flip(0))[0])
    j = int(labels[i])
    return float((targets[i, j] - b[i, j]) / (a[i, j] - b[i, j]))


def test_mixup_matches_timm_targets_and_images():
    """Mixup only: images = lam x + (1 - lam) x.flip(0), targets = timm's mixup_target at that lam with
    label smoothing folded in, each row summing to 1."""
    from timm.data.mixup import mixup_target

    x, y = _batch()
    images, targets = _mixup(mixup_alpha=0.4, label_smoothing=0.1)(x.clone(), y, step=0)
    assert targets.shape == (8, K) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    lam = _lam_from_targets(targets, y, 0.1)
    assert 0 < lam < 1
    torch.testing.assert_close(targets, mixup_target(y, K, lam, 0.1))
    torch.testing.assert_close(images, lam * x + (1 - lam) * x.flip(0))


def test_cutmix_box_area_is_the_target_weight():
    """CutMix only: each pixel comes from the sample or from its partner, and the partner's share of the
    pixels is 1 - lam of the targets (timm's lambda correction)."""
    x, y = _batch()
    for step in range(4):
        images, targets = _mixup(cutmix_alpha=1.0)(x.clone(), y, step=step)
        torch.testing.assert_close(targets.sum(1), torch.ones(8))
        own, partner = images == x, images == x.flip(0)
        assert bool((own | partner).all())
        share = float(partner[0].float().mean())
        assert share == pytest.approx(1 - _lam_from_targets(targets, y, 0.0), abs=1e-6)


def test_no_mix_when_prob_is_zero_keeps_images_and_smoothed_targets():
    from timm.data.mixup import mixup_target

    x, y = _batch()
    images, targets = _mixup(mixup_alpha=1.0, prob=0.0, label_smoothing=0.2)(x.clone(), y, step=0)
    assert torch.equal(images, x)
    torch.testing.assert_close(targets, mixup_target(y, K, 1.0, 0.2))


def _draw(m, step, micro=0):
    x, y = _batch()
    images, targets = m(x, y, step=step, micro=micro)
    return images, targets


def test_draws_depend_on_seed_rank_step_micro_only():
    """The same position gives the same draw, whatever else used numpy/python RNGs in between (and those
    RNGs are left untouched); another rank, step or micro-batch gives another draw."""
    a = _mixup(mixup_alpha=1.0, cutmix_alpha=1.0)
    first = _draw(a, step=5, micro=1)
    np_state, py_state = np.random.get_state(), random.getstate()
    _draw(a, step=6)
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert all(np.array_equal(u, v) if isinstance(u, np.ndarray) else u == v for u, v in zip(np_state, after))
    np.random.rand(17)  # other users of the global RNG do not shift the draws
    again = _draw(_mixup(mixup_alpha=1.0, cutmix_alpha=1.0), step=5, micro=1)
    assert all(torch.equal(u, v) for u, v in zip(first, again))
    for other in (_draw(_mixup(rank=1, mixup_alpha=1.0, cutmix_alpha=1.0), step=5, micro=1),
                  _draw(a, step=4, micro=1), _draw(a, step=5, micro=0),
                  _draw(_mixup(mixup_alpha=1.0, cutmix_alpha=1.0, seed=4), step=5, micro=1)):
        assert not torch.equal(other[1], first[1])


def test_resumed_sequence_continues_the_same_draws():
    """A run that restarts at step 3 (a fresh object, as after a resume) draws what the uninterrupted run drew."""
    ref = _mixup(mixup_alpha=0.8, cutmix_alpha=1.0)
    full = [_draw(ref, s, m) for s in range(6) for m in range(2)]
    resumed = _mixup(mixup_alpha=0.8, cutmix_alpha=1.0)
    resumed.load_state_dict(ref.state_dict())
    tail = [_draw(resumed, s, m) for s in range(3, 6) for m in range(2)]
    assert all(torch.equal(u[0], v[0]) and torch.equal(u[1], v[1]) for u, v in zip(full[6:], tail))
    assert len({round(float(t[1].pow(2).sum()), 6) for t in full}) > 3  # the draws really vary


def test_criterion_choice_and_smoothing_equivalence():
    """Off: torch's CrossEntropyLoss with label smoothing; on: timm's SoftTargetCrossEntropy, which on the
    unmixed smoothed targets equals the former."""
    from timm.data.mixup import mixup_target
    from timm.loss import SoftTargetCrossEntropy

    cfg = TrainConfig(label_smoothing=0.1)
    assert build_mixup(cfg, K, rank=0) is None
    plain = build_criterion(cfg, None)
    logits, y = torch.randn(8, K), torch.randint(0, K, (8,))
    torch.testing.assert_close(plain(logits, y, {}), nn.CrossEntropyLoss(label_smoothing=0.1)(logits, y))
    on = TrainConfig(label_smoothing=0.1, cutmix_alpha=1.0)
    mix = build_mixup(on, K, rank=0)
    assert mix is not None and mix.mixup.cutmix_alpha == 1.0 and mix.mixup.label_smoothing == 0.1
    soft = build_criterion(on, mix)
    targets = mixup_target(y, K, 1.0, 0.1)
    torch.testing.assert_close(soft(logits, targets, {}), SoftTargetCrossEntropy()(logits, targets))
    torch.testing.assert_close(soft(logits, targets, {}), plain(logits, y, {}))


@pytest.mark.parametrize("override,key", [
    ("train.mixup_alpha=-0.2", "train.mixup_alpha"),
    ("train.cutmix_alpha=-1", "train.cutmix_alpha"),
    ("train.mixup_prob=1.5", "train.mixup_prob"),
    ("train.mixup_switch_prob=-0.1", "train.mixup_switch_prob"),
    ("model.drop_path_rate=1.0", "model.drop_path_rate"),
    ("optim.name=adam", "optim.name"),
])
def test_bad_recipe_values_name_the_key(override, key):
    cfg = load_config(None, ["data.train=[x]", override])
    with pytest.raises(ConfigError, match=f"'{key}'"):
        cfg.validate()


def test_mixup_needs_an_even_batch_and_one_head():
    with pytest.raises(ConfigError, match="'data.batch_size'.*even"):
        load_config(None, ["data.train=[x]", "data.batch_size=7", "train.cutmix_alpha=1"]).validate()
    load_config(None, ["data.train=[x]", "data.batch_size=7"]).validate()  # odd is fine without mixing
    with pytest.raises(ConfigError, match="'train.mixup_alpha'.*different tasks"):
        load_config(None, ["data.train=[x,y]", "model.heads=separate", "train.mixup_alpha=0.2"]).validate()
    for name in ("lamb", "lars"):
        load_config(None, ["data.train=[x]", f"optim.name={name}", "model.drop_path_rate=0.1"]).validate()
