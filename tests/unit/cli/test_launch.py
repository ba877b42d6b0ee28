"""``tldist submit`` / ``sweep`` / ``status`` / ``cancel`` (tldist.cli.launch) without a cluster: dry runs
and one-line input errors."""

from __future__ import annotations

import pytest

from helpers import LAUNCH_CONFIG as CONFIG, REPO, launch_overrides as overrides


def test_submit_dry_run_prints_the_multi_node_script(tiny_shards, tmp_path, capsys):
    from tldist.cli.launch import main

    rc = main(["submit", str(REPO / CONFIG), *overrides(tiny_shards, tmp_path / "run"), "--nodes", "2",
               "--gpus-per-node", "8", "--partition", "gpu", "--time", "4:00:00", "--account", "proj", "--qos",
               "high", "--constraint", "a100", "--mem", "200G", "--cpus-per-task", "10", "--exclusive",
               "--setup", "module load cuda", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu", "--account=proj",
                 "--qos=high", "--constraint=a100", "--mem=200G", "--cpus-per-task=10", "--exclusive",
                 "--time=240", "--signal=USR2@120", "--requeue", "--job-name=tldist-run"):
        assert f"#SBATCH {line}\n" in out, line
    assert f"{tmp_path}/run/submitit/%j/%j_0_log.out" in out and "module load cuda" in out
    assert "16 task(s), max 5 requeues" in out


def test_sweep_dry_run_lists_every_combination(tiny_shards, tmp_path, capsys):
    from tldist.cli.launch import main

    rc = main(["sweep", str(REPO / CONFIG), *overrides(tiny_shards, tmp_path / "sw"), "optim.lr=0.1,0.01",
               "train.seed=0,1", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "4 runs as one array" in out
    assert f"-> {tmp_path}/sw/sweep/optim.lr=0.01,train.seed=1" in out
    assert "#SBATCH --array=0-3" in out


@pytest.mark.parametrize("args,message", [
    (["--time", "4h"], "--time '4h' is not a SLURM time"),
    (["--time", "2", "--signal-delay", "120"], "--signal-delay 120s is not shorter than --time 2"),
    (["--nodes", "0"], "--nodes 0 is invalid"),
    (["--cluster", "local", "--nodes", "2"], "--nodes 2 needs --cluster slurm"),
    (["data.train=[/nonexistent/shards]"], "no manifest at '/nonexistent/shards'"),
    (["optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
])
def test_bad_submit_input_is_one_line(tiny_shards, tmp_path, capsys, args, message):
    from tldist.cli.launch import main

    rc = main(["submit", str(REPO / CONFIG), *overrides(tiny_shards, tmp_path / "r"), *args, "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("command", ["submit", "sweep"])
@pytest.mark.parametrize("where", ["output_dir", "--folder"])
def test_an_output_under_a_file_is_refused_before_submitting(tiny_shards, tmp_path, capsys, command, where):
    """output_dir or --folder under an existing file: one line naming the option, exit 2 (not a traceback
    from the job, nor NotADirectoryError from submitit's folder)."""
    from tldist.cli.launch import main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out, extra = (blocker / "run", []) if where == "output_dir" else (tmp_path / "run", ["--folder", str(blocker / "f")])
    sweep = ["optim.lr=0.1,0.01"] if command == "sweep" else []
    rc = main([command, str(REPO / CONFIG), *overrides(tiny_shards, out), *sweep, *extra, "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{where} '" in err and "is a file, not a directory" in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_cancel_and_status_input_errors(tmp_path, capsys):
    from tldist.cli.launch import main

    assert main(["cancel", "12; rm -rf /"]) == 2
    assert "is not a SLURM job id" in capsys.readouterr().err
    assert main(["cancel"]) == 2 and "give job ids or --all" in capsys.readouterr().err
    assert main(["status", "--folder", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
