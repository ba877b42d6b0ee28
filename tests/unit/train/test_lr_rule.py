"""The LR rule (issue 27, item 2): optim.lr is scaled by the global batch as timm's --lr-base is, unless
optim.lr_ref_batch=0 (timm's absolute --lr); the effective LR and its rule are logged once at start."""

from __future__ import annotations

import math

import pytest

from tldist.config import OptimConfig, load_config
from tldist.errors import ConfigError
from tldist.train.optim import describe_lr, lr_scaling_rule, scaled_lr


def timm_lr(lr_base: float, global_batch: int, base_size: int, scale: str, opt: str) -> float:
    """timm train.py's own arithmetic (``if not args.lr:`` block), copied as the reference."""
    batch_ratio = global_batch / base_size
    if not scale:
        scale = "sqrt" if any(o in opt.lower() for o in ("ada", "lamb")) else "linear"
    if scale == "sqrt":
        batch_ratio = batch_ratio ** 0.5
    return lr_base * batch_ratio


@pytest.mark.parametrize("name,scaling,timm_scale", [("sgd", "linear", "linear"), ("adamw", "sqrt", "sqrt"),
                                                     ("adamw", "auto", ""), ("lamb", "auto", ""),
                                                     ("sgd", "auto", ""), ("lars", "auto", "")])
def test_scaled_lr_is_timms_lr_base_rule(name, scaling, timm_scale):
    cfg = OptimConfig(name=name, lr=5e-4, lr_ref_batch=512, lr_scaling=scaling)
    for batch in (64, 512, 4096):
        assert math.isclose(scaled_lr(cfg, batch), timm_lr(5e-4, batch, 512, timm_scale, name), rel_tol=1e-12)


def test_lr_ref_batch_zero_is_an_absolute_lr():
    cfg = OptimConfig(lr=3e-4, lr_ref_batch=0)
    assert scaled_lr(cfg, 8) == scaled_lr(cfg, 8192) == 3e-4
    assert lr_scaling_rule(cfg) == "absolute"
    assert "--lr 0.0003" in describe_lr(cfg, 8192) and "unscaled" in describe_lr(cfg, 8192)


def test_description_names_the_rule_and_timm_flags():
    text = describe_lr(OptimConfig(lr=0.1, lr_ref_batch=256), 1024)
    assert text.startswith("peak LR 0.4 = optim.lr 0.1 x 1024/256 (linear")
    assert "--lr-base 0.1 --lr-base-size 256 --lr-base-scale linear" in text
    assert "sqrt(1024/256)" in describe_lr(OptimConfig(lr=0.1, lr_ref_batch=256, lr_scaling="sqrt"), 1024)


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="optim.lr_scaling"):
        load_config(None, ["optim.lr_scaling=log"]).validate()
    with pytest.raises(ConfigError, match="optim.lr_ref_batch"):
        load_config(None, ["optim.lr_ref_batch=-1"]).validate()
    load_config(None, ["optim.lr_ref_batch=0"]).validate()
