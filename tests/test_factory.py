"""build_model: heads, ModelInfo, pretrained weights from the hub cache, checkpoints."""

import argparse
import json
import os
import time

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torchvision.models import ResNet18_Weights

from tldist.config import ModelConfig
from tldist.errors import ConfigError, UserError
from tldist.models import build_model


def _cfg(name="resnet18", **kw):
    return ModelConfig(name=name, pretrained=kw.pop("pretrained", False), **kw)


def _out(model, size=32, batch=2):
    model.eval()
    with torch.no_grad():
        return model(torch.randn(batch, 3, size, size))


def test_resnet18_head_and_info():
    model, info = build_model(_cfg(), 5)
    assert model.fc.out_features == 5 and torch.all(model.fc.bias == 0)
    assert info.head == ["fc"]
    assert info.stages == ["conv1", "layer1", "layer2", "layer3", "layer4"]
    assert info.block_class_names == ["BasicBlock"]
    assert (info.input_size, info.interpolation) == (224, "bilinear")
    assert info.mean == pytest.approx((0.485, 0.456, 0.406)) and info.std == pytest.approx((0.229, 0.224, 0.225))
    assert _out(model).shape == (2, 5)


def test_mobilenet_v3_small_head():
    model, info = build_model(_cfg("mobilenet_v3_small"), 3)
    assert info.head == ["classifier.3"] and model.classifier[3].out_features == 3
    assert info.stages == [f"features.{i}" for i in range(13)]
    assert "InvertedResidual" in info.block_class_names
    assert _out(model).shape == (2, 3)


def test_vit_b_16_at_small_image_size():
    model, info = build_model(_cfg("vit_b_16"), 4, image_size=32)
    assert info.head == ["heads.head"] and model.heads.head.out_features == 4
    assert info.stages[0] == "conv_proj" and info.stages[1] == "encoder.layers.encoder_layer_0"
    assert len(info.stages) == 13 and info.block_class_names == ["EncoderBlock"]
    assert info.input_size == 32
    assert _out(model, 32, 1).shape == (1, 4)
    with pytest.raises(ConfigError, match="image_size"):
        build_model(_cfg("vit_b_16"), 4, image_size=30)


def test_timm_models():
    pytest.importorskip("timm")
    model, info = build_model(_cfg("timm:vit_tiny_patch16_224"), 6, image_size=32)
    assert info.head == ["head"] and model.head.out_features == 6
    assert info.stages[0] == "patch_embed" and info.stages[-1] == "blocks.11"
    assert info.interpolation == "bicubic" and info.mean == (0.5, 0.5, 0.5) and info.input_size == 32
    assert _out(model).shape == (2, 6)
    model, info = build_model(_cfg("timm:resnet18"), 2)
    assert info.head == ["fc"] and model.fc.out_features == 2
    assert info.stages == ["conv1", "layer1", "layer2", "layer3", "layer4"]


def test_bad_names_are_config_errors():
    with pytest.raises(ConfigError, match="model.name.*resnet18"):
        build_model(_cfg("resnet19"), 2)
    with pytest.raises(ConfigError, match="model.weights.*IMAGENET1K_V1"):
        build_model(_cfg(weights="IMAGENET1K_V9"), 2)
    with pytest.raises(ConfigError, match="model.num_classes"):
        build_model(_cfg(), 0)


def _hub_file(weights) -> str:
    return os.path.basename(weights.url)


def test_pretrained_from_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ref = torchvision.models.resnet18()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(ref.state_dict(), cache / _hub_file(ResNet18_Weights.DEFAULT))
    model, info = build_model(_cfg(pretrained=True), 3)
    assert torch.equal(model.conv1.weight, ref.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, ref.layer4[1].bn2.running_var)
    assert model.fc.out_features == 3 and info.head == ["fc"]

    (cache / _hub_file(ResNet18_Weights.DEFAULT)).write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="delete it"):
        build_model(_cfg(pretrained=True), 3)


def test_pretrained_offline_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    fname = _hub_file(ResNet18_Weights.IMAGENET1K_V1)
    # An address nothing listens on: the download fails at once, as on an offline node.
    monkeypatch.setattr(ResNet18_Weights.IMAGENET1K_V1.value, "url", f"http://127.0.0.1:9/models/{fname}")
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        build_model(_cfg(pretrained=True), 3)
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert fname in msg and str(tmp_path / "hub" / "checkpoints" / fname) in msg
    assert "$TORCH_HOME/hub/checkpoints" in msg and "model.checkpoint=PATH" in msg and "model.pretrained=false" in msg
    assert not (tmp_path / "hub" / "checkpoints" / fname).exists()


# ---------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def trained():
    """A mobilenet_v3_small with a 4-class head, as if fine-tuned: (state dict, a backbone tensor name)."""
    torch.manual_seed(1)
    model, _ = build_model(_cfg("mobilenet_v3_small"), 4)
    return {k: v.clone() for k, v in model.state_dict().items()}, "features.3.block.0.0.weight"


def _load(path, num_classes=4, name="mobilenet_v3_small"):
    model, _ = build_model(_cfg(name, checkpoint=str(path)), num_classes)
    return model.state_dict()


def test_checkpoint_state_dict_pt_keeps_matching_head(tmp_path, trained):
    sd, key = trained
    torch.save(sd, tmp_path / "ck.pt")
    got = _load(tmp_path / "ck.pt")
    assert all(torch.equal(got[k], v) for k, v in sd.items())


def test_require_head_refuses_missing_or_mismatched_heads(tmp_path, trained):
    """Scoring/exporting (require_head) a checkpoint must not silently get a fresh head."""
    sd, key = trained
    torch.save({k: v for k, v in sd.items() if not k.startswith("classifier.3.")}, tmp_path / "backbone.pt")
    assert torch.equal(_load(tmp_path / "backbone.pt")[key], sd[key])  # fine for fine-tuning: a new head
    with pytest.raises(UserError, match="holds no classification head"):
        build_model(_cfg("mobilenet_v3_small", checkpoint=str(tmp_path / "backbone.pt")), 4, require_head=True)
    torch.save(sd, tmp_path / "ck.pt")
    with pytest.raises(UserError, match=r"does not fit the 3 classes expected here \(classifier.3.weight \(4, 1024\)"):
        build_model(_cfg("mobilenet_v3_small", checkpoint=str(tmp_path / "ck.pt")), 3, require_head=True)
    model, _ = build_model(_cfg("mobilenet_v3_small", checkpoint=str(tmp_path / "ck.pt")), 4, require_head=True)
    assert torch.equal(model.state_dict()["classifier.3.weight"], sd["classifier.3.weight"])


def test_checkpoint_wrapped_and_prefixed(tmp_path, trained):
    sd, key = trained
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "a.pth")
    assert torch.equal(_load(tmp_path / "a.pth")[key], sd[key])
    torch.save({"state_dict": {f"_orig_mod.{k}": v for k, v in sd.items()}}, tmp_path / "b.pth")
    assert torch.equal(_load(tmp_path / "b.pth")[key], sd[key])


def test_checkpoint_safetensors_and_dir(tmp_path, trained):
    sd, key = trained
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    assert torch.equal(_load(tmp_path / "w.safetensors")[key], sd[key])
    export = tmp_path / "export"
    export.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(export / "model.safetensors"))
    (export / "model.json").write_text(json.dumps({"model": "mobilenet_v3_small", "num_classes": 4, "classes": list("abcd")}))
    assert torch.equal(_load(export)["classifier.3.weight"], sd["classifier.3.weight"])
    (export / "model.json").write_text(json.dumps({"model": "resnet18", "num_classes": 4}))
    with pytest.raises(UserError, match="model.name=resnet18"):
        _load(export)
    with pytest.raises(UserError, match="no model.safetensors"):
        _load(tmp_path)


def test_checkpoint_head_mismatch_is_dropped(tmp_path, trained):
    sd, key = trained
    torch.save(sd, tmp_path / "ck.pt")
    got = _load(tmp_path / "ck.pt", num_classes=7)
    assert torch.equal(got[key], sd[key])
    assert got["classifier.3.weight"].shape == (7, 1024)
    assert torch.equal(got["classifier.0.weight"], sd["classifier.0.weight"])  # not the head: kept


def test_checkpoint_errors(tmp_path, trained):
    sd, _ = trained
    torch.save(sd, tmp_path / "ck.pt")
    with pytest.raises(UserError, match=r"ck\.pt' does not fit model 'resnet18'.*missing keys"):
        _load(tmp_path / "ck.pt", name="resnet18")
    with pytest.raises(UserError, match="does not exist"):
        _load(tmp_path / "nope.pt")
    (tmp_path / "ck.txt").write_text("x")
    with pytest.raises(UserError, match="unknown file type"):
        _load(tmp_path / "ck.txt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(UserError, match="not a state dict"):
        _load(tmp_path / "list.pt")
    torch.save({"model": sd, "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pt")
    with pytest.raises(UserError, match="other than tensors"):
        _load(tmp_path / "pickled.pt")
    bad = dict(sd)
    bad["features.0.0.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "shape.pt")
    with pytest.raises(UserError, match="shape mismatches"):
        _load(tmp_path / "shape.pt")


def test_nested_block_classes_are_not_suggested():
    _, info = build_model(_cfg("maxvit_t"), 2)  # MBConv lives inside MaxVitBlock
    assert info.block_class_names == ["MaxVitBlock"]
