"""tldist.world: ``die_with_parent`` outside a launcher."""

from __future__ import annotations


def test_die_with_parent_does_nothing_outside_a_launcher(monkeypatch):
    from tldist.world import die_with_parent, launcher_parent

    for var in ("TORCHELASTIC_RUN_ID", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(var, raising=False)
    assert launcher_parent() is None and die_with_parent() is False  # `nohup tldist train &` survives its shell
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert launcher_parent() == "torchelastic"


def test_a_launchers_mixed_precision_that_a_command_does_not_use_is_said(tmp_path):
    """adapt/pseudo-label/compress start the world in fp32: under `accelerate launch --mixed_precision bf16`
    that is one warning, not a silent drop; a command that takes the launcher's precision says nothing."""
    import os
    import subprocess
    import sys

    code = ("import sys; from tldist.world import start_world; "
            "start_world(mixed_precision=None if sys.argv[1] == 'launcher' else 'no')")
    for mode, warned in (("fp32", True), ("launcher", False)):
        proc = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16"})
        assert proc.returncode == 0, proc.stderr
        assert ("--mixed_precision bf16 is not used by this command" in proc.stderr) is warned, proc.stderr
