"""``checkpoint.async_save`` (issue 24 item 4): a background save writes what a blocking save writes, from the
state as it was when ``save()`` returned; it is in place only once ``wait()``/``close()``/the next save finished
it; and a process killed while a checkpoint is being written leaves the previous one the latest complete one."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import REPO, checkpoint_weights, env, spawn_ranks
from tldist.artifacts.checkpoint import latest_checkpoint, list_checkpoints, resolve_resume

from . import ranks


def _loaded(path, layout="plain", seed=1, rank=0):
    """The full state a fresh model, optimizer and EMA have after loading ``path``."""
    model, _, opt, ema = ranks.build(layout, seed=seed)
    ranks.manager(path.parent, model, opt, ema, rank=rank).load(path)
    return ranks.full_state(model, opt, ema)


def test_async_and_blocking_saves_of_one_state_load_alike(tmp_path):
    model, _, opt, ema = ranks.build("plain", seed=0)
    ranks.train(model, opt, ema, 3)
    ref = ranks.full_state(model, opt, ema)
    blocking = ranks.manager(tmp_path / "sync", model, opt, ema).save(3, trainer={"world_size": 1})
    mgr = ranks.manager(tmp_path / "async", model, opt, ema, async_save=True)
    pending = mgr.save(3, trainer={"world_size": 1})
    # in flight: not a checkpoint yet (no step_* dir), whatever the background thread has written
    assert not pending.exists() and latest_checkpoint(tmp_path / "async") is None
    ranks.train(model, opt, ema, 1, first=4)  # training goes on: the save holds the state of step 3
    mgr.wait()
    assert pending.is_dir() and latest_checkpoint(tmp_path / "async") == pending
    assert sorted(p.name for p in pending.iterdir()) == sorted(p.name for p in blocking.iterdir())
    a, b = _loaded(blocking), _loaded(pending)
    assert ranks.differences(ref, a) == [] and ranks.differences(a, b) == []
    assert ranks.differences(ref, ranks.full_state(model, opt, ema)), "the step after the save changed the state"


def test_the_next_save_and_close_finish_a_save_in_flight(tmp_path):
    model, _, opt, ema = ranks.build("plain", seed=0)
    mgr = ranks.manager(tmp_path, model, opt, ema, async_save=True, keep_last=5)
    first = mgr.save(1, trainer={})
    ranks.train(model, opt, ema, 1)
    second = mgr.save(2, trainer={})  # waits for step 1 and puts it in place first
    assert first.is_dir() and not second.exists()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    mgr.close()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2] and not list(tmp_path.glob(".tmp-*"))
    assert not all(torch.equal(checkpoint_weights(first)[k], v) for k, v in checkpoint_weights(second).items())


# ---- 2 ranks, FSDP2: the background write on its own gloo group ----------------------------------------

def _async_two_ranks(root, files, rank, port, out):
    import torch.distributed as dist

    ranks.init(rank, port)
    try:
        model, _, opt, ema = ranks.build("fsdp2", seed=0)
        ranks.train(model, opt, ema, 3, rank, 2)
        ref = ranks.full_state(model, opt, ema)
        blocking = ranks.manager(root / "sync", model, opt, ema, rank=rank).save(3, trainer={"world_size": 2})
        mgr = ranks.manager(root / "async", model, opt, ema, rank=rank, async_save=True)
        pending = mgr.save(3, trainer={"world_size": 2})
        in_flight = pending.exists()
        ranks.train(model, opt, ema, 1, rank, 2, first=4)  # collectives on the default group meanwhile
        mgr.close()
        got = {}
        for name, path in (("sync", blocking), ("async", pending)):
            m, _, o, e = ranks.build("fsdp2", seed=1)
            ranks.manager(path.parent, m, o, e, rank=rank).load(path)
            got[name] = ranks.full_state(m, o, e)
        if rank == 0:
            torch.save({"ref": ref, **got}, files)
        out[rank] = {"in_flight_exists": in_flight, "in_place": pending.is_dir(),
                     "parts": sorted(p.name for p in pending.iterdir() if p.suffix in (".distcp", ".pt"))}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_async_save_under_fsdp2_on_two_ranks_loads_like_a_blocking_one(tmp_path):
    out = spawn_ranks(functools.partial(_async_two_ranks, tmp_path, tmp_path / "states.pt"))
    assert not out[0]["in_flight_exists"] and all(out[r]["in_place"] for r in (0, 1)), out
    assert out[0]["parts"] == ["__0_0.distcp", "__1_0.distcp", "rank0.pt", "rank1.pt", "state.pt"]
    states = torch.load(tmp_path / "states.pt", weights_only=True)
    assert ranks.differences(states["ref"], states["sync"]) == []
    assert ranks.differences(states["sync"], states["async"]) == []


# ---- killed while writing: the previous checkpoint stays the latest complete one -------------------------

_KILLED = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from unit.artifacts import ranks
import tldist.artifacts.checkpoint as ck

root, where = Path({root!r}), {where!r}
model, _, opt, ema = ranks.build("plain", seed=0)
ranks.train(model, opt, ema, 1)
ranks.manager(root, model, opt, ema).save(1, trainer={{"world_size": 1}})
ranks.train(model, opt, ema, 1, first=2)
if where == "async":  # the background write of step 2 is in flight
    ranks.manager(root, model, opt, ema, async_save=True).save(2, trainer={{"world_size": 1}})
else:  # every part of step 2 is on disk; the kill lands before the completion marker
    ck._fsync_dir = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    ranks.manager(root, model, opt, ema).save(2, trainer={{"world_size": 1}})
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("where", ["async", "before_marker"])
def test_a_kill_while_writing_leaves_the_previous_checkpoint_latest(tmp_path, where):
    root = tmp_path / "ckpt"
    script = textwrap.dedent(_KILLED.format(tests=str(REPO / "tests"), root=str(root), where=where))
    proc = subprocess.run([sys.executable, "-c", script], env=env(), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]  # killed, as a preemption would
    assert (root / ".tmp-step_00000002").is_dir() and not (root / "step_00000002").exists()
    if where == "before_marker":  # all the data was there, only the marker was missing
        assert (root / ".tmp-step_00000002" / ".metadata").is_file()
    first = root / "step_00000001"
    assert latest_checkpoint(root) == first and resolve_resume(root, "auto") == first
    model, _, opt, ema = ranks.build("plain", seed=1)
    ranks.manager(root, model, opt, ema).load(first)  # and it loads
    assert all(torch.equal(model.state_dict()[k], v) for k, v in checkpoint_weights(first).items())
    ranks.manager(root, model, opt, ema).save(3, trainer={})  # the next save clears what the kill left
    assert not list(root.glob(".tmp-*")) and [s for s, _ in list_checkpoints(root)] == [1, 3]
