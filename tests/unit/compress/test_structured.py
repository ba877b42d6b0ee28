"""``tldist compress prune --structured``: channels removed with torch-pruning, saved and rebuilt.

Uses the briefly trained resnet18 export (4 classes, 16 px) of the ``tiny_export`` fixture (conftest.py)."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import evaluate_export as _eval, tldist_main as _cli


@pytest.fixture(scope="module")
def pruned_export(tiny_export, tiny_shards, tmp_path_factory):  # noqa: F811
    """The tiny export with half its channels removed, after 10 distilled recovery steps."""
    from tldist.compress.prune import prune_export

    out = tmp_path_factory.mktemp("structured") / "pruned50"
    report = prune_export(str(tiny_export), str(out), val=str(tiny_shards / "val"), sparsity=0.5, structured=True,
                          norm=2, round_to=1, train=str(tiny_shards / "train"), finetune_steps=10, lr=0.01,
                          batch_size=16, distill=True)
    return out, report


def test_pruned_model_is_smaller_and_round_trips(tiny_export, tiny_shards, pruned_export):  # noqa: F811
    from helpers import exported as load_exported

    out, r = pruned_export
    source, _ = load_exported(tiny_export)
    model, meta = load_exported(out)  # a fresh resnet18 resized to the recorded shapes, then loaded
    n_source = sum(p.numel() for p in source.parameters())
    n_pruned = sum(p.numel() for p in model.parameters())
    assert n_pruned == r["params_after"] < 0.4 * n_source  # ~half the channels: ~1/4 of the conv weights
    assert model.layer1[0].conv1.weight.shape[0] == 32 and model.layer1[0].conv1.out_channels == 32
    assert model.fc.out_features == 4  # the head keeps every class
    assert meta["structured_pruning"]["modules"]["layer1.0.conv1"] == {"in_channels": 32, "out_channels": 32}
    st_source = (tiny_export / "model.safetensors").stat().st_size
    assert (out / "model.safetensors").stat().st_size < 0.4 * st_source
    # what was measured before saving is what the rebuilt model scores
    assert _eval(model, meta, tiny_shards / "val")["top1"] == r["recovered"]["top1"]
    assert r["finetune"]["distilled"] == {"alpha": 0.5, "temperature": 4.0}


def test_pruned_export_predicts(pruned_export, tmp_path):
    import numpy as np
    from PIL import Image

    from tldist.export import predict

    out, _ = pruned_export
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(image)
    (result,) = predict(out, [str(image)], top_k=2)
    assert len(result["top"]) == 2 and result["top"][0][0] in ("c0", "c1", "c2", "c3")


def test_pruned_export_quantizes_close_to_eager(pruned_export, tiny_shards, tmp_path):
    from tldist.compress.quantize import quantize_export

    out, _ = pruned_export
    r = quantize_export(str(out), str(tmp_path / "q"), val=str(tiny_shards / "val"), calib=str(tiny_shards / "train"),
                        calib_batches=2, batch_size=16, latency_runs=1)
    assert r["fp32"]["count"] == r["int8"]["count"] == 101
    assert abs(r["top1_delta"]) <= 5.0  # int8 vs eager on the val split (101 images: 5 points = 5 images)


def test_malformed_shape_record_is_one_line(pruned_export, tmp_path, capsys, tiny_shards):
    import shutil

    out, _ = pruned_export
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    meta = json.loads((bad / "model.json").read_text())
    meta["structured_pruning"]["modules"]["layer1.0.conv1"] = {"kernel": 3}
    (bad / "model.json").write_text(json.dumps(meta))
    code, err = _cli(capsys, "predict", str(bad), "x.png")
    assert code == 2 and len(err.splitlines()) == 1 and "structured_pruning.modules" in err and str(bad) in err


def test_unsupported_architecture_is_named():
    import timm

    from tldist.compress.structured import apply_channel_pruning
    from tldist.errors import UserError

    vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, num_classes=4, depth=2)
    with pytest.raises(UserError, match="model 'timm:vit_tiny_patch16_224' cannot be pruned structurally"):
        apply_channel_pruning(vit, ["head"], torch.randn(1, 3, 16, 16), ratio=0.5, round_to=1,
                              name="timm:vit_tiny_patch16_224")
