"""tldist.launch.job: the distributed environment of a task, the resume choice, the requeue limit."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from helpers import LAUNCH_CONFIG as CONFIG, REPO


def test_export_distributed_env_overwrites_leaked_vars(monkeypatch):
    from tldist.launch.job import export_distributed_env, master_port

    assert master_port(12345) == 32345 and master_port("12345_3") == 32345
    assert 20000 <= master_port("local-abc") < 40000
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    for name, value in (("MASTER_PORT", "29500"), ("RANK", "5"), ("TORCHELASTIC_RUN_ID", "x"),
                        ("MASTER_ADDR", "elsewhere"), ("WORLD_SIZE", "9"), ("LOCAL_RANK", "4"),
                        ("LOCAL_WORLD_SIZE", "8"), ("NODE_RANK", "3")):
        monkeypatch.setenv(name, value)  # also makes monkeypatch restore them after the test
    job_env = SimpleNamespace(raw_job_id="777", hostnames=["node7", "node8"], global_rank=3, num_tasks=4,
                              local_rank=1, num_nodes=2, node=1)
    values = export_distributed_env(job_env)
    assert values == {"MASTER_ADDR": "node7", "MASTER_PORT": "20777", "RANK": "3", "WORLD_SIZE": "4",
                      "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "NODE_RANK": "1"}
    assert all(os.environ[k] == v for k, v in values.items())
    assert "TORCHELASTIC_RUN_ID" not in os.environ


def test_choose_resume_keeps_warm_start_only_on_first_attempt(tmp_path):
    from tldist.config import load_config
    from tldist.launch.job import choose_resume
    from tldist.artifacts.checkpoint import MARKER

    warm = tmp_path / "other" / "step_00000010"
    warm.mkdir(parents=True)
    (warm / "trainer.json").write_text("{}")
    cfg = load_config(REPO / CONFIG, [f"output_dir={tmp_path}/run", f"checkpoint.resume={warm}"])
    assert choose_resume(cfg) == str(warm)  # first attempt: start from the given checkpoint
    own = tmp_path / "run" / "checkpoints" / "step_00000004"
    own.mkdir(parents=True)
    (own / "trainer.json").write_text("{}")
    (own / MARKER).write_text(json.dumps({"members": {"trainer.json": 2}}))  # complete (is_complete)
    assert choose_resume(cfg) == "auto"  # a requeued attempt continues from its own checkpoint
    cfg.checkpoint.resume = "none"
    assert choose_resume(cfg) == "auto"


def test_after_stop_obeys_the_requeue_limit(tmp_path):
    from tldist.launch.job import STOPPED_EXIT_CODE, RequeueLimitError, TrainJob

    job = TrainJob({}, max_requeues=2)
    env = SimpleNamespace(job_id="55", global_rank=1)
    with pytest.raises(RequeueLimitError, match="after 2 requeues and --max-requeues is 2"):
        job._after_stop(env, SimpleNamespace(received=["SIGUSR2"]), 2, str(tmp_path))
    # SIGTERM (scancel, scontrol requeue, preemption): SLURM decides; leave without a result
    with pytest.raises(SystemExit) as exc:
        job._after_stop(env, SimpleNamespace(received=["SIGUSR2", "SIGTERM"]), 0, str(tmp_path))
    assert exc.value.code == STOPPED_EXIT_CODE
    # USR2 on a non-zero rank below the limit: no requeue from this rank, exit without a result
    with pytest.raises(SystemExit):
        job._after_stop(env, SimpleNamespace(received=["SIGUSR2"]), 1, str(tmp_path))
