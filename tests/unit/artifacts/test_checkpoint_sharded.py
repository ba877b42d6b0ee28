"""Sharded checkpoints resharded on load, with real processes (issue 24 item 3): a checkpoint written under
FSDP2 on 2 ranks loads into one process, one written by one process loads under FSDP2 on 2 ranks, and DDP on
2 ranks loads under FSDP2 on 2 ranks. Each time the model, the AdamW moments and the EMA arrive bitwise (the
full, gathered state is compared), the per-rank states go to ``load_resharded`` when the world size changed,
and each rank of a 2-rank save wrote its own part."""

from __future__ import annotations

import functools

import pytest
import torch

from helpers import spawn_ranks

from . import ranks

pytestmark = pytest.mark.slow


def _save_on_two(layout, root, ref_file, rank, port, out):
    """2 ranks in ``layout`` train 3 steps and save step 3; rank 0 writes the full state to ``ref_file``."""
    import torch.distributed as dist

    ranks.init(rank, port)
    try:
        model, _, opt, ema = ranks.build(layout, seed=0)
        ranks.train(model, opt, ema, 3, rank, 2)
        loader = ranks.Loader(rank, position=30 + rank)
        path = ranks.manager(root, model, opt, ema, rank=rank, loader=loader).save(3, trainer={"world_size": 2})
        ref = ranks.full_state(model, opt, ema)
        if rank == 0:
            torch.save(ref, ref_file)
        out[rank] = {"path": str(path)}
    finally:
        dist.destroy_process_group()


def _load_on_two(layout, path, got_file, rank, port, out):
    """2 ranks in ``layout`` (another seed) load ``path``; rank 0 writes the full state to ``got_file``."""
    import torch.distributed as dist

    ranks.init(rank, port)
    try:
        model, _, opt, ema = ranks.build(layout, seed=1)
        loader = ranks.Loader(rank)
        trainer = ranks.manager(path.parent, model, opt, ema, rank=rank, loader=loader).load(path)
        got = ranks.full_state(model, opt, ema)
        if rank == 0:
            torch.save(got, got_file)
        out[rank] = {"step": trainer["step"], "loaded_from": loader.loaded_from, "position": loader.position,
                     "sharded": any(type(p).__name__ == "DTensor" for p in model.parameters())}
    finally:
        dist.destroy_process_group()


def _save_then_load_on_two(save_layout, load_layout, root, ref_file, got_file, rank, port, out):
    """Both in one pair of processes: save under ``save_layout``, then load into a fresh ``load_layout`` model."""
    import torch.distributed as dist

    ranks.init(rank, port)
    try:
        model, _, opt, ema = ranks.build(save_layout, seed=0)
        ranks.train(model, opt, ema, 3, rank, 2)
        path = ranks.manager(root, model, opt, ema, rank=rank, loader=ranks.Loader(rank, 30 + rank)).save(
            3, trainer={"world_size": 2})
        ref = ranks.full_state(model, opt, ema)
        model, _, opt, ema = ranks.build(load_layout, seed=1)
        loader = ranks.Loader(rank)
        ranks.manager(root, model, opt, ema, rank=rank, loader=loader).load(path)
        got = ranks.full_state(model, opt, ema)
        if rank == 0:
            torch.save(ref, ref_file)
            torch.save(got, got_file)
        out[rank] = {"loaded_from": loader.loaded_from, "position": loader.position, "path": str(path)}
    finally:
        dist.destroy_process_group()


def _one_process(seed=1):
    model, _, opt, ema = ranks.build("plain", seed=seed)
    return model, opt, ema


def test_fsdp2_on_two_ranks_loads_into_one_process(tmp_path):
    root, ref_file = tmp_path / "ckpt", tmp_path / "ref.pt"
    out = spawn_ranks(functools.partial(_save_on_two, "fsdp2", root, ref_file))
    path = root / "step_00000003"
    assert out[0]["path"] == str(path)
    names = {p.name for p in path.iterdir()}
    assert {"__0_0.distcp", "__1_0.distcp", "rank0.pt", "rank1.pt"} <= names  # each rank wrote its own part
    assert all((path / f"__{r}_0.distcp").stat().st_size > 1000 for r in (0, 1))  # ... holding its shards
    ref = torch.load(ref_file, weights_only=True)
    model, opt, ema = _one_process()
    loader = ranks.Loader()
    ranks.manager(root, model, opt, ema, loader=loader).load(path)
    got = ranks.full_state(model, opt, ema)
    assert ranks.differences(ref, got) == []
    assert ranks.differences(ref, ranks.full_state(*_one_process())), "the fresh model must differ from the saved one"
    assert any(k.endswith("exp_avg_sq") for st in got["optimizer"].values() for k in st)
    assert loader.loaded_from == [0, 1] and loader.position == 30  # the per-rank states of both ranks
    # what export, eval and model.checkpoint= read from it: the full weights, without a process group
    from helpers import checkpoint_weights

    assert all(torch.equal(checkpoint_weights(path)[k], v) for k, v in ref["model"].items())
    assert all(torch.equal(checkpoint_weights(path, "ema")[k], v) for k, v in ref["ema"].items())


def test_one_process_loads_into_fsdp2_on_two_ranks(tmp_path):
    root, got_file = tmp_path / "ckpt", tmp_path / "got.pt"
    model, opt, ema = _one_process(seed=0)
    ranks.train(model, opt, ema, 3)
    path = ranks.manager(root, model, opt, ema, loader=ranks.Loader(0, 30)).save(3, trainer={"world_size": 1})
    ref = ranks.full_state(model, opt, ema)
    out = spawn_ranks(functools.partial(_load_on_two, "fsdp2", path, got_file))
    assert all(out[r]["sharded"] and out[r]["step"] == 3 for r in (0, 1)), out
    assert [out[r]["loaded_from"] for r in (0, 1)] == [[0], [0]] and out[1]["position"] == 30
    assert ranks.differences(ref, torch.load(got_file, weights_only=True)) == []


def test_ddp_on_two_ranks_loads_into_fsdp2_on_two_ranks(tmp_path):
    ref_file, got_file = tmp_path / "ref.pt", tmp_path / "got.pt"
    out = spawn_ranks(functools.partial(_save_then_load_on_two, "ddp", "fsdp2", tmp_path / "ckpt", ref_file,
                                        got_file))
    ref, got = torch.load(ref_file, weights_only=True), torch.load(got_file, weights_only=True)
    assert ranks.differences(ref, got) == []
    assert [out[r]["loaded_from"] for r in (0, 1)] == [[0], [1]]  # same world size: each rank its own
    assert [out[r]["position"] for r in (0, 1)] == [30, 31]
