"""A mistake in a config file or an override given to ``tldist train`` is one line on stderr, exit status 2."""

import pytest

from helpers import REPO


@pytest.mark.parametrize("args,expected", [
    (["configs/test_tiny.yaml", "data.train=[a,"], "tldist: error: override 'data.train=[a,'"),
    (["BROKEN", "optim.lr=0.1"], "is not valid YAML: line 3, column 1: expected ',' or ']'"),
])
def test_cli_prints_one_line_and_exits_2(tmp_path, args, expected):
    import os
    import subprocess
    import sys

    repo = REPO
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim:\n  lr: [0.1\n")
    args = [str(broken) if a == "BROKEN" else a for a in args]
    proc = subprocess.run([sys.executable, "-m", "tldist.cli", "train", *args], capture_output=True, text=True,
                          cwd=repo, timeout=120, env={**os.environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert expected in proc.stderr, proc.stderr
