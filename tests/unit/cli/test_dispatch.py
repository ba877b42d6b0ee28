"""tldist.cli.dispatch: one line per user mistake, and what each rank tells torch-elastic's failure summary."""

from __future__ import annotations

import json
import time

import pytest

from tldist.cli.dispatch import Parser, dispatch
from tldist.errors import ConfigError, DataError


def _parser(exc: BaseException) -> Parser:
    def fail(args):
        raise exc

    parser = Parser(prog="tldist")
    parser.add_subparsers(dest="command", required=True).add_parser("go").set_defaults(func=fail)
    return parser


@pytest.mark.parametrize("rank", ["0", "1"])
def test_an_error_of_every_rank_is_printed_once_and_named_by_every_rank(rank, tmp_path, monkeypatch, capsys):
    """A config mistake (every rank raises it alike) is printed by rank 0 only, but every rank writes it to
    its error file: whichever rank the launcher sees fail first is the summary's "Root Cause", and it must
    name the mistake, not "To enable traceback see: ..."."""
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert dispatch(_parser(ConfigError("config key 'optim.lr' has bad value -1: use a positive LR")), ["go"]) == 2
    err = capsys.readouterr().err
    message = "tldist: error: config key 'optim.lr' has bad value -1: use a positive LR"
    assert err == (message + "\n" if rank == "0" else "")
    assert json.loads(error_file.read_text())["message"] == message


def test_an_error_of_one_rank_names_the_rank(tmp_path, monkeypatch, capsys):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    exc = DataError("shard 'x.tar' is missing")
    exc.same_on_every_rank = False
    assert dispatch(_parser(exc), ["go"]) == 2
    assert capsys.readouterr().err == "tldist: error: [rank 1] shard 'x.tar' is missing\n"
    assert json.loads(error_file.read_text())["message"] == "tldist: error: [rank 1] shard 'x.tar' is missing"


def test_a_rank_stopped_by_a_peers_failure_never_displaces_the_cause(tmp_path, monkeypatch, capsys):
    """A rank whose collective failed because another rank died writes its one line dated one second on, so
    the launcher's "Root Cause" (the smallest timestamp) stays the rank that really failed."""
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    before = int(time.time())
    assert dispatch(_parser(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer")), ["go"]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("tldist: error: [rank 0] stopped because another process of this job failed")
    data = json.loads(error_file.read_text())
    assert data["message"] == line and before + 1 <= data["timestamp"] <= int(time.time()) + 1
    with pytest.raises(ValueError, match="a bug"):  # anything else is a bug: its traceback is kept
        dispatch(_parser(ValueError("a bug")), ["go"])
