"""tldist.train.ema sharded by FSDP2 over 2 real gloo processes (alone and through the trainer), and a bad
EMA setting on the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from helpers import spawn_ranks
from tldist.train.ema import WeightEma

torch.set_num_threads(1)


@pytest.mark.parametrize("overrides, key", [
    (["train.ema_decay=1"], "train.ema_decay"), (["train.ema_decay=1.5"], "train.ema_decay"),
    (["train.ema_decay=-0.1"], "train.ema_decay"), (["train.ema_decay=0.99", "train.ema_warmup_power=0"],
                                                    "train.ema_warmup_power"),
    (["checkpoint.best_metric=eval_ema/top1"], "checkpoint.best_metric"),
    (["checkpoint.best_metric=eval/loss"], "checkpoint.best_metric"),
])
def test_bad_ema_settings_are_one_line_config_errors(overrides, key):
    from helpers import REPO

    from tldist.config import load_config
    from tldist.errors import ConfigError

    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(str(REPO / "configs/test_tiny.yaml"), overrides).validate()
    if overrides == ["train.ema_decay=1"]:  # and from the command line: one line, exit 2
        proc = subprocess.run([sys.executable, "-m", "tldist.cli", "train", "configs/test_tiny.yaml", *overrides],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert "train.ema_decay" in proc.stderr and "(0, 1)" in proc.stderr


# ---- FSDP2: 2 real processes ------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, i: int, o: int):
        super().__init__()
        self.fc, self.norm = nn.Linear(i, o), nn.LayerNorm(o)  # 5 rows: uneven shards over 2 ranks

    def forward(self, x):
        return torch.relu(self.norm(self.fc(x)))


def fsdp_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Block(4, 5), Block(5, 7), nn.Linear(7, 3))


def _fsdp_worker(rank: int, port: int, out: dict) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode

    from tldist.train.parallelize import apply_fsdp2

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        ref, model = fsdp_model(), fsdp_model()
        apply_fsdp2(model, ["Block"], device_type="cpu")
        assert all(isinstance(p, DTensor) for p in model.parameters())
        opts = [torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9) for m in (ref, model)]
        emas = [WeightEma(m, m, decay=0.7, warmup=True) for m in (ref, model)]
        gen = torch.Generator().manual_seed(3)
        collectives = 0
        for step in range(1, 5):
            x = torch.randn(8, 4, generator=gen)  # the global batch; each rank trains on its half
            for m, opt, ema, xb in ((ref, opts[0], emas[0], x), (model, opts[1], emas[1], x.chunk(2)[rank])):
                opt.zero_grad()
                m(xb).square().mean().backward()
                opt.step()
                with CommDebugMode() as comm:
                    ema.update(step)
                if m is model:
                    collectives += comm.get_total_counts()
        ema = emas[1]
        local = sum(v.numel() for v in ema.values)
        full = ema.full_state_dict()  # gathered shards (on rank 0; the others get {})
        assert bool(full) == (rank == 0)
        box = [full]
        dist.broadcast_object_list(box, src=0)  # every rank reads the whole file on a resume
        full = box[0]
        ref_ema = emas[0].state_dict()
        ema_err = max(float((full[k] - ref_ema[k]).abs().max()) for k in ref_ema)
        # evaluation with the EMA swapped in, right after a raw forward (FSDP2's root keeps its
        # unsharded parameters after a forward: they must not be used with the EMA in)
        probe = torch.randn(6, 4, generator=gen)
        with torch.no_grad():
            raw_before = model(probe)
            with ema.applied():
                with_ema = model(probe)
            raw_after = model(probe)
            with emas[0].applied():
                ref_with_ema = ref(probe)
            ref_raw = ref(probe)
        # a saved EMA loads back bitwise (each rank keeps its shard)
        ema.reset()
        after_reset = ema.full_state_dict()
        reset_differs = rank > 0 or any(not torch.equal(after_reset[k], full[k]) for k in full)
        ema.load_full_state_dict(dict(full))  # (torch replaces the dict's values by DTensors)
        again = ema.full_state_dict()  # a collective: every rank
        again = again if rank == 0 else full
        out[rank] = {
            "local": local, "full": sum(v.numel() for v in full.values()), "collectives": collectives,
            "ema_err": ema_err, "eval_err": float((with_ema - ref_with_ema).abs().max()),
            "raw_err": max(float((raw_before - ref_raw).abs().max()), float((raw_after - ref_raw).abs().max())),
            "ema_vs_raw": float((ref_with_ema - ref_raw).abs().max()), "reset_differs": reset_differs,
            "reloaded": all(torch.equal(again[k], full[k]) for k in full),
        }
    finally:
        dist.destroy_process_group()


def test_fsdp2_ema_is_sharded_local_and_matches_one_process():
    out = spawn_ranks(_fsdp_worker)
    for rank in (0, 1):
        r = out[rank]
        assert r["local"] < r["full"], r  # each rank holds a shard of the EMA parameters
        assert r["collectives"] == 0, r  # the update is local
        assert r["ema_err"] < 1e-6, r  # the gathered EMA is the one-process EMA
        assert r["ema_vs_raw"] > 1e-3, r  # (the EMA really differs from the weights)
        assert r["eval_err"] < 1e-5 and r["raw_err"] < 1e-5, r  # swapped in and out correctly
        assert r["reset_differs"] and r["reloaded"], r
    assert out[0]["local"] + out[1]["local"] > out[0]["full"] - 1  # shards cover the model (buffers replicated)


@pytest.mark.slow
def test_fsdp2_training_evaluates_and_saves_the_sharded_ema(tiny_shards, tmp_path):
    """Through the trainer under FSDP2 (2 processes): eval_ema/* is the eval of the gathered
    ema.safetensors, scored again by ``tldist eval`` on its export."""
    from helpers import accelerate_cmd, overrides, run, tldist_cmd

    out = tmp_path / "fsdp"
    run(accelerate_cmd("fsdp.yaml", "train", "configs/test_tiny.yaml", *overrides(
        tiny_shards, out, "train.max_steps=4", "train.fsdp_block=InvertedResidual", "train.ema_decay=0.6",
        "optim.lr=0.4", "checkpoint.best_metric=eval_ema/top1")))
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["sharded_params"] is True
    assert result["eval_ema/count"] == 101
    assert abs(result["eval_ema/loss"] - result["eval/loss"]) > 1e-4, result  # the EMA is not the weights
    run(tldist_cmd("export", str(out), str(tmp_path / "export")))  # best judged on eval_ema: the EMA
    assert json.loads((tmp_path / "export" / "model.json").read_text())["weights"] == "ema"
    from helpers import REPO

    from tldist.config import load_config
    from tldist.evaluate import evaluate_checkpoint

    cfg = load_config(str(REPO / "configs/test_tiny.yaml"), [f"data.val={tiny_shards}/val", "data.num_workers=0",
                                                             "data.batch_size=8", "model.pretrained=false"])
    got = evaluate_checkpoint(cfg, str(tmp_path / "export"))  # one process, the exported (gathered) EMA
    assert got["loss"] == pytest.approx(result["eval_ema/loss"], rel=1e-5, abs=1e-6), (got, result)
    assert got["top1"] == pytest.approx(result["eval_ema/top1"])
