"""Training recipes (tldist.train.recipe) with real processes: a bad value from the command line, resume
exactness and per-rank drop-path streams."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch


def test_negative_alpha_is_one_line_from_the_cli():
    from helpers import REPO

    proc = subprocess.run([sys.executable, "-m", "tldist.cli", "train", "configs/test_tiny.yaml", "data.train=[x]",
                           "train.mixup_alpha=-1"], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "'train.mixup_alpha'" in lines[0] and "Traceback" not in proc.stderr, proc.stderr


# ---- real processes -----------------------------------------------------------------------------

RECIPE = ["model.name=timm:mobilenetv3_small_050", "model.drop_path_rate=0.2", "train.mixup_alpha=0.8",
          "train.cutmix_alpha=1.0", "train.label_smoothing=0.1", "optim.lr=0.002", "optim.weight_decay=0.05"]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["lamb"])  # LARS state round-trips in unit/train/test_optim.py
def test_recipe_resume_matches_uninterrupted(tiny_shards, tmp_path, optimizer):
    """Mixup + CutMix + drop path + LAMB/LARS: a run resumed from the step-2 checkpoint of another ends with
    the same weights, bit for bit, as that uninterrupted run (mixup draws, drop-path stream, optimizer state
    including LAMB's per-group step). Single process for speed; the kill itself and per-rank RNG restore are
    covered by e2e/test_train.py and the rank-keyed draws of unit/train/test_recipe.py."""
    from helpers import BASE, checkpoint_weights, run, tldist_cmd

    def args(out, *more):  # no val set: nothing to evaluate, the weights are compared
        return [f"data.train=[{tiny_shards}/train]", f"output_dir={out}", *BASE, *RECIPE, f"optim.name={optimizer}",
                "train.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=5", "data.num_workers=0", *more]

    ref, out = tmp_path / "ref", tmp_path / "resumed"
    run(tldist_cmd("train", "configs/test_tiny.yaml", *args(ref)))
    run(tldist_cmd("train", "configs/test_tiny.yaml", *args(out, f"checkpoint.resume={ref}/checkpoints/step_00000002")))
    a, b = (json.loads((d / "result.json").read_text()) for d in (ref, out))
    assert a["step"] == b["step"] == 4
    wa, wb = (checkpoint_weights(d / "checkpoints" / "step_00000004") for d in (ref, out))
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ after resume"


PER_RANK_DROP_PATH = """
import json, sys, torch
from tldist.config import load_config
from tldist.train.main import build
trainer = build(load_config("configs/test_tiny.yaml", sys.argv[2:]))
model = trainer.parallel.module  # unwrapped: no DDP collectives in this forward
model.train()
x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    dropped = model(x).sum(1).tolist()
    for m in model.modules():  # control: the same forward without drop path agrees across ranks
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    plain = model(x).sum(1).tolist()
rank = trainer.parallel.world.rank
open(sys.argv[1] + f"/rank{rank}.json", "w").write(json.dumps({"dropped": dropped, "plain": plain,
                                                                 "world": trainer.num_processes}))
trainer.tracker.finish()
"""


@pytest.mark.slow
def test_ranks_draw_different_drop_path_masks(tiny_shards, tmp_path):
    """After build(), a timm model with drop_path_rate computes different train-mode outputs on the two ranks
    for the same input (each rank's torch stream is seed + rank); without drop path they agree."""
    from helpers import accelerate_cmd, overrides, run

    script = tmp_path / "drop_path.py"
    script.write_text(PER_RANK_DROP_PATH)
    cmd = accelerate_cmd("cpu.yaml", "train")[:-3]  # the launcher part only
    run([*cmd, str(script), str(tmp_path), *overrides(tiny_shards, tmp_path / "o", "data.num_workers=0",
                                                      "model.name=timm:mobilenetv3_small_050",
                                                      "model.drop_path_rate=0.5")])
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["plain"] == r1["plain"]
    assert r0["dropped"] != r1["dropped"]
