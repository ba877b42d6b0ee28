"""tldist.compress.prune: unstructured pruning of a real tiny model to a measured sparsity, and recovery.

The model is the ``tiny_export`` fixture (conftest.py): a resnet18 at 16 px trained for a few dozen steps
on the ``tiny_shards`` fixture (4 learnable classes) with tldist's own loader and fine-tune loop."""

from __future__ import annotations

import json

import torch

from helpers import evaluate_export as _eval


def test_trained_fixture_is_above_chance(tiny_export, tiny_shards):
    from helpers import exported as load_exported

    model, meta = load_exported(tiny_export)
    assert _eval(model, meta, tiny_shards / "val")["top1"] > 40.0  # chance is 25%


# ---- pruning -------------------------------------------------------------------------------------

def test_unstructured_prune_reaches_measured_sparsity(tiny_export, tiny_shards, tmp_path):
    from helpers import exported as load_exported
    from tldist.compress.prune import prune_export

    out = tmp_path / "pruned"
    r = prune_export(str(tiny_export), str(out), val=str(tiny_shards / "val"), sparsity=0.5)
    assert abs(r["sparsity"] - 0.5) < 1e-4 and r["baseline"]["count"] == r["pruned"]["count"] == 101
    model, meta = load_exported(out)  # an ordinary export directory: plain weights, no masks
    convs = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    zeros = sum(int((m.weight == 0).sum()) for m in convs)
    assert zeros == r["zero_params"]  # the head (fc) is left dense, so all zeros sit in convs
    assert int((model.fc.weight == 0).sum()) == 0
    assert meta["compression"]["method"] == "global-unstructured-l1"
    assert _eval(model, meta, tiny_shards / "val")["top1"] == r["pruned"]["top1"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["size_mb"]["zlib"] < saved["size_mb"]["source_zlib"]  # zeros compress


def test_recovery_finetune_keeps_masks_and_lowers_loss(tiny_export, tiny_shards, tmp_path):
    from tldist.compress.prune import prune_export

    r = prune_export(str(tiny_export), str(tmp_path / "rec"), val=str(tiny_shards / "val"), sparsity=0.9,
                     train=str(tiny_shards / "train"), finetune_steps=30, lr=0.02, batch_size=16)
    assert abs(r["sparsity"] - 0.9) < 1e-4  # measured after recovery: pruned weights stayed zero
    assert r["pruned"]["loss"] > r["baseline"]["loss"]
    assert r["recovered"]["loss"] < r["pruned"]["loss"]
    assert r["top1_delta"] == round(r["recovered"]["top1"] - r["baseline"]["top1"], 4)


def test_pruning_a_pruned_model_keeps_both_records(tmp_path):
    from tldist.compress.prune import _merge_shapes

    before = {"layer1.0.conv1": {"out_channels": 32}, "layer1.0.bn1": {"num_features": 32}}
    changed = {"layer1.0.conv1": {"out_channels": 16}, "layer2.0.conv1": {"out_channels": 64}}
    assert _merge_shapes(before, changed) == {"layer1.0.conv1": {"out_channels": 16},
                                              "layer1.0.bn1": {"num_features": 32},
                                              "layer2.0.conv1": {"out_channels": 64}}
