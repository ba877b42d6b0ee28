"""Kill-and-resume with every training recipe on at once (Mixup/CutMix, RandAugment, drop path, EMA of
the weights), in 2 real processes: the resumed run ends bitwise where the uninterrupted one ends,
EMA weights included."""

from __future__ import annotations

import dataclasses
import json

import pytest

from helpers import accelerate_cmd, checkpoint_weights, kill_at_step, overrides, read_trace, run

pytestmark = pytest.mark.slow


def recipe_overrides() -> list[str]:
    """The recipe keys this tree's config has (other parts of the recipe work land separately)."""
    from tldist.config import DataConfig, ModelConfig, TrainConfig

    have = {f"{prefix}.{f.name}" for prefix, cls in (("data", DataConfig), ("model", ModelConfig),
                                                     ("train", TrainConfig)) for f in dataclasses.fields(cls)}
    wanted = {"train.ema_decay": "0.8", "train.ema_warmup": "true", "train.mixup_alpha": "0.4",
              "train.cutmix_alpha": "1.0", "data.auto_augment": "rand-m9-mstd0.5-inc1", "model.drop_path_rate": "0.2"}
    on = [f"{k}={v}" for k, v in wanted.items() if k in have]
    # drop path needs a model with stochastic depth: timm's tiny test EfficientNet (BatchNorm too)
    return on + (["model.name=timm:test_efficientnet"] if "model.drop_path_rate" in have else [])


def test_all_recipes_on_resume_after_kill_matches_uninterrupted(tiny_shards, tmp_path):

    recipe = recipe_overrides()
    assert "train.ema_decay=0.8" in recipe
    print("recipes on:", recipe)
    extra = ["train.max_steps=10", "checkpoint.every_steps=3", "train.trace_samples=true", "checkpoint.keep_last=5",
             "train.eval_every_steps=5", "data.num_workers=1", *recipe]
    ref = tmp_path / "ref"
    run(accelerate_cmd("cpu.yaml", "train", "configs/test_tiny.yaml", *overrides(tiny_shards, ref, *extra)))

    out = tmp_path / "killed"
    cmd = accelerate_cmd("cpu.yaml", "train", "configs/test_tiny.yaml", *overrides(tiny_shards, out, *extra))
    done = kill_at_step(cmd, out, 4)
    assert 4 <= done < 10, f"kill landed at step {done}"
    run(accelerate_cmd("cpu.yaml", "train", "configs/test_tiny.yaml", *overrides(tiny_shards, out, *extra)))

    a, b = json.loads((ref / "result.json").read_text()), json.loads((out / "result.json").read_text())
    assert a["step"] == b["step"] == 10 and a["world_size"] == b["world_size"] == 2 and a["ranks_agree"]
    for rank in (0, 1):
        assert read_trace(ref, rank) == read_trace(out, rank)
    assert a["param_checksum"] == b["param_checksum"]
    assert a["eval_ema/top1"] == b["eval_ema/top1"] and a["eval_ema/loss"] == b["eval_ema/loss"]
    final = "checkpoints/step_00000010"
    for member in ("raw", "ema"):
        wa, wb = checkpoint_weights(ref / final, member), checkpoint_weights(out / final, member)
        assert wa.keys() == wb.keys()
        assert all(torch_equal(wa[k], wb[k]) for k in wa), f"{member} weights differ after resume"
    # the EMA is not the weights (it really was averaged)
    wa, ea = checkpoint_weights(ref / final, "raw"), checkpoint_weights(ref / final, "ema")
    assert any(not torch_equal(wa[k], ea[k]) for k in wa if wa[k].is_floating_point())


def torch_equal(x, y) -> bool:
    import torch

    return torch.equal(x, y)
