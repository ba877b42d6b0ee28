"""tldist.train.parallelize in one process: mixed precision in every mode, FSDP block names."""

from __future__ import annotations

import pytest
import torch


def test_fp16_uses_a_grad_scaler_and_bf16_autocast_in_every_mode():
    from tldist.config import TrainConfig
    from tldist.train.parallelize import parallelize
    from tldist.world import World

    world = World(rank=0, world_size=1, local_rank=0)
    cpu = torch.device("cpu")
    p16 = parallelize(torch.nn.Linear(4, 2), TrainConfig(mixed_precision="fp16"), device=cpu, world=world,
                      fsdp=False, fsdp_blocks=[])
    assert isinstance(p16.scaler, torch.amp.GradScaler) and p16.dtype == torch.float16
    pbf = parallelize(torch.nn.Linear(4, 2), TrainConfig(mixed_precision="bf16"), device=cpu, world=world,
                      fsdp=False, fsdp_blocks=[])
    assert pbf.scaler is None
    with pbf.autocast():
        assert pbf.model(torch.randn(3, 4)).dtype == torch.bfloat16
    assert next(pbf.model.parameters()).dtype == torch.float32  # parameters stay fp32


def test_fsdp_blocks_from_a_shared_accelerate_config_fall_back_to_the_backbones_own(monkeypatch, caplog):
    """configs/accelerate/fsdp.yaml lists Bottleneck,EncoderBlock for every model launched with it; a
    resnet18 (BasicBlock) must still be sharded per block, not as the root alone."""
    import torchvision

    from tldist.config import TrainConfig
    from tldist.errors import ConfigError
    from tldist.train.parallelize import fsdp_block_names

    model = torchvision.models.resnet18()
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "Bottleneck,EncoderBlock")
    with caplog.at_level("WARNING", logger="tldist"):
        assert fsdp_block_names(TrainConfig(), model, ["BasicBlock"]) == ["BasicBlock"]
    assert "names no module class of this model" in caplog.text
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "BasicBlock,EncoderBlock")
    assert fsdp_block_names(TrainConfig(), model, ["Sequential"]) == ["BasicBlock"]
    with pytest.raises(ConfigError, match="train.fsdp_block"):
        fsdp_block_names(TrainConfig(fsdp_block="Bottleneck"), model, ["BasicBlock"])
