"""A requeued job that comes back on fewer nodes resumes (issue 24), on the 2-node dev cluster
(``slurm_multinode``, see tests/e2e/test_multinode.py).

``tldist submit --nodes 2 --min-nodes 1`` (sbatch ``--nodes=1-2``): node 2 crashes after a checkpoint and stays
down; SLURM requeues the job, which starts again on node 1 alone, resumes from the checkpoint on 1 rank and
finishes. Its global sample sequence continues the uninterrupted 2-node run's: the loader position is global,
so the 1-rank attempt (global batch 8 instead of 16) reads on from the very next sample.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from e2e.test_multinode import (
    COLLECTIVE_TIMEOUT_S,
    TOTAL_STEPS,
    _bring_back,
    _has_results,
    _results,
    _submit,
    _wait,
)
from helpers import job_logs, read_trace, trace_len

pytestmark = pytest.mark.slurm

EXTRA = (f"train.collective_timeout_s={COLLECTIVE_TIMEOUT_S}",)


def layouts(out: Path) -> list[dict]:
    last = sorted((out / "checkpoints").glob("step_*"))[-1]
    return json.loads((last / "trainer.json").read_text())["layouts"]


def global_sequence(out: Path) -> list[str]:
    """Every trained sample of a run in global order: step by step, row ``i`` of rank ``r`` is sample ``i*W + r``
    of the step (``W`` from trainer.json ``layouts`` at that step; a step trained twice counts once, the last)."""
    lays = layouts(out)
    traces = {r: read_trace(out, r) for r in range(max(lay["world_size"] for lay in lays))}
    seq = []
    for step in range(1, TOTAL_STEPS + 1):
        world = [lay for lay in lays if lay["step"] < step][-1]["world_size"]
        rows = [traces[r][step] for r in range(world)]
        seq += [rows[r][i] for i in range(len(rows[0])) for r in range(world)]
    return seq


@pytest.fixture(scope="module")
def uninterrupted(slurm_multinode, tiny_shards, tmp_path_factory):
    """The job of the test below, on 2 nodes from start to end."""
    root = tmp_path_factory.mktemp("elastic_ref")
    out, folder = root / "run", root / "submitit"
    jid = _submit(slurm_multinode, out, folder, "--nodes", "2", "--tasks-per-node", "1", extra=EXTRA, shards=tiny_shards)
    _wait(lambda: _has_results(folder, jid), 300, f"the 2-node reference job {jid}", slurm_multinode, jid)
    assert all(r["world_size"] == 2 and r["step"] == TOTAL_STEPS for r in _results(folder, jid))
    assert slurm_multinode.wait_final_state(jid) == "COMPLETED"
    return out


def _both_idle(cluster) -> bool:
    return all(cluster.node_state(k) == "idle" for k in (1, 2))


def test_job_requeued_on_fewer_nodes_resumes_and_finishes(slurm_multinode, uninterrupted, tiny_shards, tmp_path):
    cluster = slurm_multinode
    out, folder = tmp_path / "run", tmp_path / "submitit"
    # sbatch --nodes=1-2 starts on whatever is free at that moment (1 node while the other is still completing)
    _wait(lambda: _both_idle(cluster), 60, "both nodes to be idle")
    jid = _submit(cluster, out, folder, "--nodes", "2", "--min-nodes", "1", "--tasks-per-node", "1",
                  "--max-requeues", "2", extra=EXTRA, shards=tiny_shards)
    t0 = time.monotonic()
    try:
        _wait(lambda: trace_len(out) >= 6, 240, "6 steps on 2 nodes (the step-4 checkpoint is complete)", cluster, jid)
        assert (out / "trace" / "rank1.jsonl").is_file()  # the first attempt really had 2 ranks
        cluster.crash(2)  # slurmd killed, every other process of node 2 frozen; it stays down until the job ends
        _wait(lambda: cluster.node_state(2).startswith("down"), 60, "node2 to be marked DOWN")
        _wait(lambda: cluster.scontrol_job(jid).get("Restarts") == "1", 120, "SLURM to requeue the job", cluster, jid)
        _wait(lambda: "resumed from" in job_logs(folder, jid), 240, "the requeued job to resume on node 1", cluster, jid)
        assert cluster.node_state(2).startswith("down")  # resumed while node 2 is still lost
        _wait(lambda: _has_results(folder, jid, tasks=1), 300, "the requeued job to finish on 1 node", cluster, jid)
        state = cluster.wait_final_state(jid)
    finally:
        _bring_back(cluster, "node-crash")  # later tests need node 2
    seconds = time.monotonic() - t0
    assert state == "COMPLETED", state
    (res,) = _results(folder, jid, tasks=1)
    node1 = cluster.nodes()[0]
    assert res["world_size"] == 1 and res["step"] == TOTAL_STEPS and res["restarts"] == 1
    assert res["rank_hosts"] == [[node1["name"], node1["ip"]]]
    logs = job_logs(folder, jid)
    resumed = int(re.search(r"resumed from \S*step_(\d+)", logs).group(1))
    assert 0 < resumed < TOTAL_STEPS and resumed % 4 == 0, resumed
    # the world-size change: logged once, recorded in trainer.json, and the halved global batch named
    assert logs.count("on another layout") == 1, logs[-3000:]
    assert "2 ranks x 1 loader workers x batch 8 before, 1 x 1 x 8 now" in logs
    assert "changes from 16 (2 ranks x 8) to 8 (1 ranks x 8)" in logs
    assert layouts(out) == [{"step": 0, "world_size": 2, "num_workers": 1, "batch_size": 8},
                            {"step": resumed, "world_size": 1, "num_workers": 1, "batch_size": 8}]
    # the global sample sequence continues the uninterrupted 2-node run's, from the checkpoint on
    got, ref = global_sequence(out), global_sequence(uninterrupted)
    assert len(got) == resumed * 16 + (TOTAL_STEPS - resumed) * 8
    assert got == ref[:len(got)]
    print(f"\n[multinode] node 2 lost after step >= 6: resumed from step {resumed} on node 1 alone and finished "
          f"{seconds:.0f}s after the submit")
