"""Elastic training with real processes (issue 24): the global sample order does not depend on the number of
ranks or loader workers, and a run killed after a checkpoint resumes on another world size where the
uninterrupted run would have been.

Every run here traces each rank's sample keys per step (``train.trace_samples=true``); a step's samples in
global order are its ranks' rows interleaved: row ``i`` of rank ``r`` is global sample ``i * world + r``.
The runs are shared by the tests of this module (module-scoped fixtures), 12 steps each with a checkpoint
every 4.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from helpers import BASE, checkpoint_weights, cli, kill_at_step, read_trace, run

pytestmark = pytest.mark.slow

CONFIG = "configs/test_tiny.yaml"
STEPS = 12
"""Optimizer steps of every run (global batch 16: 192 of the 300 training samples)."""
LAYOUTS = {  # name -> (ranks, overrides): the global batch is 16 in each
    "1x16": (1, ["data.batch_size=16", "data.num_workers=1"]),
    "2x8": (2, ["data.batch_size=8", "data.num_workers=1"]),
    "2x8w2": (2, ["data.batch_size=8", "data.num_workers=2"]),
}
CHANGED = "on another layout"
"""In the log line of a resume whose ranks / loader workers / batch differ from the checkpoint's."""


def train_cmd(shards: Path, out: Path, layout: str, *extra: str) -> list[str]:
    ranks, over = LAYOUTS[layout]
    return cli("train", CONFIG, f"data.train=[{shards}/train]", f"output_dir={out}", *BASE,
               f"train.max_steps={STEPS}", "checkpoint.every_steps=4", "checkpoint.keep_last=5",
               "train.trace_samples=true", *over, *extra, processes=ranks)


def layouts_of(out: Path) -> list[dict]:
    return json.loads((out / "checkpoints" / f"step_{STEPS:08d}" / "trainer.json").read_text())["layouts"]


def global_order(out: Path) -> dict[int, list[str]]:
    """``{step: sample keys in global order}`` of a run (its world size per step from trainer.json ``layouts``)."""
    layouts = layouts_of(out)
    traces = {r: read_trace(out, r) for r in range(max(lay["world_size"] for lay in layouts))}
    order = {}
    for step in range(1, STEPS + 1):
        world = [lay for lay in layouts if lay["step"] < step][-1]["world_size"]
        rows = [traces[r][step] for r in range(world)]
        assert len({len(x) for x in rows}) == 1, (step, rows)
        order[step] = [rows[r][i] for i in range(len(rows[0])) for r in range(world)]
    return order


def result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


def resumed_step(log: str) -> int:
    return int(re.search(r"resumed from \S*step_(\d+)", log).group(1))


def kill_after_checkpoint(cmd: list[str], out: Path) -> int:
    """Run ``cmd`` and SIGKILL it once 6 steps are traced (the step-4 checkpoint is complete by then)."""
    done = kill_at_step(cmd, out, 6)
    assert 6 <= done < STEPS, f"the kill landed at step {done}"
    return done


@pytest.fixture(scope="module")
def refs(tiny_shards, tmp_path_factory):
    """The uninterrupted runs, one per layout."""
    root = tmp_path_factory.mktemp("elastic_refs")
    for name in LAYOUTS:
        run(train_cmd(tiny_shards, root / name, name))
    return {name: root / name for name in LAYOUTS}


@pytest.fixture(scope="module")
def killed(tiny_shards, tmp_path_factory):
    """A 2-rank run and a 1-rank run, each killed with SIGKILL after its step-4 checkpoint."""
    root = tmp_path_factory.mktemp("elastic_killed")
    for name in ("2x8", "1x16"):
        kill_after_checkpoint(train_cmd(tiny_shards, root / name, name), root / name)
    return {name: root / name for name in ("2x8", "1x16")}


def resume(killed_dir: Path, dest: Path, shards: Path, layout: str, *extra: str) -> tuple[Path, str]:
    """Resume a copy of the killed run at ``dest`` on ``layout``; (its output dir, its log)."""
    shutil.copytree(killed_dir, dest)
    proc = run(train_cmd(shards, dest, layout, *extra))
    return dest, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def resumed(killed, tiny_shards, tmp_path_factory):
    """The killed runs resumed: 2 -> 1 rank (batch 8 -> 16), 1 -> 2 (DDP and FSDP2), 2 -> 2 (same layout)."""
    root = tmp_path_factory.mktemp("elastic_resumed")
    return {
        "2to1": resume(killed["2x8"], root / "2to1", tiny_shards, "1x16"),
        "1to2": resume(killed["1x16"], root / "1to2", tiny_shards, "2x8"),
        "1to2_fsdp": resume(killed["1x16"], root / "1to2_fsdp", tiny_shards, "2x8", "train.fsdp=true"),
        "2to2": resume(killed["2x8"], root / "2to2", tiny_shards, "2x8"),
    }


def test_equal_global_batch_trains_on_the_same_samples_at_every_step(refs):
    """1 rank x 16, 2 ranks x 8 and 2 ranks x 2 loader workers x 8 see the same samples, in the same global order,
    at every step from the start; with the same ranks, the loader worker count changes nothing at all."""
    orders = {name: global_order(out) for name, out in refs.items()}
    ref = orders["1x16"]
    assert all(len(keys) == 16 for keys in ref.values())
    assert len({k for keys in ref.values() for k in keys}) == 16 * STEPS  # within the first stream-epoch: no repeat
    for name, order in orders.items():
        diff = [s for s in ref if order[s] != ref[s]]
        assert not diff, f"{name}: steps {diff} hold other samples than 1x16"
    assert {result(out)["world_size"] for out in refs.values()} == {1, 2}
    assert all(result(out)["step"] == STEPS for out in refs.values())
    # 2 ranks: each rank's batches are the same whatever the worker count, so training is bitwise the same
    assert result(refs["2x8"])["param_checksum"] == result(refs["2x8w2"])["param_checksum"]


@pytest.mark.parametrize("name,before,after", [
    ("2to1", {"world_size": 2, "num_workers": 1, "batch_size": 8}, {"world_size": 1, "num_workers": 1, "batch_size": 16}),
    ("1to2", {"world_size": 1, "num_workers": 1, "batch_size": 16}, {"world_size": 2, "num_workers": 1, "batch_size": 8}),
    ("1to2_fsdp", {"world_size": 1, "num_workers": 1, "batch_size": 16},
     {"world_size": 2, "num_workers": 1, "batch_size": 8}),
])
def test_resume_on_another_world_size_continues_the_uninterrupted_run(name, before, after, resumed, refs):
    """Killed after a checkpoint, resumed on another number of ranks (global batch 16 kept): every global step's
    samples equal the uninterrupted run's, the change is logged once and recorded in trainer.json."""
    out, log = resumed[name]
    at = resumed_step(log)
    assert at in (4, 8), at
    assert log.count(CHANGED) == 1, log[-3000:]
    line = next(ln for ln in log.splitlines() if CHANGED in ln)
    assert f"resuming at step {at}" in line
    assert f"{before['world_size']} ranks x 1 loader workers x batch {before['batch_size']} before" in line
    assert f"{after['world_size']} x 1 x {after['batch_size']} now" in line
    assert f"global sample {at * 16}" in line
    assert "batch of all ranks changes" not in log  # the global batch did not change: no warning about it
    assert layouts_of(out) == [{"step": 0, **before}, {"step": at, **after}]
    res = result(out)
    assert res["step"] == STEPS and res["world_size"] == after["world_size"]
    # FSDP2 shards the parameters (ranks_agree is None there); DDP ranks hold the same ones
    assert (res["sharded_params"], res["ranks_agree"]) == ((True, None) if name.endswith("fsdp") else (False, True))
    order, ref = global_order(out), global_order(refs["1x16"])
    diff = [s for s in ref if order[s] != ref[s]]
    assert not diff, f"steps {diff} differ from the uninterrupted run (resumed at step {at})"
    # the steps after the checkpoint were trained by the new layout: its own trace lines, no replay, no gap
    for r in range(after["world_size"]):
        lines = [json.loads(x)["step"] for x in (out / "trace" / f"rank{r}.jsonl").read_text().splitlines()]
        assert lines[-(STEPS - at):] == list(range(at + 1, STEPS + 1)), (r, lines)


def test_same_layout_kill_and_resume_is_bitwise(resumed, refs):
    """Killed with SIGKILL and resumed on the same 2 ranks: the same samples per rank and bitwise equal weights."""
    out, log = resumed["2to2"]
    assert resumed_step(log) in (4, 8) and CHANGED not in log
    assert layouts_of(out) == [{"step": 0, "world_size": 2, "num_workers": 1, "batch_size": 8}]
    for rank in (0, 1):
        assert read_trace(out, rank) == read_trace(refs["2x8"], rank)
    assert result(out)["param_checksum"] == result(refs["2x8"])["param_checksum"]
    wa = checkpoint_weights(refs["2x8"] / "checkpoints" / f"step_{STEPS:08d}")
    wb = checkpoint_weights(out / "checkpoints" / f"step_{STEPS:08d}")
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} tensors differ after the resume, e.g. {differ[:3]}"
