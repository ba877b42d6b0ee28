"""tldist.compress.quantize: static and dynamic int8 of the ``tiny_export`` fixture (conftest.py)."""

from __future__ import annotations

import torch

from helpers import evaluate_export as _eval

# ---- quantization --------------------------------------------------------------------------------


def test_static_int8_is_smaller_and_close(tiny_export, tiny_shards, tmp_path):
    from tldist.compress.quantize import load_int8, quantize_export
    from helpers import exported as load_exported

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
