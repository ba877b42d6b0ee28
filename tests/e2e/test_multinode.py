"""Multi-node for real: 2 SLURM nodes, each in its own network namespace with its own IP and hostname
(``slurm/dev-cluster.sh`` with ``TLDIST_SLURM_NODES=2``, fixture ``slurm_multinode``).

Every test here trains the tiny config across node1 (10.213.7.11) and node2 (10.213.7.12) over gloo
through the bridge, and checks what a multi-node user relies on: the two ranks really are on two hosts,
the result equals the single-host 2-process run bit for bit, preemption and requeue keep the step and
the W&B run, a lost node or a killed rank never leaves a rank hanging longer than tldist's bound.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import (
    LAUNCH_CONFIG as CONFIG,
    REPO,
    checkpoint_weights,
    job_logs as _job_logs,
    launch_cli as cli,
    launch_overrides as _launch_overrides,
    read_trace,
    trace_len,
    wandb_runs as _wandb_runs,
)

pytestmark = pytest.mark.slurm

TOTAL_STEPS = 16
"""Steps of every job here (checkpoint every 4): short, the CI budget of this module is minutes."""
COLLECTIVE_TIMEOUT_S = 20
"""train.collective_timeout_s of the fault tests: the bound tldist puts on a rank whose peer is gone."""


# ------------------------------------------------------------------ helpers
def overrides(shards: Path, out: Path, *extra: str) -> list[str]:
    """test_launch's tiny run, shortened to TOTAL_STEPS."""
    return _launch_overrides(shards, out, f"train.max_steps={TOTAL_STEPS}", *extra)


def _env(cluster, **extra: str) -> dict[str, str]:
    """Environment for the CLI/sbatch: this cluster's SLURM_CONF and the venv's bin on PATH."""
    return {"SLURM_CONF": str(cluster.conf), "WANDB_MODE": "disabled",
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **extra}


def _wait(predicate, timeout: float, what: str, cluster=None, job_id=None) -> float:
    """Poll ``predicate`` until true; fail after ``timeout`` s (cancelling ``job_id``). Returns the seconds waited."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            if cluster is not None and job_id is not None:
                cluster.run("scancel", str(job_id), check=False)
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)
    return time.monotonic() - t0


def _submit(cluster, out: Path, folder: Path, *flags: str, extra: tuple[str, ...] = (), shards: Path,
            env: dict | None = None) -> str:
    proc = cli("submit", CONFIG, *overrides(shards, out, *extra), "--cpus-per-task", "1", "--time", "15",
               "--partition", cluster.partition, "--folder", str(folder), *flags, env={**_env(cluster), **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("submitted job ", 1)[1].split()[0]


def _gone_from_queue(cluster, job_id: str) -> bool:
    return cluster.job_state(job_id) == "GONE"


def _results(folder: Path, job_id: str, tasks: int = 2) -> list[dict]:
    import pickle

    results = []
    for t in range(tasks):
        with open(folder / job_id / f"{job_id}_{t}_result.pkl", "rb") as f:
            outcome, value = pickle.load(f)
        assert outcome == "success", f"task {t}: {value}"
        results.append(value)
    return sorted(results, key=lambda r: r["rank"])


def _has_results(folder: Path, job_id: str, tasks: int = 2) -> bool:
    return all((folder / job_id / f"{job_id}_{t}_result.pkl").is_file() for t in range(tasks))


def _final_weights(out: Path) -> dict:

    last = sorted((out / "checkpoints").glob("step_*"))[-1]
    return checkpoint_weights(last)


def _same_weights(a: Path, b: Path) -> None:
    import torch

    wa, wb = _final_weights(a), _final_weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} tensors differ bitwise, e.g. {differ[:3]}"


def _task_pids(job_id: str, procid: int) -> list[int]:
    """Host pids of the job's task ``procid`` (submitit's python and its loader workers; every node's
    processes are visible from here). Matched on the command line: torch renames the main thread
    (comm ``pt_main_thread``)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = dict(e.split("=", 1) for e in (d / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in e)
            cmdline = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if (b"submitit.core._submit" in cmdline and env.get("SLURM_JOB_ID") == job_id
                and env.get("SLURM_PROCID") == str(procid) and "SLURM_STEP_ID" in env
                and env.get("SLURM_STEP_ID") not in ("batch", "extern")):
            pids.append(int(d.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        st = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return st not in ("Z", "X")


# ------------------------------------------------------------------ cluster
def test_two_nodes_have_their_own_network_and_names(slurm_multinode):
    nodes = slurm_multinode.nodes()
    assert [n["name"] for n in nodes] == ["node1", "node2"]
    assert len({n["ip"] for n in nodes}) == 2
    for k, n in enumerate(nodes, 1):
        assert slurm_multinode.node_state(k) == "idle"
        proc = slurm_multinode.on_node(k, "sh", "-c", "hostname; getent hosts node1 node2; ip -4 -o addr show eth0")
        lines = proc.stdout.splitlines()
        assert lines[0] == n["name"]
        assert any(n["ip"] + "/24" in ln for ln in lines)
        assert f"{nodes[0]['ip']}" in lines[1] and f"{nodes[1]['ip']}" in lines[2]  # never 127.0.1.1
    assert "node1" not in Path("/etc/hosts").read_text().split()  # the host's hosts file is untouched
    print(f"\n[timing] 2-node cluster start (fixture, incl. status check): {slurm_multinode.start_seconds:.1f}s")


def rendezvous_job() -> dict:
    """Job callable (2 nodes x 2 tasks): tldist's own export of the torch env, then a gloo all-gather."""
    import socket

    import submitit
    import torch.distributed as dist

    from tldist.launch.job import export_distributed_env

    values = export_distributed_env(submitit.JobEnvironment())
    dist.init_process_group(backend="gloo", init_method="env://")
    try:
        me = {**values, "host": socket.gethostname(), "ip": socket.gethostbyname(socket.gethostname()),
              "master_ip": socket.gethostbyname(values["MASTER_ADDR"]), "slurm_localid": os.environ["SLURM_LOCALID"],
              "slurm_nodeid": os.environ["SLURM_NODEID"]}
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, me)
        return {"rank": dist.get_rank(), "everyone": everyone}
    finally:
        dist.destroy_process_group()


def test_rendezvous_env_on_two_nodes_with_two_tasks_each(slurm_multinode, tmp_path, monkeypatch):
    """RANK / LOCAL_RANK / NODE_RANK from SLURM's variables, MASTER_ADDR = first host of the job, resolved to
    node1's bridge address on every node, MASTER_PORT = 20000 + job id % 20000 on every task."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_multinode.conf))
    ex = slurm_multinode.executor(tmp_path / "%j", nodes=2, tasks_per_node=2, cpus_per_task=1, timeout_min=5,
                                  name="tldist-rdzv")
    job = ex.submit(rendezvous_job)
    _wait(lambda: _has_results(tmp_path, job.job_id, tasks=4), 120, f"job {job.job_id}", slurm_multinode, job.job_id)
    everyone = job.results()[0]["everyone"]
    nodes = slurm_multinode.nodes()
    assert [e["RANK"] for e in everyone] == ["0", "1", "2", "3"]
    assert [(e["host"], e["ip"]) for e in everyone] == [(n["name"], n["ip"]) for n in nodes for _ in (0, 1)]
    assert [e["NODE_RANK"] for e in everyone] == [e["slurm_nodeid"] for e in everyone] == ["0", "0", "1", "1"]
    assert [e["LOCAL_RANK"] for e in everyone] == [e["slurm_localid"] for e in everyone] == ["0", "1", "0", "1"]
    assert {e["LOCAL_WORLD_SIZE"] for e in everyone} == {"2"} and {e["WORLD_SIZE"] for e in everyone} == {"4"}
    assert {(e["MASTER_ADDR"], e["master_ip"]) for e in everyone} == {("node1", nodes[0]["ip"])}
    assert {e["MASTER_PORT"] for e in everyone} == {str(20000 + int(job.job_id) % 20000)}


# ------------------------------------------------------------------ training across two nodes
@pytest.fixture(scope="module")
def two_runs(slurm_multinode, tiny_shards, tmp_path_factory):
    """The same job twice at once: 2 nodes x 1 task (gloo over the bridge) and 1 node x 2 tasks (loopback)."""
    root = tmp_path_factory.mktemp("multinode")
    runs = {"2x1": ("--nodes", "2", "--tasks-per-node", "1"), "1x2": ("--nodes", "1", "--tasks-per-node", "2")}
    ids = {}
    for name, flags in runs.items():
        ids[name] = _submit(slurm_multinode, root / name / "run", root / name / "submitit", *flags, shards=tiny_shards)
    t0 = time.monotonic()
    for name, jid in ids.items():
        _wait(lambda: _has_results(root / name / "submitit", jid), 300, f"job {name} ({jid})", slurm_multinode, jid)
    seconds = time.monotonic() - t0
    return {name: {"job_id": jid, "out": root / name / "run", "folder": root / name / "submitit",
                   "results": _results(root / name / "submitit", jid), "seconds": seconds} for name, jid in ids.items()}


def test_submit_two_nodes_trains_across_hosts(two_runs, slurm_multinode):
    run = two_runs["2x1"]
    results = run["results"]
    nodes = slurm_multinode.nodes()
    for r in results:
        assert r["world_size"] == 2 and r["ranks_agree"] is True and r["step"] == TOTAL_STEPS
        assert r["param_checksum"] == results[0]["param_checksum"]
        # rank 0 on node1, rank 1 on node2, each advertising its own bridge address to gloo
        assert r["rank_hosts"] == [[nodes[0]["name"], nodes[0]["ip"]], [nodes[1]["name"], nodes[1]["ip"]]]
    logs = _job_logs(run["folder"], run["job_id"])
    assert "rank 0/2, master node1:" in logs  # MASTER_ADDR = first host of SLURM_JOB_NODELIST
    assert slurm_multinode.wait_final_state(run["job_id"]) == "COMPLETED"
    # rank 0 alone writes the shared output dir: one result.json, one trace per rank, one set of checkpoints
    assert json.loads((run["out"] / "result.json").read_text())["rank_hosts"] == results[0]["rank_hosts"]


def test_two_nodes_equal_one_node_two_processes_bitwise(two_runs):
    one = two_runs["1x2"]["results"]
    assert len({tuple(h) for h in one[0]["rank_hosts"]}) == 1  # both ranks on one host
    assert two_runs["2x1"]["results"][0]["param_checksum"] == one[0]["param_checksum"]
    for rank in (0, 1):  # the same samples at every step
        assert read_trace(two_runs["2x1"]["out"], rank) == read_trace(two_runs["1x2"]["out"], rank)
    _same_weights(two_runs["2x1"]["out"], two_runs["1x2"]["out"])


@pytest.mark.parametrize("script", ["train-srun.sbatch", "train-accelerate.sbatch"])
def test_sbatch_scripts_on_two_nodes(script, slurm_multinode, two_runs, tiny_shards, tmp_path):
    out = tmp_path / "run"
    cmd = ["sbatch", "--parsable", "--nodes", "2", "--ntasks-per-node", "1", "--cpus-per-task", "1",
           "--time", "15", "-p", slurm_multinode.partition, f"--output={tmp_path}/job-%j.out",
           str(REPO / "slurm" / script), CONFIG, *overrides(tiny_shards, out)]
    env = {**os.environ, **_env(slurm_multinode), "PYTHONPATH": str(REPO)}
    if script == "train-accelerate.sbatch":
        env["PROCS_PER_NODE"] = "1"
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    jid = proc.stdout.strip().split(";")[0]
    _wait(lambda: _gone_from_queue(slurm_multinode, jid), 300, f"{script} job {jid}", slurm_multinode, jid)
    log_text = (tmp_path / f"job-{jid}.out").read_text()
    assert slurm_multinode.wait_final_state(jid) == "COMPLETED", log_text[-3000:]
    result = json.loads((out / "result.json").read_text())
    nodes = slurm_multinode.nodes()
    assert result["world_size"] == 2 and result["ranks_agree"] is True and result["step"] == TOTAL_STEPS
    assert result["rank_hosts"] == [[nodes[0]["name"], nodes[0]["ip"]], [nodes[1]["name"], nodes[1]["ip"]]]
    for rank in (0, 1):
        assert read_trace(out, rank) == read_trace(two_runs["2x1"]["out"], rank)
    _same_weights(out, two_runs["2x1"]["out"])


# ------------------------------------------------------------------ preemption across nodes
def test_usr2_checkpoints_both_nodes_at_one_step_and_requeues(slurm_multinode, two_runs, tiny_shards, tmp_path):
    out, folder = tmp_path / "run", tmp_path / "submitit"
    jid = _submit(slurm_multinode, out, folder, "--nodes", "2", "--tasks-per-node", "1", "--max-requeues", "2",
                  extra=("tracker.backend=wandb",), shards=tiny_shards, env={"WANDB_MODE": "offline"})
    _wait(lambda: trace_len(out) >= 6, 240, "6 steps of the first attempt", slurm_multinode, jid)
    run_id = json.loads((out / "tracker.json").read_text())["run_id"]
    slurm_multinode.run("scancel", "--signal=USR2", jid)
    _wait(lambda: slurm_multinode.scontrol_job(jid).get("Restarts") == "1", 120, "the requeue", slurm_multinode, jid)
    # before the second attempt starts (cred_expire + 1 s): both ranks stopped after the same step
    last = [max(read_trace(out, rank)) for rank in (0, 1)]
    assert last[0] == last[1] < TOTAL_STEPS, last
    assert (out / "checkpoints" / f"step_{last[0]:08d}").is_dir()
    _wait(lambda: _has_results(folder, jid), 300, "the requeued job to finish", slurm_multinode, jid)
    results = _results(folder, jid)
    assert all(r["step"] == TOTAL_STEPS and r["restarts"] == 1 and r["ranks_agree"] for r in results)
    logs = _job_logs(folder, jid)
    assert logs.count("caught SIGUSR2") >= 2, logs[-3000:]  # rank 0 on node1 and rank 1 on node2
    assert f"step_{last[0]:08d}" in logs.split("resumed from", 1)[1].splitlines()[0]
    for rank in (0, 1):
        assert read_trace(out, rank) == read_trace(two_runs["2x1"]["out"], rank)
    assert json.loads((out / "tracker.json").read_text())["run_id"] == run_id == results[0]["tracker_run_id"]
    assert {r[0] for r in _wandb_runs(out)} == {run_id}
    # one W&B writer per job: one offline segment per attempt (rank 0's), not one per rank
    assert len(sorted(out.glob("wandb/offline-run-*"))) == 2
    assert slurm_multinode.wait_final_state(jid) == "COMPLETED"
    print(f"\n[multinode] USR2 at step {last[0]}: both nodes checkpointed there, requeued, finished at {TOTAL_STEPS}")


# ------------------------------------------------------------------ node failure
FAULT_STEPS = 40


def _redone_steps(out: Path, rank: int) -> dict[int, tuple[list[str], list[str]]]:
    """Steps trained twice (before the fault and after the resume): step -> (first keys, second keys)."""
    seen: dict[int, list[str]] = {}
    redone = {}
    for line in (out / "trace" / f"rank{rank}.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["step"] in seen:
            redone[rec["step"]] = (seen[rec["step"]], rec["keys"])
        seen[rec["step"]] = rec["keys"]
    return redone


def _bring_back(cluster, fault: str) -> None:
    """The repaired node 2 rejoins: link up / slurmd started, leftovers of the old job ended (as a reboot
    would; a stale step that re-registers makes SLURM revoke the job's credential while the requeued
    attempt launches, and that attempt then FAILS with "Job credential revoked"), then resumed."""
    if fault == "link-down":
        cluster.link(2, up=True)
        cluster.reset(2)
    else:  # the "reboot": frozen processes gone before slurmd registers again
        cluster.reset(2)
        cluster.start_slurmd(2)
    cluster.resume(2)


@pytest.mark.parametrize("fault", ["link-down", "node-crash"])
def test_lost_node_requeues_and_resumes(fault, slurm_multinode, two_runs, tiny_shards, tmp_path):
    """Node 2 disappears mid-training: its link cut (its processes run on, cut off), or crashed (slurmd
    killed, everything else frozen). SLURM marks it DOWN and requeues the job; no live rank waits longer
    than train.collective_timeout_s (+ a margin) for its lost peer; once node 2 is back the job resumes
    from the last periodic checkpoint and ends at the planned step."""
    out, folder = tmp_path / "run", tmp_path / "submitit"
    steps = FAULT_STEPS
    jid = _submit(slurm_multinode, out, folder, "--nodes", "2", "--tasks-per-node", "1",
                  extra=(f"train.collective_timeout_s={COLLECTIVE_TIMEOUT_S}", f"train.max_steps={steps}"),
                  shards=tiny_shards)
    _wait(lambda: trace_len(out) >= 6, 240, "6 steps", slurm_multinode, jid)
    ranks = {r: _task_pids(jid, r) for r in (0, 1)}
    assert ranks[0] and ranks[1], ranks
    t_fault = time.monotonic()
    restored = False
    try:
        if fault == "link-down":
            slurm_multinode.link(2, up=False)
        else:  # slurmd killed and everything else on node2 frozen (a dead slurmd alone stops no job)
            slurm_multinode.crash(2)
        bound = COLLECTIVE_TIMEOUT_S + 25  # collective timeout + process teardown on a loaded 2-core machine
        gone = {1: float("nan")}  # seconds from the fault until every process of the rank is gone
        for r in ((0, 1) if fault == "link-down" else (0,)):  # a crashed node's rank never runs again
            _wait(lambda r=r: not any(_alive(p) for p in ranks[r]), bound - (time.monotonic() - t_fault),
                  f"rank {r} to exit within {bound}s of the fault")
            gone[r] = time.monotonic() - t_fault
        _wait(lambda: slurm_multinode.node_state(2).startswith("down"), 60, "node2 to be marked DOWN")
        _wait(lambda: slurm_multinode.scontrol_job(jid).get("Restarts") == "1", 60, "SLURM to requeue the job")
        t_requeued = time.monotonic() - t_fault
        _bring_back(slurm_multinode, fault)
        restored = True
    finally:
        if not restored:
            _bring_back(slurm_multinode, fault)
    _wait(lambda: "resumed from" in _job_logs(folder, jid), 180, "the requeued job to resume", slurm_multinode, jid)
    t_resumed = time.monotonic() - t_fault
    _wait(lambda: _has_results(folder, jid), 300, "the requeued job to finish", slurm_multinode, jid)
    results = _results(folder, jid)
    assert all(r["step"] == steps and r["restarts"] == 1 and r["ranks_agree"] for r in results)
    resumed = int(re.search(r"resumed from \S*step_(\d+)", _job_logs(folder, jid)).group(1))
    # node1's rank gets SLURM's SIGTERM while stuck in a collective with the lost node: no stop checkpoint,
    # the job resumes from the last periodic one (every 4 steps)
    assert 0 < resumed < steps and resumed % 4 == 0, resumed
    for rank in (0, 1):
        redone = _redone_steps(out, rank)
        # steps after the checkpoint are trained again (none when the ranks stopped and saved together)
        assert not redone or min(redone) == resumed + 1, (rank, sorted(redone), resumed)
        assert all(a == b for a, b in redone.values()), f"rank {rank}: a re-done step read other samples"
        assert sorted(read_trace(out, rank)) == list(range(1, steps + 1))
    assert slurm_multinode.wait_final_state(jid) == "COMPLETED"
    exits = ", ".join(f"rank {r} (node{r + 1}) {t:.1f}s" for r, t in gone.items() if t == t)
    print(f"\n[multinode] {fault}: ranks exit after the fault: {exits} (bound {bound}s); requeued after {t_requeued:.1f}s; resumed (from step {resumed}) "
          f"{t_resumed:.1f}s after the fault")


# ------------------------------------------------------------------ a rank dies
def test_killed_rank_ends_the_job_and_a_resubmit_resumes(slurm_multinode, two_runs, tiny_shards, tmp_path):
    """kill -9 of rank 1 (node2): srun --kill-on-bad-exit ends rank 0 at once, the job FAILS clearly
    (a crash is not requeued: it would crash again), and the same command resumes from the checkpoint."""
    out, folder = tmp_path / "run", tmp_path / "submitit"
    flags = ("--nodes", "2", "--tasks-per-node", "1")
    jid = _submit(slurm_multinode, out, folder, *flags, shards=tiny_shards)
    _wait(lambda: trace_len(out) >= 10, 240, "10 steps", slurm_multinode, jid)
    rank0, rank1 = _task_pids(jid, 0), _task_pids(jid, 1)
    assert rank0 and rank1
    t0 = time.monotonic()
    for pid in rank1:
        os.kill(pid, signal.SIGKILL)
    took = _wait(lambda: not any(_alive(p) for p in rank0), 30, "rank 0 to be ended by --kill-on-bad-exit")
    _wait(lambda: _gone_from_queue(slurm_multinode, jid), 60, "the job to end", slurm_multinode, jid)
    state = slurm_multinode.wait_final_state(jid)
    assert state == "FAILED", state
    ended = time.monotonic() - t0
    jid2 = _submit(slurm_multinode, out, folder, *flags, shards=tiny_shards)  # same command, same output_dir
    _wait(lambda: _has_results(folder, jid2), 300, "the resubmitted job", slurm_multinode, jid2)
    results = _results(folder, jid2)
    assert all(r["step"] == TOTAL_STEPS and r["ranks_agree"] for r in results)
    assert "resumed from" in _job_logs(folder, jid2)
    for rank in (0, 1):
        assert read_trace(out, rank) == read_trace(two_runs["2x1"]["out"], rank)
    print(f"\n[multinode] kill -9 rank 1: rank 0 gone after {took:.1f}s, job FAILED after {ended:.1f}s")
