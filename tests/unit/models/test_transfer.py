"""apply_transfer: trainable sets per strategy and BatchNorm freezing."""

import copy

import pytest
import torch
from torch import nn

from tldist.config import ModelConfig, TransferConfig
from tldist.errors import ConfigError
from tldist.models import apply_transfer, build_model, format_transfer_summary, param_stages, transfer_summary


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    return build_model(ModelConfig(name="resnet18", pretrained=False), 5)


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _bns(model, prefix=""):
    return [m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and n.startswith(prefix)]


def _train_step_keeps_stats(model, prefix=""):
    before = [bn.running_mean.clone() for bn in _bns(model, prefix)]
    model.train()
    model(torch.randn(2, 3, 32, 32) * 3 + 1)
    return all(torch.equal(b, bn.running_mean) for b, bn in zip(before, _bns(model, prefix)))


def test_linear_probe_trains_only_head_and_freezes_bn(resnet):
    model, info = resnet
    apply_transfer(model, TransferConfig(strategy="linear_probe"), info)
    assert _trainable(model) == {"fc.weight", "fc.bias"}
    assert _train_step_keeps_stats(model)
    assert all(not bn.training for bn in _bns(model))
    rows = transfer_summary(model, info)
    assert [r["stage"] for r in rows] == [*info.stages, "head"]
    assert rows[-1] == {"stage": "head", "trainable": 512 * 5 + 5, "frozen": 0}
    assert sum(r["trainable"] for r in rows[:-1]) == 0
    assert "total" in format_transfer_summary(rows)


def test_last_n(resnet):
    model, info = resnet
    apply_transfer(model, TransferConfig(strategy="last_n", last_n=2), info)
    names = _trainable(model)
    assert any(n.startswith("layer3.") for n in names) and any(n.startswith("layer4.") for n in names)
    assert names == {n for n, _ in model.named_parameters() if n.startswith(("layer3.", "layer4.", "fc."))}
    # BatchNorm in the frozen stages keeps its statistics; the trained stages' BN still learns.
    assert _train_step_keeps_stats(model, "layer2")
    assert all(bn.training for bn in _bns(model, "layer4")) and not _train_step_keeps_stats(model, "layer4")


def test_last_n_too_large(resnet):
    model, info = resnet
    with pytest.raises(ConfigError, match=r"transfer\.last_n.*5 stages"):
        apply_transfer(model, TransferConfig(strategy="last_n", last_n=6), info)
    with pytest.raises(ConfigError, match="transfer.strategy"):
        apply_transfer(model, TransferConfig(strategy="partial"), info)


def test_full_and_freeze_bn(resnet):
    model, info = resnet
    keys = list(model.state_dict())
    apply_transfer(model, TransferConfig(strategy="full"), info)
    assert _trainable(model) == {n for n, _ in model.named_parameters()}
    assert not _train_step_keeps_stats(model)

    apply_transfer(model, TransferConfig(strategy="full", freeze_bn=True), info)
    bn_params = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) for p in ("weight", "bias")}
    assert _trainable(model) == {n for n, _ in model.named_parameters()} - bn_params
    assert _train_step_keeps_stats(model)
    model.eval()
    model.train()
    assert all(not bn.training for bn in _bns(model)) and model.layer1.training
    assert list(model.state_dict()) == keys  # same keys as an unfrozen model: checkpoints stay compatible
    clone = copy.deepcopy(model)
    clone.train()
    assert not clone.bn1.training


def test_vit_last_n_includes_final_norm():
    pytest.importorskip("timm")
    model, info = build_model(ModelConfig(name="timm:vit_tiny_patch16_224", pretrained=False), 3, image_size=32)
    apply_transfer(model, TransferConfig(strategy="last_n", last_n=2), info)
    names = _trainable(model)
    assert names == {n for n, _ in model.named_parameters() if n.startswith(("blocks.10.", "blocks.11.", "norm.", "head."))}
    stages = param_stages(model, info)
    assert stages["cls_token"] == stages["pos_embed"] == stages["patch_embed.proj.weight"] == 0
    assert stages["head.weight"] == len(info.stages)


def test_param_stages_ignore_wrapper_prefixes(resnet):
    model, info = resnet

    class Wrapper(nn.Module):  # what DDP's named_parameters() looks like
        def __init__(self, m):
            super().__init__()
            self.module = m

    stages = param_stages(Wrapper(model), info)
    assert stages["module.fc.weight"] == 5 and stages["module.bn1.weight"] == 0 and stages["module.layer2.0.conv1.weight"] == 2


def test_fine_tuning_from_a_checkpoint_matches_head_rows_by_class_name(tmp_path):
    """A checkpoint trained on c0..c3, fine-tuned on data listing c3, c1, c9, c0: each class gets the row
    trained for its name (not its position); the new class c9 gets a fresh row."""
    import json

    import torch
    from safetensors.torch import save_file

    from tldist.config import ModelConfig
    from tldist.artifacts.resolve import build_configured_model, match_head_classes

    torch.manual_seed(0)
    trained, _ = build_model(ModelConfig(name="resnet18", pretrained=False), 4)
    export = tmp_path / "export"
    export.mkdir()
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(export / "model.safetensors"))
    (export / "model.json").write_text(json.dumps({"model": "resnet18", "num_classes": 4,
                                                   "classes": ["c0", "c1", "c2", "c3"],
                                                   "preprocess": {"image_size": 32}}))
    classes = ["c3", "c1", "c9", "c0"]
    model, info, art = build_configured_model(ModelConfig(name="resnet18", pretrained=False, checkpoint=str(export)), 4)
    match_head_classes(model, info, art, classes)
    w, old = model.fc.weight.detach(), trained.fc.weight.detach()
    assert torch.equal(w[0], old[3]) and torch.equal(w[1], old[1]) and torch.equal(w[3], old[0])
    assert torch.equal(model.fc.bias[0], trained.fc.bias[3])
    assert not any(torch.equal(w[2], old[j]) for j in range(4))  # c9: fresh
    assert torch.equal(model.conv1.weight, trained.conv1.weight)  # the backbone is the checkpoint's
