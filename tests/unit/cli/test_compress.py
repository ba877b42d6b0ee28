"""``tldist compress`` bad input, in-process: one clear line, exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import make_shard_set, tldist_main as _cli


def test_missing_export_path(capsys, tiny_shards, tmp_path):
    code, err = _cli(capsys, "compress", "prune", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                     "--val", str(tiny_shards / "val"), "--sparsity", "0.5")
    assert code == 2 and len(err.splitlines()) == 1
    assert f"MODEL '{tmp_path / 'nope'}' does not exist" in err


def test_checkpoint_instead_of_export(capsys, tiny_shards, tmp_path):
    ckpt = tmp_path / "step_00000010"
    ckpt.mkdir()
    (ckpt / "trainer.json").write_text("{}")
    code, err = _cli(capsys, "compress", "quantize", str(ckpt), "--out", str(tmp_path / "o"),
                     "--val", str(tiny_shards / "val"), "--calib", str(tiny_shards / "train"))
    assert code == 2 and len(err.splitlines()) == 1 and "names no model architecture" in err


def test_wrong_class_count(capsys, tiny_export, tmp_path):
    make_shard_set(tmp_path / "six", split="val", n=24, shards=1, num_classes=6)
    code, err = _cli(capsys, "compress", "prune", str(tiny_export), "--out", str(tmp_path / "o"),
                     "--val", str(tmp_path / "six"), "--sparsity", "0.5")
    assert code == 2 and len(err.splitlines()) == 1
    assert "have 6 classes" in err and "exported with 4" in err


def test_int8_dir_is_not_an_export(capsys, tiny_export, tiny_shards, tmp_path):
    from tldist.compress.quantize import quantize_export

    quantize_export(str(tiny_export), str(tmp_path / "q"), val=str(tiny_shards / "val"), method="dynamic",
                    latency_runs=1)
    code, err = _cli(capsys, "compress", "export", str(tmp_path / "q"), "--out", str(tmp_path / "o"))
    assert code == 2 and "holds an int8 model" in err


@pytest.mark.parametrize("args,message", [
    (["prune", "--sparsity", "1.5"], "--sparsity has bad value 1.5"),
    (["prune", "--sparsity", "0.5", "--finetune-steps", "5"], "--finetune-steps needs --train"),
    (["prune", "--structured", "--sparsity", "0"], "--sparsity has bad value 0.0: with --structured"),
    (["prune", "--structured", "--ratio", "1.0"], "--sparsity has bad value 1.0: with --structured"),
    (["prune", "--structured", "--sparsity", "0.5", "--norm", "3"], "--norm has bad value 3"),
    (["prune", "--structured", "--sparsity", "0.5", "--distill"], "--distill needs --finetune-steps"),
    (["quantize", "--method", "int4"], "--method has bad value 'int4'"),
    (["quantize"], "--method static needs --calib"),
    (["export", "--formats", "tflite"], "--formats has bad value tflite"),
])
def test_bad_options(capsys, tiny_export, tiny_shards, tmp_path, args, message):
    code, err = _cli(capsys, "compress", args[0], str(tiny_export), "--out", str(tmp_path / "o"),
                     *(["--val", str(tiny_shards / "val")] if args[0] != "export" else []), *args[1:])
    assert code == 2 and len(err.splitlines()) == 1 and message in err


def test_out_over_source_is_refused(capsys, tiny_export, tiny_shards):
    code, err = _cli(capsys, "compress", "prune", str(tiny_export), "--out", str(tiny_export),
                     "--val", str(tiny_shards / "val"), "--sparsity", "0.5")
    assert code == 2 and "would overwrite" in err and Path(tiny_export, "model.safetensors").is_file()
