"""CLI names (issue 27, item 12): ``tldist submit``/``sweep`` take sbatch's spellings and pass the other sbatch
options through to submitit; ``tldist train --help`` lists the timm flag of each config key from one source."""

from __future__ import annotations

import dataclasses

import pytest

from helpers import LAUNCH_CONFIG as CONFIG, REPO, launch_overrides as overrides


def test_submit_takes_sbatch_spellings_and_passes_options_through(tiny_shards, tmp_path, capsys):
    from tldist.cli.launch import main

    rc = main(["submit", str(REPO / CONFIG), *overrides(tiny_shards, tmp_path / "run"), "--ntasks-per-node", "3",
               "--gres", "gpu:a100:4", "--nodelist", "node[1-2]", "--exclude", "node7", "--reservation", "maint",
               "--dependency", "afterok:1234", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    for line in ("--ntasks-per-node=3", "--gres=gpu:a100:4", "--exclude=node7", "--reservation=maint",
                 "--dependency=afterok:1234"):
        assert f"#SBATCH {line}\n" in out, line
    assert "#SBATCH --nodelist=" in out and "node[1-2]" in out
    assert "3 task(s)" in out


def test_the_old_spelling_is_an_alias_and_short_flags_work(tiny_shards, tmp_path, capsys):
    from tldist.cli.launch import main

    rc = main(["submit", str(REPO / CONFIG), *overrides(tiny_shards, tmp_path / "run"), "--tasks-per-node", "2",
               "-w", "n1", "-x", "n2", "-d", "singleton", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    for line in ("--ntasks-per-node=2", "--nodelist=n1", "--exclude=n2", "--dependency=singleton"):
        assert f"#SBATCH {line}\n" in out, line


def test_sweep_array_parallelism(tiny_shards, tmp_path, capsys):
    from tldist.cli.launch import main

    rc = main(["sweep", str(REPO / CONFIG), *overrides(tiny_shards, tmp_path / "sw"), "optim.lr=0.1,0.01,0.001",
               "--array-parallelism", "2", "--dry-run"])
    assert rc == 0 and "#SBATCH --array=0-2%2\n" in capsys.readouterr().out


def test_bad_array_parallelism_is_one_line(tiny_shards, tmp_path, capsys):
    from tldist.cli.launch import main

    rc = main(["sweep", str(REPO / CONFIG), *overrides(tiny_shards, tmp_path / "sw"), "optim.lr=0.1,0.01",
               "--array-parallelism", "0", "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.splitlines() == [err] and "--array-parallelism 0 is invalid" in err


def test_train_help_lists_the_timm_flag_of_each_key(capsys):
    from tldist.cli.main import build_parser
    from tldist.config import timm_flags

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    rows = dict(timm_flags())
    for key, flag in (("optim.lr", "--lr-base"), ("optim.lr_ref_batch", "--lr-base-size"),
                      ("train.grad_checkpointing", "--grad-checkpointing"), ("data.batch_size", "--batch-size"),
                      ("train.mixed_precision", "--amp"), ("train.label_smoothing", "--smoothing")):
        assert rows[key].startswith(flag), key
        assert any(line.split()[:1] == [key] and flag in line for line in text.splitlines()), key
    assert len(rows) >= 40


def test_every_timm_key_is_a_config_key():
    from tldist.config import JobConfig, timm_flags

    cfg = JobConfig()
    for key, flag in timm_flags():
        section = cfg
        *path, name = key.split(".")
        for part in path:
            section = getattr(section, part)
        assert name in {f.name for f in dataclasses.fields(section)}, key
        assert flag.startswith("--"), key
