"""tldist.train.parallelize: one placement/wrapping path, the same mixed precision in every mode,
torch.compile with resume. Multi-process cases run under ``accelerate launch`` with real processes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO
from test_train import BASE, accelerate_cmd, overrides, run, tldist_cmd


def tensors_of(trainer) -> dict[str, torch.Tensor]:
    """Every tensor a built trainer holds: parameters, buffers, optimizer state, normalizer constants."""
    out = {f"model.{k}": v for k, v in trainer.parallel.module.state_dict(keep_vars=True).items()}
    out.update({f"normalize.{k}": v for k, v in trainer.normalize.named_buffers()})
    for i, st in enumerate(trainer.optimizer.state.values()):
        out.update({f"optim.{i}.{k}": v for k, v in st.items() if isinstance(v, torch.Tensor) and v.dim() > 0})
    return out


def test_build_takes_its_device_from_the_accelerator(tiny_shards, tmp_path):
    """Every tensor build() creates lives on accelerator.device. The device here is ``meta``, so a
    builder that picks its own device (CPU by default) is caught on a machine without a GPU too."""
    from tldist.config import load_config
    from tldist.train.main import build

    meta = SimpleNamespace(device=torch.device("meta"), is_main_process=True, process_index=0,
                           local_process_index=0, num_processes=1)
    cfg = load_config(str(REPO / "configs/test_tiny.yaml"), [*overrides(tiny_shards, tmp_path / "o"),
                                                            "data.num_workers=0", "optim.name=adamw"])
    trainer = build(cfg, meta)
    try:
        tensors = tensors_of(trainer)
        assert len(tensors) > 100
        wrong = {k: str(v.device) for k, v in tensors.items() if v.device.type != "meta"}
        assert not wrong, wrong
        assert trainer.parallel.mode == "single" and trainer.device == torch.device("meta")
    finally:
        trainer.train_loader.close()


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


@pytest.mark.slow
def test_ddp_and_fsdp2_compute_the_same_under_bf16(tiny_shards, tmp_path):
    """Autocast is the mixed precision of every mode: DDP and FSDP2 (fp32 parameters in both) train
    to the same weights up to reduction order. Before, FSDP2 ran bf16 parameters and DDP autocast."""
    from safetensors.torch import load_file

    extra = ["train.max_steps=4", "train.mixed_precision=bf16", "train.fsdp_block=InvertedResidual"]
    weights = {}
    for launcher in ("cpu.yaml", "fsdp.yaml"):
        out = tmp_path / launcher
        run(accelerate_cmd(launcher, "train", "configs/test_tiny.yaml", *overrides(tiny_shards, out, *extra)))
        result = json.loads((out / "result.json").read_text())
        assert result["world_size"] == 2 and result["sharded_params"] is (launcher == "fsdp.yaml")
        weights[launcher] = load_file(str(out / "checkpoints" / "step_00000004" / "model.safetensors"))
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
    common = [*overrides(tiny_shards, out, "train.compile=true", "model.name=resnet18", "checkpoint.every_steps=2",
                         "data.num_workers=0")]
    run(accelerate_cmd(launcher, "train", "configs/test_tiny.yaml", *common, "train.max_steps=2"), timeout=600)
    proc = run(accelerate_cmd(launcher, "train", "configs/test_tiny.yaml", *common, "train.max_steps=4"), timeout=600)
    assert "resumed from" in proc.stdout and "step_00000002" in proc.stdout
    result = json.loads((out / "result.json").read_text())
    assert result["step"] == 4 and result["world_size"] == 2
    assert result["sharded_params"] is (launcher == "fsdp.yaml")
    assert result["ranks_agree"] is (None if launcher == "fsdp.yaml" else True)
    from safetensors.torch import load_file

    keys = load_file(str(out / "checkpoints" / "step_00000004" / "model.safetensors")).keys()
    assert not any("_orig_mod" in k for k in keys)
