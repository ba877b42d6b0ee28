"""tldist.world: ``die_with_parent`` outside a launcher."""

from __future__ import annotations


def test_die_with_parent_does_nothing_outside_a_launcher(monkeypatch):
    from tldist.world import die_with_parent, launcher_parent

    for var in ("TORCHELASTIC_RUN_ID", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(var, raising=False)
    assert launcher_parent() is None and die_with_parent() is False  # `nohup tldist train &` survives its shell
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert launcher_parent() == "torchelastic"
