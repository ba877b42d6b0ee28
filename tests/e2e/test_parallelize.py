"""tldist.train.parallelize under ``accelerate launch`` with real processes: DDP and FSDP2 compute the same
under bf16, and a torch.compile'd run resumes into the compiled model."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import accelerate_cmd, checkpoint_weights, overrides, run


@pytest.mark.slow
def test_ddp_and_fsdp2_compute_the_same_under_bf16(tiny_shards, tmp_path):
    """Autocast is the mixed precision of every mode: DDP and FSDP2 (fp32 parameters in both) train
    to the same weights up to reduction order. Before, FSDP2 ran bf16 parameters and DDP autocast."""

    extra = ["train.max_steps=4", "train.mixed_precision=bf16", "train.fsdp_block=InvertedResidual"]
    weights = {}
    for launcher in ("cpu.yaml", "fsdp.yaml"):
        out = tmp_path / launcher
        run(accelerate_cmd(launcher, "train", "configs/test_tiny.yaml", *overrides(tiny_shards, out, *extra)))
        result = json.loads((out / "result.json").read_text())
        assert result["world_size"] == 2 and result["sharded_params"] is (launcher == "fsdp.yaml")
        weights[launcher] = checkpoint_weights(out / "checkpoints" / "step_00000004")
    a, b = weights["cpu.yaml"], weights["fsdp.yaml"]
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["cpu.yaml", "fsdp.yaml"])
def test_compiled_run_resumes_into_the_compiled_model(tiny_shards, tmp_path, launcher):
    """train.compile=true under DDP and FSDP2: trains, checkpoints, and a resumed run loads the checkpoint
    into the compiled model (state-dict keys unchanged by compiling in place) and finishes."""
    out = tmp_path / "compiled"
    common = [*overrides(tiny_shards, out, "train.compile=true", "model.name=timm:resnet10t", "checkpoint.every_steps=2",
                         "data.num_workers=0")]
    run(accelerate_cmd(launcher, "train", "configs/test_tiny.yaml", *common, "train.max_steps=2"), timeout=600)
    proc = run(accelerate_cmd(launcher, "train", "configs/test_tiny.yaml", *common, "train.max_steps=4"), timeout=600)
    assert "resumed from" in proc.stdout and "step_00000002" in proc.stdout
    result = json.loads((out / "result.json").read_text())
    assert result["step"] == 4 and result["world_size"] == 2
    assert result["sharded_params"] is (launcher == "fsdp.yaml")
    assert result["ranks_agree"] is (None if launcher == "fsdp.yaml" else True)

    keys = checkpoint_weights(out / "checkpoints" / "step_00000004").keys()
    assert not any("_orig_mod" in k for k in keys)
