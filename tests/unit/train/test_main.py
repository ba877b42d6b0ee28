"""tldist.train.main.build: every tensor of a built trainer lives on the accelerator's device."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from helpers import REPO, overrides


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
