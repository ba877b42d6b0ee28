"""Activation checkpointing under FSDP2 on 2 ranks (issue 27, items 1 and 7): the accelerate config's
``fsdp_activation_checkpointing: true`` turns on ``train.grad_checkpointing`` (the saved config says so), the
checkpointed blocks are the ones FSDP2 shards, and training computes what it computes without it."""

from __future__ import annotations

import pytest
import torch
import yaml

from helpers import REPO, accelerate_cmd, checkpoint_weights, overrides, run


@pytest.mark.slow
def test_fsdp_activation_checkpointing_from_the_accelerate_config_trains_the_same(tiny_shards, tmp_path):

    launcher = yaml.safe_load((REPO / "configs/accelerate/fsdp.yaml").read_text())
    launcher["fsdp_config"]["fsdp_activation_checkpointing"] = True
    with_ac = tmp_path / "fsdp_ac.yaml"
    with_ac.write_text(yaml.safe_dump(launcher))
    extra = ["train.max_steps=3", "train.fsdp_block=InvertedResidual", "data.num_workers=0",
             "checkpoint.full_weights=true"]
    weights, logs = {}, {}
    for name, config in (("plain", "fsdp.yaml"), ("ac", str(with_ac))):
        out = tmp_path / name
        logs[name] = run(accelerate_cmd(config, "train", "configs/test_tiny.yaml", *overrides(tiny_shards, out, *extra)),
                         timeout=600).stdout
        saved = yaml.safe_load((out / "config.yaml").read_text())["train"]
        assert saved["grad_checkpointing"] is (name == "ac") and saved["fsdp"] is True
        weights[name] = checkpoint_weights(out / "checkpoints" / "step_00000003")
    assert "activation checkpointing (train.grad_checkpointing): " in logs["ac"]
    assert "InvertedResidual" in logs["ac"] and "FSDP_ACTIVATION_CHECKPOINTING=true" in logs["ac"]
    a, b = weights["plain"], weights["ac"]
    assert a.keys() == b.keys()
    for k in a:  # BatchNorm statistics included: updated once per step with checkpointing too
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
