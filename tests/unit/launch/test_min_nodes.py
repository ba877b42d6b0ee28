"""``tldist submit --min-nodes`` (sbatch ``--nodes=min-max``): the batch script must let SLURM give the job up to
``--nodes`` nodes. sbatch turns ``--ntasks-per-node=k`` into ``--ntasks=min*k``, which caps the allocation at
``min`` nodes even when more are idle (seen on the dev cluster), so the tasks per node go to srun and each node's
CPUs are reserved with ``--mincpus``."""

from __future__ import annotations

from helpers import LAUNCH_CONFIG as CONFIG, REPO, launch_overrides as overrides


def _dry_run(capsys, tiny_shards, tmp_path, *flags: str) -> str:
    from tldist.cli.launch import main

    rc = main(["submit", str(REPO / CONFIG), *overrides(tiny_shards, tmp_path / "run"), *flags, "--dry-run"])
    assert rc == 0
    return capsys.readouterr().out


def test_min_nodes_script_leaves_the_task_count_to_the_allocation(tiny_shards, tmp_path, capsys):
    out = _dry_run(capsys, tiny_shards, tmp_path, "--nodes", "4", "--min-nodes", "2", "--ntasks-per-node", "2",
                   "--cpus-per-task", "3")
    sbatch = [ln for ln in out.splitlines() if ln.startswith("#SBATCH ")]
    assert "#SBATCH --nodes=2-4" in sbatch and "#SBATCH --mincpus=6" in sbatch
    assert not any(ln.startswith(("#SBATCH --ntasks", "#SBATCH --ntasks-per-node")) for ln in sbatch), sbatch
    srun = next(ln for ln in out.splitlines() if ln.startswith("srun "))
    assert "--ntasks-per-node=2" in srun.split() and "--kill-on-bad-exit=1" in srun.split()


def test_fixed_node_count_keeps_ntasks_per_node_in_the_script(tiny_shards, tmp_path, capsys):
    for flags in (("--nodes", "2"), ("--nodes", "2", "--min-nodes", "2")):
        out = _dry_run(capsys, tiny_shards, tmp_path, *flags, "--ntasks-per-node", "2")
        assert "#SBATCH --nodes=2\n" in out and "#SBATCH --ntasks-per-node=2\n" in out
        assert "mincpus" not in out
        srun = next(ln for ln in out.splitlines() if ln.startswith("srun "))
        assert "--ntasks-per-node=2" not in srun
