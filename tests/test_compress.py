"""``tldist compress``: pruning, int8 quantization and TorchScript/ONNX export of a real tiny model.

The model is a resnet18 at 16 px trained for a few dozen steps on the ``tiny_shards`` fixture (4
learnable classes) with tldist's own loader and fine-tune loop, then written as an export directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_shard_set
from test_train import accelerate_cmd, run

from tldist.world import World


@pytest.fixture(scope="module")
def tiny_export(tiny_shards, tmp_path_factory):
    """A briefly trained resnet18 (4 classes, 16 px) as an export directory."""
    from tldist.compress import write_export
    from tldist.compress.prune import finetune
    from tldist.config import ModelConfig
    from tldist.models.factory import build_model

    torch.manual_seed(0)
    model, info = build_model(ModelConfig(name="resnet18", pretrained=False), 4, image_size=16)
    meta = {"model": "resnet18", "num_classes": 4, "classes": ["c0", "c1", "c2", "c3"],
            "preprocess": {"image_size": 16, "resize": 18, "mean": list(info.mean), "std": list(info.std),
                           "interpolation": "bilinear"}}
    finetune(model, meta, str(tiny_shards / "train"), steps=60, lr=0.05, batch_size=16, num_workers=1)
    out = tmp_path_factory.mktemp("export") / "tiny"
    write_export(model, meta, out)
    return out


def _eval(model, meta, val):
    from tldist.compress import evaluate

    return evaluate(model, meta, str(val), World(), batch_size=32)


def test_trained_fixture_is_above_chance(tiny_export, tiny_shards):
    from tldist.export import load_exported

    model, meta = load_exported(tiny_export)
    assert _eval(model, meta, tiny_shards / "val")["top1"] > 40.0  # chance is 25%


def test_eval_uses_the_exports_preprocessing(tiny_export, tiny_shards):
    """The images compress scores are those of model.json's ``resize``: resize 16 for 16 px images means
    as they are (crop_pct 1.0), resize 18 means PIL bilinear to 18 and a center crop; every export
    used to get 0.875 whatever model.json said."""
    import io

    import numpy as np
    from PIL import Image

    from test_evaluate import samples_of
    from tldist.compress import shard_batches

    meta = json.loads((tiny_export / "model.json").read_text())
    raw = {k: Image.open(io.BytesIO(d)).convert("RGB") for k, d, _ in samples_of(tiny_shards / "val")}
    for resize in (16, 18, 20):
        meta["preprocess"]["resize"] = resize
        o = (resize - 16) // 2
        seen = 0
        for batch in shard_batches(str(tiny_shards / "val"), meta, World(), batch_size=32, num_workers=0):
            for key, image, ok in zip(batch["key"], batch["image"], batch["mask"].tolist()):
                if not ok:
                    continue
                want = np.asarray(raw[key].resize((resize, resize), Image.BILINEAR).crop((o, o, o + 16, o + 16)))
                assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(want.copy())), (resize, key)
                seen += 1
        assert seen == 101


def test_eval_scores_by_class_name(tiny_export, tiny_shards, tmp_path):
    """A val set written with the classes in another order, or only some of them, scores by name."""
    from test_evaluate import relabelled_copy
    from tldist.export import load_exported

    model, meta = load_exported(tiny_export)
    base = _eval(model, meta, tiny_shards / "val")
    relabelled_copy(tiny_shards / "val", tmp_path / "rev", ["c3", "c2", "c1", "c0"])
    rev = _eval(model, meta, tmp_path / "rev")
    assert rev["top1"] == base["top1"] and rev["loss"] == pytest.approx(base["loss"], abs=1e-5)
    n = relabelled_copy(tiny_shards / "val", tmp_path / "sub", ["c2", "c0"], keep={"c0", "c2"}, shards=1)
    assert _eval(model, meta, tmp_path / "sub")["count"] == n


# ---- pruning -------------------------------------------------------------------------------------

def test_unstructured_prune_reaches_measured_sparsity(tiny_export, tiny_shards, tmp_path):
    from tldist.compress.prune import prune_export
    from tldist.export import load_exported

    out = tmp_path / "pruned"
    r = prune_export(str(tiny_export), str(out), val=str(tiny_shards / "val"), sparsity=0.5)
    assert abs(r["sparsity"] - 0.5) < 1e-4 and r["baseline"]["count"] == r["pruned"]["count"] == 101
    model, meta = load_exported(out)  # an ordinary export directory: plain weights, no masks
    convs = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    zeros = sum(int((m.weight == 0).sum()) for m in convs)
    assert zeros == r["zero_params"]  # the head (fc) is left dense, so all zeros sit in convs
    assert int((model.fc.weight == 0).sum()) == 0
    assert meta["compression"]["method"] == "global-unstructured-l1"
    assert _eval(model, meta, tiny_shards / "val")["top1"] == r["pruned"]["top1"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["size_mb"]["zlib"] < saved["size_mb"]["source_zlib"]  # zeros compress


def test_recovery_finetune_keeps_masks_and_lowers_loss(tiny_export, tiny_shards, tmp_path):
    from tldist.compress.prune import prune_export

    r = prune_export(str(tiny_export), str(tmp_path / "rec"), val=str(tiny_shards / "val"), sparsity=0.9,
                     train=str(tiny_shards / "train"), finetune_steps=30, lr=0.02, batch_size=16)
    assert abs(r["sparsity"] - 0.9) < 1e-4  # measured after recovery: pruned weights stayed zero
    assert r["pruned"]["loss"] > r["baseline"]["loss"]
    assert r["recovered"]["loss"] < r["pruned"]["loss"]
    assert r["top1_delta"] == round(r["recovered"]["top1"] - r["baseline"]["top1"], 4)


# ---- quantization --------------------------------------------------------------------------------

def test_static_int8_is_smaller_and_close(tiny_export, tiny_shards, tmp_path):
    from tldist.compress.quantize import load_int8, quantize_export
    from tldist.export import load_exported

    out = tmp_path / "int8"
    r = quantize_export(str(tiny_export), str(out), val=str(tiny_shards / "val"), calib=str(tiny_shards / "train"),
                        calib_batches=4, latency_runs=2)
    assert r["int8"]["count"] == r["fp32"]["count"] == 101
    assert r["size_ratio"] < 0.35  # int8 weights: about a quarter of fp32
    assert set(r["latency"]["ms"]) == {"fp32", "fp32_torchscript", "int8"} and "b32" in r["latency"]["ms"]["int8"]
    qmodel, meta = load_int8(out)
    assert meta["format"] == "torchscript-int8" and meta["classes"] == ["c0", "c1", "c2", "c3"]
    assert "quantized" in str(qmodel.graph)  # real int8 kernels, not a float copy
    fp32, _ = load_exported(tiny_export)
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        a, b = fp32(x), qmodel(x)
    assert not torch.equal(a, b) and (a - b).abs().max() < 0.25 * a.abs().max()
    assert _eval(qmodel, meta, tiny_shards / "val")["top1"] == r["int8"]["top1"]
    assert abs(r["top1_delta"]) <= 15.0


def test_dynamic_int8_quantizes_the_head_only(tiny_export, tiny_shards, tmp_path):
    from tldist.compress.quantize import load_int8, quantize_export

    r = quantize_export(str(tiny_export), str(tmp_path / "dyn"), val=str(tiny_shards / "val"), method="dynamic",
                        latency_runs=2)
    assert r["method"] == "dynamic" and r["calib_batches"] == 0
    qmodel, _ = load_int8(tmp_path / "dyn")
    assert "quantized::linear_dynamic" in str(qmodel.graph) and "quantized::conv2d" not in str(qmodel.graph)


# ---- export formats ------------------------------------------------------------------------------

def test_torchscript_and_onnx_match_eager(tiny_export, tiny_shards, tmp_path):
    from tldist.compress.export_formats import export_formats

    formats = ("torchscript", "onnx") if _has_onnx() else ("torchscript",)
    out = tmp_path / "formats"
    r = export_formats(str(tiny_export), str(out), formats=formats, val=str(tiny_shards / "val"))
    for fmt in formats:
        c = r["formats"][fmt]
        assert (out / c["file"]).is_file() and c["max_abs_diff"] <= 1e-4 and c["top1_agreement"] == 1.0
        assert c["batch_sizes"] == [1, 8]
    from tldist.compress import load_script

    ts = load_script(out / "model.ts")
    x = torch.randn(3, 3, 16, 16)
    from tldist.export import load_exported

    model, _ = load_exported(tiny_export)
    with torch.no_grad():
        torch.testing.assert_close(ts(x), model(x), atol=1e-5, rtol=1e-4)


def test_export_mismatch_is_caught(tiny_export, tmp_path, monkeypatch):
    """A file whose outputs differ from eager must fail the command and not be kept."""
    from tldist.compress import export_formats as ef

    real = ef.write_torchscript

    def skewed(model, example, path):
        runner = real(model, example, path)
        return lambda x: runner(x) + 1e-2

    monkeypatch.setattr(ef, "write_torchscript", skewed)
    with pytest.raises(ef.ExportMismatch, match="differs from the eager model"):
        ef.export_formats(str(tiny_export), str(tmp_path / "bad"), formats=("torchscript",))
    assert not (tmp_path / "bad").exists()


def _has_onnx() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


# ---- two processes -------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_processes_match_one(tiny_export, tiny_shards, tmp_path):
    """accelerate launch, 2 CPU ranks: same accuracy as one process, one writer, ranks agree after recovery."""
    from tldist.compress.prune import prune_export
    from tldist.compress.quantize import quantize_export

    val, train = str(tiny_shards / "val"), str(tiny_shards / "train")
    one = prune_export(str(tiny_export), str(tmp_path / "p1"), val=val, sparsity=0.5)
    proc = run(accelerate_cmd("cpu.yaml", "compress", "prune", str(tiny_export), "--out", str(tmp_path / "p2"),
                              "--val", val, "--sparsity", "0.5", "--train", train, "--finetune-steps", "4",
                              "--batch-size", "8"), timeout=300)
    two = json.loads((tmp_path / "p2" / "report.json").read_text())
    assert two["world_size"] == 2 and two["finetune"]["ranks_agree"] is True
    assert two["baseline"] == one["baseline"] and two["pruned"] == one["pruned"]  # exact across ranks
    assert two["recovered"]["count"] == 101
    # rank 0 alone prints and writes
    assert proc.stdout.count("[compress] wrote") == 1 and proc.stdout.count("global-unstructured-l1: sparsity") == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no stray temporary dirs

    q1 = quantize_export(str(tiny_export), str(tmp_path / "q1"), val=val, method="dynamic", latency_runs=1)
    run(accelerate_cmd("cpu.yaml", "compress", "quantize", str(tiny_export), "--out", str(tmp_path / "q2"),
                       "--val", val, "--calib", train, "--method", "dynamic", "--latency-runs", "1"), timeout=300)
    q2 = json.loads((tmp_path / "q2" / "report.json").read_text())
    assert q2["world_size"] == 2 and q2["fp32"] == q1["fp32"]
    # dynamic int8 scales each activation tensor by its own range, i.e. per batch: another split of
    # the val batches over ranks changes the scales, so the loss may move in its last digits
    assert {k: v for k, v in q2["int8"].items() if k != "loss"} == {k: v for k, v in q1["int8"].items() if k != "loss"}
    assert q2["int8"]["loss"] == pytest.approx(q1["int8"]["loss"], rel=0.02)


# ---- bad input: one clear line, exit status 2 ----------------------------------------------------

def _cli(capsys, *args: str) -> tuple[int, str]:
    from tldist.cli import main

    code = main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


def test_missing_export_path(capsys, tiny_shards, tmp_path):
    code, err = _cli(capsys, "compress", "prune", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                     "--val", str(tiny_shards / "val"), "--sparsity", "0.5")
    assert code == 2 and len(err.splitlines()) == 1
    assert f"export directory '{tmp_path / 'nope'}' does not exist" in err


def test_checkpoint_instead_of_export(capsys, tiny_shards, tmp_path):
    ckpt = tmp_path / "step_00000010"
    ckpt.mkdir()
    (ckpt / "trainer.json").write_text("{}")
    code, err = _cli(capsys, "compress", "quantize", str(ckpt), "--out", str(tmp_path / "o"),
                     "--val", str(tiny_shards / "val"), "--calib", str(tiny_shards / "train"))
    assert code == 2 and len(err.splitlines()) == 1 and "run 'tldist export" in err


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
