"""Real-SLURM checks on the dev cluster (slurm/dev-cluster.sh): submitit + torch/gloo, requeue.

Job callables live at module level here; the executor from ``slurm_cluster.executor`` puts the
tests dir on the job's PYTHONPATH so they unpickle inside the job.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm


# ------------------------------------------------------------------ job callables (run in SLURM)
def gloo_allreduce_job() -> dict:
    import socket

    import submitit
    import torch
    import torch.distributed as dist

    job_env = submitit.JobEnvironment()
    # sbatch exports the submitter's environment: never inherit MASTER_*/RANK from it.
    os.environ["MASTER_PORT"] = str(20000 + int(os.environ["SLURM_JOB_ID"]) % 20000)
    dist_env = submitit.helpers.TorchDistributedEnvironment().export(
        set_cuda_visible_devices=False, overwrite=True
    )
    dist.init_process_group(backend="gloo", init_method="env://")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        t = torch.tensor([float(rank + 1), 10.0 * (rank + 1)])
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        gathered = [None] * world
        dist.all_gather_object(gathered, socket.gethostname())
        return {
            "rank": rank,
            "world_size": world,
            "job_global_rank": job_env.global_rank,
            "local_rank": job_env.local_rank,
            "num_tasks": job_env.num_tasks,
            "master": f"{dist_env.master_addr}:{dist_env.master_port}",
            "sum": t.tolist(),
            "hosts": gathered,
        }
    finally:
        dist.destroy_process_group()


def requeue_job(marker_dir: str) -> int:
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    Path(marker_dir, f"attempt{restarts}").write_text(os.environ["SLURM_JOB_ID"])
    if restarts == 0:
        time.sleep(300)  # the test requeues us long before this ends
    return restarts


# ------------------------------------------------------------------ helpers
def _wait_done(job, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not job.done():
        if time.monotonic() > deadline:
            job.cancel(check=False)
            pytest.fail(f"job {job.job_id} not done after {timeout}s (state {job.state})\n{job.stderr()}")
        time.sleep(0.5)


# ------------------------------------------------------------------ tests
def test_cluster_is_up(slurm_cluster):
    assert os.environ["SLURM_CONF"] == str(slurm_cluster.conf)
    out = slurm_cluster.run("sinfo", "-h", "-p", slurm_cluster.partition, "-o", "%T %c").stdout.split()
    assert out[0] in {"idle", "mixed", "allocated"}, out
    assert int(out[1]) >= 4, f"node advertises {out[1]} CPUs; expected the config_overrides value"
    # accounting must answer: submitit reads job states through sacct
    slurm_cluster.run("sacct", "-a", "-X", "-n", "-S", "now-1minutes")


def test_submitit_two_task_gloo_allreduce(slurm_cluster, tmp_path):
    ex = slurm_cluster.executor(
        tmp_path / "%j", tasks_per_node=2, cpus_per_task=1, timeout_min=5, name="tldist-gloo"
    )
    job = ex.submit(gloo_allreduce_job)
    _wait_done(job, 90)
    results = job.results()
    assert len(results) == 2
    by_rank = sorted(results, key=lambda r: r["rank"])
    assert [r["rank"] for r in by_rank] == [0, 1]
    assert [r["job_global_rank"] for r in by_rank] == [0, 1]
    for r in by_rank:
        assert r["world_size"] == 2 and r["num_tasks"] == 2
        assert r["sum"] == [3.0, 30.0]  # (1 + 2), (10 + 20)
        assert r["master"] == by_rank[0]["master"]
        assert r["master"].endswith(f":{20000 + int(job.job_id) % 20000}")
    assert by_rank[0]["hosts"] == by_rank[1]["hosts"]
    assert slurm_cluster.wait_final_state(job.job_id) == "COMPLETED"


def test_scontrol_requeue_restarts_job(slurm_cluster, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    ex = slurm_cluster.executor(tmp_path / "%j", tasks_per_node=1, cpus_per_task=1, timeout_min=5,
                                name="tldist-requeue")
    job = ex.submit(requeue_job, str(markers))

    deadline = time.monotonic() + 60
    while not (markers / "attempt0").exists():
        if time.monotonic() > deadline:
            job.cancel(check=False)
            pytest.fail(f"first attempt never started (state {job.state})")
        time.sleep(0.2)
    slurm_cluster.run("scontrol", "requeue", str(job.job_id))

    _wait_done(job, 90)
    assert job.result() == 1  # the job saw SLURM_RESTART_COUNT=1
    assert (markers / "attempt1").read_text() == str(job.job_id)

    assert slurm_cluster.wait_final_state(job.job_id) == "COMPLETED"
    records = slurm_cluster.sacct(job.job_id)
    states = [r["State"] for r in records]
    assert "REQUEUED" in states and states[-1] == "COMPLETED", records
    assert slurm_cluster.scontrol_job(job.job_id).get("Restarts") == "1"
    print("sacct after requeue:", *("|".join(r.values()) for r in records), sep="\n  ")
