"""``tldist export`` (tldist.export): the weights an export holds (raw or EMA) and says it holds."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import ema_checkpoint as _ema_checkpoint


@pytest.mark.parametrize("best_metric, flag, expected", [
    ("eval_ema/top1", None, "ema"), ("eval/top1", None, "raw"), ("eval/top1", "ema", "ema"),
    ("eval_ema/top1", "raw", "raw"),
])
def test_export_writes_the_chosen_weights_and_says_which(tmp_path, best_metric, flag, expected):
    from helpers import checkpoint_weights
    from helpers import exported as load_exported
    from tldist.export import export_model

    ckpt = _ema_checkpoint(tmp_path / "run" / "checkpoints", best_metric)
    out = export_model(tmp_path / "run", tmp_path / "export", weights=flag)  # the run dir: its best checkpoint
    meta = json.loads((out / "model.json").read_text())
    assert meta["weights"] == expected
    source = checkpoint_weights(ckpt, expected)
    other = checkpoint_weights(ckpt, "raw" if expected == "ema" else "ema")
    model, _ = load_exported(out)  # what predict and tldist eval of the export run
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in source.items())
    assert not all(torch.equal(got[k], v) for k, v in other.items())


def test_export_of_ema_weights_a_checkpoint_lacks_is_one_line(tmp_path, capsys):
    from tldist.cli import main

    ckpt = _ema_checkpoint(tmp_path / "run" / "checkpoints", "eval/top1", with_ema=False)
    assert main(["export", str(ckpt), str(tmp_path / "export"), "--weights", "ema"]) == 2
    err = capsys.readouterr().err
    assert "--weights ema" in err and "holds no EMA" in err and err.strip().count("\n") == 0
    assert main(["export", str(ckpt), str(tmp_path / "export")]) == 0  # default: the raw weights
    assert json.loads((tmp_path / "export" / "model.json").read_text())["weights"] == "raw"
