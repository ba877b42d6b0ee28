"""tldist.compress.export_formats: TorchScript and ONNX files of the ``tiny_export`` fixture compute
what the eager model computes, or the command fails."""

from __future__ import annotations

import pytest
import torch

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
    from tldist.compress.measure import load_script

    ts = load_script(out / "model.ts")
    x = torch.randn(3, 3, 16, 16)
    from helpers import exported as load_exported

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
