"""The training entry point records a model's constructor arguments (``model_kwargs``) with each
checkpoint: a real ``tldist train`` of a "pretrained" googlenet, rebuilt from its checkpoint."""

import json

import pytest
import torch
import torchvision

from tldist.config import ModelConfig
from tldist.artifacts.resolve import build_configured_model

from helpers import eval_forward as _eval, fake_download as _fake_download


@pytest.mark.slow
def test_training_records_model_kwargs_in_trainer_json(tiny_shards, tmp_path, monkeypatch):
    """The training entry point saves ModelInfo.model_kwargs with each checkpoint (trainer.json)."""
    from helpers import checkpoint_weights, cli, run

    _fake_download(monkeypatch, tmp_path, "googlenet")  # TORCH_HOME reaches the training process
    out = tmp_path / "run"
    run(cli("train", "configs/test_tiny.yaml", f"data.train=[{tiny_shards}/train]", f"output_dir={out}",
            "model.name=googlenet", "model.pretrained=true", "data.image_size=64", "data.batch_size=4",
            "train.max_steps=1"))
    ckpt = out / "checkpoints" / "step_00000001"
    assert json.loads((ckpt / "trainer.json").read_text())["model_kwargs"] == {"transform_input": True}
    ref = torchvision.models.googlenet(num_classes=4, aux_logits=False, init_weights=True, transform_input=True)
    ref.load_state_dict(checkpoint_weights(ckpt))
    rebuilt, _ = build_configured_model(ModelConfig(name="googlenet", pretrained=False, checkpoint=str(ckpt)), 4, image_size=64)[:2]
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(_eval(rebuilt, x), _eval(ref, x))
