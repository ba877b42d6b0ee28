"""train.global_batch_size: grad_accum follows from the world size, so a requeue onto fewer nodes keeps the batch."""

from __future__ import annotations

import pytest

from tldist.config import TrainConfig
from tldist.errors import ConfigError
from tldist.train.optim import apply_global_batch


@pytest.mark.parametrize("world, accum", [(8, 1), (4, 2), (2, 4), (1, 8)])
def test_grad_accum_follows_the_world_size(world, accum):
    cfg = TrainConfig(global_batch_size=256)
    apply_global_batch(cfg, 32, world)
    assert cfg.grad_accum == accum
    apply_global_batch(cfg, 32, world)  # idempotent: the resolved value is the one it would set
    assert cfg.grad_accum == accum


def test_off_by_default_and_errors_name_the_keys():
    cfg = TrainConfig()
    apply_global_batch(cfg, 32, 3)
    assert cfg.grad_accum is None
    with pytest.raises(ConfigError, match=r"train.global_batch_size=256 is not a multiple of 3 ranks x data.batch_size 32"):
        apply_global_batch(TrainConfig(global_batch_size=256), 32, 3)
    with pytest.raises(ConfigError, match=r"train.grad_accum=2 contradicts train.global_batch_size=256.*needs 4"):
        apply_global_batch(TrainConfig(global_batch_size=256, grad_accum=2), 32, 2)
