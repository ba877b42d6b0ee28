"""build_param_groups: weight-decay exclusions, layer-wise LR decay, head multiplier."""

import pytest
import torch
import torchvision

from tldist.config import ModelConfig, TransferConfig
from tldist.models import apply_transfer, build_model, build_param_groups, no_weight_decay_names

from helpers import large_batch_optimizer as _optimizer


@pytest.fixture(scope="module")
def resnet():
    return build_model(ModelConfig(name="resnet18", pretrained=False), 5)


def _by_name(model, groups):
    ids = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in groups:
        for p in g["params"]:
            assert ids[id(p)] not in out, "a parameter is in two groups"
            out[ids[id(p)]] = (g["weight_decay"], g["lr_scale"])
    return out


def test_decay_sets_and_layer_scales(resnet):
    model, info = resnet
    groups = build_param_groups(model, info, weight_decay=0.05, layer_decay=0.5, head_lr_mult=10.0)
    got = _by_name(model, groups)
    assert set(got) == {n for n, _ in model.named_parameters()}
    assert got["conv1.weight"] == (0.05, 0.5**5)
    assert got["bn1.weight"] == (0.0, 0.5**5) and got["bn1.bias"] == (0.0, 0.5**5)
    assert got["layer1.0.conv1.weight"] == (0.05, 0.5**4)
    assert got["layer4.1.bn2.weight"] == (0.0, 0.5)
    assert got["fc.weight"] == (0.05, 10.0) and got["fc.bias"] == (0.0, 10.0)
    keys = [(g["weight_decay"], g["lr_scale"]) for g in groups]
    assert len(keys) == len(set(keys)) == 12  # 5 stages + head, decay and no-decay each
    assert {"name", "params", "weight_decay", "lr_scale"} <= set(groups[0])
    assert groups[-1]["name"].startswith("head")
    opt = torch.optim.SGD([dict(g, lr=0.1 * g["lr_scale"]) for g in groups], lr=0.1)
    assert len(opt.param_groups) == 12


def test_groups_merge_without_decay(resnet):
    model, info = resnet
    groups = build_param_groups(model, info, weight_decay=1e-4)
    assert sorted(g["name"] for g in groups) == ["stage0-4+head/decay", "stage0-4+head/no_decay"]
    assert all(g["lr_scale"] == 1.0 for g in groups)


def test_only_trainable_params():
    model, info = build_model(ModelConfig(name="resnet18", pretrained=False), 5)
    apply_transfer(model, TransferConfig(strategy="linear_probe"), info)
    groups = build_param_groups(model, info, weight_decay=0.05, layer_decay=0.7, head_lr_mult=3.0)
    assert set(_by_name(model, groups)) == {"fc.weight", "fc.bias"}
    assert all(g["lr_scale"] == 3.0 for g in groups)


def test_vit_tokens_and_norms_get_no_decay():
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
    skip = no_weight_decay_names(vit)
    assert {"class_token", "encoder.pos_embedding", "encoder.ln.weight", "encoder.layers.encoder_layer_0.ln_1.weight"} <= skip
    assert "conv_proj.weight" not in skip and "encoder.layers.encoder_layer_0.mlp.0.weight" not in skip
    assert "conv_proj.bias" in skip


# ---------------------------------------------------------------- LAMB / LARS over these groups


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_large_batch_optimizers_keep_the_param_groups(resnet, name):
    import timm.optim

    model, info = resnet
    opt = _optimizer(name, model, info)
    assert isinstance(opt, timm.optim.Lamb if name == "lamb" else timm.optim.Lars)
    assert [(g["weight_decay"], g["lr"]) for g in opt.param_groups] == \
        [(g["weight_decay"], 0.01 * g["lr_scale"]) for g in opt.param_groups]
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.05}
    assert all(g["always_adapt"] is g["name"].endswith("/decay") for g in opt.param_groups)
    assert {g["always_adapt"] for g in opt.param_groups} == {True, False}
