"""tldist.launch.slurm without a cluster: SLURM times, sweeps, job folders, the srun lines it generates."""

from __future__ import annotations

import os

import pytest

from helpers import REPO


def test_parse_time():
    from tldist.launch.slurm import parse_time

    assert parse_time("4:00:00") == 240
    assert parse_time("90") == 90
    assert parse_time("1:30") == 2  # MM:SS rounds up to whole minutes
    assert parse_time("1-12") == 36 * 60
    assert parse_time("2-00:30:00") == 48 * 60 + 30
    from tldist.errors import UserError

    for bad in ("4h", "0:30", ""):
        with pytest.raises(UserError, match="--time"):
            parse_time(bad)


def test_expand_sweep_and_labels():
    from tldist.errors import ConfigError
    from tldist.launch.slurm import expand_sweep, run_label, split_values

    assert split_values("0.1,[1,2],'a,b'") == ["0.1", "[1,2]", "'a,b'"]
    fixed, combos = expand_sweep(["optim.lr=0.1,0.01", "train.epochs=1", "model.name=resnet18,vit_b_16"])
    assert fixed == ["train.epochs=1"]
    assert combos == [[("optim.lr", "0.1"), ("model.name", "resnet18")],
                      [("optim.lr", "0.1"), ("model.name", "vit_b_16")],
                      [("optim.lr", "0.01"), ("model.name", "resnet18")],
                      [("optim.lr", "0.01"), ("model.name", "vit_b_16")]]
    assert run_label(combos[0]) == "optim.lr=0.1,model.name=resnet18"
    assert run_label([("data.train", "[/a/b]")]) == "data.train=[_a_b]"
    with pytest.raises(ConfigError, match="no sweep axis"):
        expand_sweep(["optim.lr=0.1"])
    with pytest.raises(ConfigError, match="output_dir"):
        expand_sweep(["output_dir=a,b"])
    with pytest.raises(ConfigError, match="not key=value"):
        expand_sweep(["optim.lr"])


def test_folder_job_ids(tmp_path):
    from tldist.launch.slurm import folder_job_ids

    for jid in ("12", "9", "40_1"):
        (tmp_path / jid).mkdir()
        (tmp_path / jid / f"{jid}_submission.sh").write_text("#!/bin/bash\n")
    (tmp_path / "notes").mkdir()
    assert folder_job_ids(tmp_path) == ["9", "12", "40_1"]


def test_every_srun_kills_the_job_when_one_task_dies(tmp_path, monkeypatch):
    """submitit's generated batch script and both sbatch files run srun with --kill-on-bad-exit=1."""
    from tldist.launch.slurm import Resources, make_executor

    # submitit only checks that an `srun` exists before it writes a script; nothing is run or submitted
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    ex = make_executor(tmp_path / "%j", Resources(nodes=2, gpus_per_node=4), "tldist-x")
    script = ex._executor._make_submission_file_text("python -u -m submitit.core._submit x", "0")
    srun = [ln for ln in script.splitlines() if ln.startswith("srun ")]
    assert len(srun) == 1 and "--kill-on-bad-exit=1" in srun[0].split(), script
    for sbatch in sorted((REPO / "slurm").glob("*.sbatch")):
        lines = [ln.strip() for ln in sbatch.read_text().splitlines() if ln.strip().startswith("srun ")]
        assert lines and all("--kill-on-bad-exit=1" in ln.split() for ln in lines), sbatch.name
