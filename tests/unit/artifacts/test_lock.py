"""tldist.artifacts.lock from lock files alone: foreign hosts, requeued SLURM jobs, a run whose lock was
taken over (real processes holding the lock: e2e/test_lock.py)."""

from __future__ import annotations

import json
import os
import time

import pytest

from helpers import write_lock
from tldist.artifacts.lock import (
    RunLockError,
    acquire_run_lock,
)


def test_foreign_host_lock_goes_stale_when_its_heartbeat_stops(tmp_path):
    path = write_lock(tmp_path / "run", host="gpu-node-17", pid=4242, boot_id="another-machine",
                      pid_ns="pid:[1]", heartbeat_s=0.5, job_id="9001")
    with pytest.raises(RunLockError) as e:  # just touched: live
        acquire_run_lock(tmp_path / "run")
    msg = str(e.value)
    assert "host gpu-node-17, pid 4242" in msg and "SLURM job 9001" in msg and "last heartbeat" in msg
    assert "\n" not in msg and f"delete {path}" in msg
    old = time.time() - 60  # no heartbeat for 60 s > 4 x 0.5 s
    os.utime(path, (old, old))
    lock = acquire_run_lock(tmp_path / "run")
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()


def test_requeued_attempt_of_the_same_slurm_job_takes_over(tmp_path, monkeypatch):
    write_lock(tmp_path / "run", host="node1", pid=77, boot_id="another-machine", job_id="555", restart=0)
    monkeypatch.setenv("SLURM_JOB_ID", "556")  # another job: refused
    with pytest.raises(RunLockError, match="SLURM job 555"):
        acquire_run_lock(tmp_path / "run")
    monkeypatch.setenv("SLURM_JOB_ID", "555")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # the same attempt (e.g. a second srun step): refused
    with pytest.raises(RunLockError):
        acquire_run_lock(tmp_path / "run")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # SLURM requeued the job: the old attempt is over
    lock = acquire_run_lock(tmp_path / "run")
    assert json.loads(lock.path.read_text())["restart"] == 1 and lock.info.job_id == "555"
    lock.release()


def test_a_run_whose_lock_was_taken_over_writes_no_checkpoint(tmp_path):
    """The checkpoint manager asks the lock before writing: once another run holds the directory
    (here: the lock file replaced by another holder's), saving raises and nothing is written."""
    import torch

    from helpers import checkpoint_manager
    from tldist.artifacts.checkpoint import list_checkpoints
    from tldist.artifacts.lock import RunLockError, acquire_run_lock

    lock = acquire_run_lock(tmp_path)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    mgr = checkpoint_manager(tmp_path / "checkpoints", model, opt, sched)
    mgr.guard = lock.ensure_held
    mgr.save(1, trainer={})
    lock.path.write_text(lock.path.read_text().replace(lock.info.token, "someone-else"))
    with pytest.raises(RunLockError, match="no longer held"):
        mgr.save(2, trainer={})
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [1]
    lock.release()
