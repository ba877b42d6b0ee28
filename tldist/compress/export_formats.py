"""``tldist compress export``: an export directory as TorchScript and/or ONNX files, each verified.

Every file written is loaded back (``torch.jit.load``; ONNX Runtime on CPU for ONNX) and run on the
same inputs as the eager model -- real val images when ``--val`` is given, else seeded random
tensors -- at two batch sizes (the batch dimension is dynamic in both formats). The maximum
absolute logit difference and the top-1 agreement are recorded in ``formats.json``; a file whose
outputs differ beyond ``atol`` is not kept and the command fails.

TorchScript needs nothing beyond torch. ONNX needs the optional packages ``onnx`` and
``onnxruntime``; the exporter is torch's TorchScript-based one (``dynamo=False``), which on this
machine takes about a second against tens of seconds for the ``torch.export`` based one.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from tldist.artifacts.export import atomic_dir, check_out_dir, check_shards, write_json
from tldist.artifacts.layout import MODEL_RECORD
from tldist.artifacts.resolve import load_model
from tldist.compress.measure import file_mb, load_script, log, script_bytes
from tldist.errors import UserError
from tldist.evaluate import record_normalizer, shard_loader
from tldist.world import World, run_on_main, start_world, world_of

FORMATS = ("torchscript", "onnx")
FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}
REPORT = "formats.json"


class ExportMismatch(RuntimeError):
    """An exported file does not reproduce the eager model's outputs."""


def check_inputs(meta: dict[str, Any], val: Optional[str], *, batch_sizes: tuple[int, ...] = (1, 8),
                 num_workers: int = 1) -> list[torch.Tensor]:
    """Normalized inputs, one tensor per batch size: val images (read on this process) or seeded noise."""
    size = int(meta["preprocess"]["image_size"])
    need = sum(batch_sizes)
    if val:
        normalize = record_normalizer(meta, "cpu")  # exported files are checked on the CPU
        images: list[torch.Tensor] = []
        for batch in shard_loader(val, meta, World(), batch_size=need, num_workers=num_workers):
            images.append(batch["image"][batch["mask"]])
            if sum(len(i) for i in images) >= need:
                break
        x = normalize(torch.cat(images)) if images else torch.empty(0)
        if len(x) < need:
            raise UserError(f"val shards '{val}' have {len(x)} readable images, {need} are needed to check the export")
    else:
        x = torch.randn(need, 3, size, size, generator=torch.Generator().manual_seed(0))
    return list(torch.split(x, list(batch_sizes)))


def compare(reference: nn.Module, candidate: Callable[[torch.Tensor], torch.Tensor],
            inputs: list[torch.Tensor]) -> dict[str, Any]:
    """Max |logit difference| and top-1 agreement of ``candidate`` against ``reference`` on ``inputs``."""
    diff, agree, n = 0.0, 0, 0
    with torch.no_grad():
        for x in inputs:
            a, b = reference(x), candidate(x)
            if tuple(b.shape) != tuple(a.shape):
                raise ExportMismatch(f"output shape {tuple(b.shape)} != eager {tuple(a.shape)} for input {tuple(x.shape)}")
            diff = max(diff, float((a - b).abs().max()))
            agree += int((a.argmax(1) == b.argmax(1)).sum())
            n += len(x)
    return {"max_abs_diff": diff, "top1_agreement": round(agree / n, 6), "samples": n,
            "batch_sizes": [len(x) for x in inputs]}


def write_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """Trace ``model`` to ``path``; returns the module loaded back from the file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model.eval(), example, check_trace=False)
    path.write_bytes(script_bytes(traced))
    return load_script(path)


def write_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int = 18) -> Callable[[torch.Tensor], torch.Tensor]:
    """Export ``model`` to ONNX (dynamic batch) at ``path``; returns a runner on ONNX Runtime (CPU)."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as e:
        raise UserError(f"--formats onnx needs the optional packages onnx and onnxruntime ({e.name} is missing): "
                        "pip install onnx onnxruntime, or use --formats torchscript") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])

    return run


def export_formats(export_dir: str, out: str, *, formats: tuple[str, ...] = FORMATS, val: Optional[str] = None,
                   atol: float = 1e-4, num_workers: int = 1, weights: Optional[str] = None) -> dict[str, Any]:
    """Write and verify ``formats`` of an export directory into ``out`` (call on every rank; rank 0 writes).

    Returns the report (also ``out/formats.json``). Raises :class:`ExportMismatch` when a file's
    outputs differ from the eager model's by more than ``atol``. ``export_dir`` is any model path
    (:func:`tldist.artifacts.resolve.load_model`; ``weights``: raw or ema of a checkpoint or run).
    """
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UserError(f"--formats has bad value {','.join(formats)}: choose from {', '.join(FORMATS)}")
    if atol <= 0:
        raise UserError(f"--atol has bad value {atol}: must be > 0")
    check_out_dir(out, {"the export directory": export_dir})
    loaded = load_model(export_dir, weights=weights, flag="MODEL", single_head="tldist compress")
    model, meta = loaded.model, loaded.meta
    if val:
        check_shards(val, meta, export_dir, "val")
    world = world_of(start_world())
    log(world, f"{export_dir}: {loaded.artifact.describe()}")

    def build() -> dict[str, Any]:
        inputs = check_inputs(meta, val, num_workers=num_workers)
        report: dict[str, Any] = {"source": str(Path(export_dir).resolve()), "model": meta["model"],
                                  "inputs": f"val images from {val}" if val else "seeded random normal",
                                  "atol": atol, "formats": {}}
        with atomic_dir(out) as tmp:
            for fmt in formats:
                path = tmp / FILES[fmt]
                writer = write_torchscript if fmt == "torchscript" else write_onnx
                runner = writer(model, inputs[0] if len(inputs[0]) > 1 else torch.cat(inputs)[:2], path)
                check = compare(model, runner, inputs)
                check.update(file=FILES[fmt], size_mb=file_mb(path))
                report["formats"][fmt] = check
                if check["max_abs_diff"] > atol:
                    raise ExportMismatch(f"{fmt} export of '{export_dir}' differs from the eager model by "
                                         f"{check['max_abs_diff']:.3g} > atol {atol} (top-1 agreement "
                                         f"{check['top1_agreement']:.3f}); the file was not kept")
                log(world, f"{fmt}: {FILES[fmt]} {check['size_mb']} MB, max |diff| {check['max_abs_diff']:.2e}, "
                           f"top-1 agreement {check['top1_agreement']:.3f} on {check['samples']} inputs")
            write_json(tmp / MODEL_RECORD, meta)
            write_json(tmp / REPORT, report)
        return report

    return run_on_main(build)
