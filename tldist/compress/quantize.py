"""``tldist compress quantize``: int8 post-training quantization, measured against the fp32 model.

Two methods, both from ``torch.ao.quantization`` as shipped with torch 2.x (deprecated upstream in
favour of torchao's PT2E flow; torch's own copy of PT2E, ``torch.ao.quantization.quantize_pt2e``, is
gone from torch 2.14). torchao 0.18.0's PT2E flow was checked with torch 2.14.1 and is not used
(``bench/int8_paths.py --part pt2e``, BENCHMARKS.md "Deployment"): ``X86InductorQuantizer`` fails on
torchvision ResNets ("Input partition has more than one output node": torch 2.14's export no longer
records ``source_fn_stack`` and a block's shared ``self.relu`` becomes one multi-output partition);
with the partitions repaired it quantizes, but the converted program is slower than fp32 on this
CPU both eager and under ``torch.compile``, and its ``.pt2`` file is larger than the fp32 weights.
FX static int8 stays the default: it is the one path that is 3-4x faster and 4x smaller here.

* **static** (default) -- FX graph mode, x86 backend (``get_default_qconfig_mapping("x86")``):
  conv/linear weights int8 per channel, activations uint8 with ranges observed on calibration
  batches from shards (eval transforms, no augmentation). Conv+BN(+ReLU) are fused first.
* **dynamic** -- ``quantize_dynamic`` on the Linear layers only (weights int8, activations
  quantized on the fly); convolutions stay fp32. No calibration data needed. This is the method for
  Linear-heavy models (ViT attention projections, MLPs and heads; see BENCHMARKS.md "Deployment").

The int8 model is traced to TorchScript (``model_int8.pt``, with ``model.json`` embedded) because a
quantized model cannot be stored as a safetensors state dict and rebuilt from the architecture
name. Calibration runs on rank 0; every rank loads the same TorchScript bytes, so the int8
top-1 on the val shards is exact across ranks like the fp32 one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from tldist.artifacts.layout import MODEL_RECORD
from tldist.artifacts.export import INT8_FILE, atomic_dir, check_out_dir, check_shards, write_json
from tldist.artifacts.resolve import load_model, weights_bytes
from tldist.compress.measure import REPORT_FILE, file_mb, load_script, log, measure_latency, script_bytes
from tldist.errors import UserError
from tldist.evaluate import evaluate_shards, record_normalizer, shard_loader
from tldist.world import World, run_on_main, start_world, world_of

METHODS = ("static", "dynamic")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch.ao / torch.jit deprecation chatter (the report names the API used)."""
    with warnings.catch_warnings():
        for cat in (DeprecationWarning, FutureWarning, UserWarning, torch.jit.TracerWarning):
            warnings.simplefilter("ignore", cat)
        yield


def calibration_batches(location: str, meta: dict[str, Any], *, batches: int, batch_size: int,
                        num_workers: int) -> list[torch.Tensor]:
    """Up to ``batches`` normalized image batches from the shard set ``location`` (this process reads all shards)."""
    normalize = record_normalizer(meta, "cpu")  # int8 calibration runs on the CPU
    out: list[torch.Tensor] = []
    for batch in shard_loader(location, meta, World(), batch_size=batch_size, num_workers=num_workers):
        images = batch["image"][batch["mask"]]
        if images.numel():
            out.append(normalize(images))
        if len(out) >= batches:
            break
    if not out:
        raise UserError(f"calibration shards '{location}' gave no readable images: check the shard set")
    return out


@torch.no_grad()
def apply_static(model: nn.Module, calib: list[torch.Tensor], backend: str = "x86") -> nn.Module:
    """FX graph mode static int8 quantization of a copy of ``model``, calibrated on ``calib``."""
    try:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    except ImportError as e:  # a torch without the FX flow: torchao's PT2E is the replacement
        raise UserError(f"this torch ({torch.__version__}) has no torch.ao FX quantization ({e}): use "
                        "--method dynamic, or an older torch") from None
    if backend not in torch.backends.quantized.supported_engines:
        raise UserError(f"quantized backend '{backend}' is not available in this torch build "
                        f"(supported: {torch.backends.quantized.supported_engines})")
    torch.backends.quantized.engine = backend
    with _quiet():
        try:
            prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping(backend), (calib[0],))
        except Exception as e:  # noqa: BLE001 - symbolic tracing fails on data-dependent control flow
            raise UserError(f"FX graph mode cannot trace this model ({type(e).__name__}: {str(e)[:160]}): "
                            "use --method dynamic") from None
        for x in calib:
            prepared(x)
        return convert_fx(prepared).eval()


def apply_dynamic(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantization of the Linear layers of a copy of ``model``."""
    from torch.ao.quantization import quantize_dynamic

    with _quiet():
        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


@torch.no_grad()
def to_torchscript(model: nn.Module, example: torch.Tensor, *, freeze: bool = True) -> torch.jit.ScriptModule:
    """Trace (and freeze) ``model`` on ``example``; the batch size stays free."""
    with _quiet():
        traced = torch.jit.trace(model.eval(), example, check_trace=False)
        return torch.jit.freeze(traced) if freeze else traced


def load_int8(path: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Load a ``tldist compress quantize`` output (directory or ``model_int8.pt``): ``(module, meta)``.

    ``model_int8.pt`` is TorchScript, i.e. a program: ``torch.jit.load`` unpickles nothing with Python
    globals, but the graph runs whatever TorchScript ops it holds when called. So only a TorchScript
    archive that carries the ``model.json`` (format ``torchscript-int8``) this command embeds reaches
    ``torch.jit.load``; anything else (a ``torch.save`` pickle, a truncated file) is refused with a
    one-line :class:`UserError` before it is parsed. The check proves the format, not the author: load
    only directories you wrote. ``meta`` is that embedded ``model.json``.
    """
    p = Path(path)
    f = p / INT8_FILE if p.is_dir() else p
    if not f.is_file():
        raise UserError(f"'{path}' holds no {INT8_FILE}: give a directory written by 'tldist compress quantize'")
    meta = _int8_archive_meta(f)
    with _quiet():
        try:
            module = torch.jit.load(str(f), map_location="cpu").eval()
        except RuntimeError as e:
            first = " ".join(str(e).split())[:200]
            raise UserError(f"'{f}' could not be loaded as TorchScript ({first}): re-create it with "
                            "'tldist compress quantize'") from None
    return module, meta


def _int8_archive_meta(f: Path) -> dict[str, Any]:
    """The ``model.json`` embedded in a TorchScript archive written by :func:`write_int8_dir`, read with
    :mod:`zipfile` (no unpickling); :class:`UserError` if ``f`` is not such an archive."""
    import zipfile

    bad = (f"'{f}' is not a TorchScript archive written by 'tldist compress quantize' ({{}}); tldist loads "
           "TorchScript only from its own outputs: re-create it with 'tldist compress quantize'")
    try:
        with zipfile.ZipFile(f) as zf:
            names = zf.namelist()
            found = [n for n in names if n.count("/") == 2 and n.endswith("/extra/model.json")]
            if len(found) != 1 or not any("/code/" in n for n in names):
                raise UserError(bad.format("no TorchScript code with an embedded model.json"))
            meta = json.loads(zf.read(found[0]))
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(bad.format(f"{type(e).__name__}")) from None
    if not isinstance(meta, dict) or meta.get("format") != "torchscript-int8":
        raise UserError(bad.format("its model.json is not format torchscript-int8"))
    return meta


def quantize_export(export_dir: str, out: str, *, val: str, calib: Optional[str] = None, method: str = "static",
                    calib_batches: int = 8, batch_size: int = 32, num_workers: int = 1, latency_runs: int = 20,
                    threads: int = 1, backend: str = "x86", weights: Optional[str] = None) -> dict[str, Any]:
    """Quantize an export directory into ``out`` (call on every rank); returns the report (also ``out/report.json``).

    fp32 and int8 top-1 on ``val`` are exact across ranks; latency (rank 0, ``threads`` CPU
    threads, batch 1 and 32, runs interleaved) compares fp32 eager, fp32 TorchScript and int8.
    ``export_dir`` is any model path (:func:`tldist.artifacts.resolve.load_model`; ``weights``: raw or
    ema of a checkpoint or run).
    """
    if method not in METHODS:
        raise UserError(f"--method has bad value '{method}': choose one of {', '.join(METHODS)}")
    if calib_batches <= 0:
        raise UserError(f"--calib-batches has bad value {calib_batches}: must be > 0")
    if method == "static" and not calib:
        raise UserError("--method static needs --calib SHARDS: a shard set (e.g. the train split) to observe "
                        "activation ranges on")
    check_out_dir(out, {"the export directory": export_dir})
    loaded = load_model(export_dir, weights=weights, flag="MODEL", single_head="tldist compress")
    model, meta = loaded.model, loaded.meta
    check_shards(val, meta, export_dir, "val")
    if calib:
        check_shards(calib, meta, export_dir, "calibration")
    world = world_of(start_world())
    log(world, f"{export_dir}: {loaded.artifact.describe()}")
    size = int(meta["preprocess"]["image_size"])

    def build() -> bytes:
        torch.manual_seed(0)
        if method == "static":
            batches = calibration_batches(calib, meta, batches=calib_batches, batch_size=batch_size,
                                          num_workers=num_workers)
            log(world, f"calibrating on {sum(len(b) for b in batches)} images from {calib}")
            qmodel = apply_static(model, batches, backend)
        else:
            qmodel = apply_dynamic(model)
        example = torch.randn(2, 3, size, size)
        ts = to_torchscript(qmodel, example)
        return script_bytes(ts, {MODEL_RECORD: json.dumps(int8_meta(meta, method, export_dir))})

    data = run_on_main(build)  # rank 0 quantizes; every rank gets the same bytes
    qmodel = load_script(data)
    log(world, f"{method} int8 model built ({len(data) / 1e6:.2f} MB TorchScript); evaluating fp32 and int8 on {val}")
    fp32 = evaluate_shards(model, meta, val, world, device="cpu", batch_size=2 * batch_size, num_workers=num_workers)
    int8 = evaluate_shards(qmodel, meta, val, world, device="cpu", batch_size=2 * batch_size, num_workers=num_workers)
    log(world, f"top-1 fp32 {fp32['top1']:.2f}%  int8 {int8['top1']:.2f}%  ({fp32['count']} samples)")
    report: dict[str, Any] = {
        "command": "quantize", "source": str(Path(export_dir).resolve()), "model": meta["model"], "val": val,
        "calib": calib, "method": method, "backend": backend if method == "static" else "dynamic",
        "api": "torch.ao.quantization.quantize_fx" if method == "static" else "torch.ao.quantization.quantize_dynamic",
        "calib_batches": calib_batches if method == "static" else 0, "fp32": fp32, "int8": int8,
        "top1_delta": round(int8["top1"] - fp32["top1"], 4), "world_size": world.world_size,
    }
    if world.is_main:
        fp32_ts = to_torchscript(model, torch.randn(2, 3, size, size))
        lat = measure_latency({"fp32": model, "fp32_torchscript": fp32_ts, "int8": qmodel}, size,
                              runs=latency_runs, threads=threads)
        ms = lat["ms"]
        lat["int8_vs_fp32"] = {b: round(ms["int8"][b] / ms["fp32"][b], 3) for b in ms["fp32"]}
        lat["int8_vs_fp32_torchscript"] = {b: round(ms["int8"][b] / ms["fp32_torchscript"][b], 3) for b in ms["fp32"]}
        fp32_ts_bytes = script_bytes(fp32_ts)
        report["size_mb"] = {"fp32_safetensors": file_mb(weights_bytes(loaded.artifact)),
                             "fp32_torchscript": round(len(fp32_ts_bytes) / 1e6, 3),
                             "int8_torchscript": round(len(data) / 1e6, 3)}
        report["size_ratio"] = round(len(data) / len(fp32_ts_bytes), 4)
        report["latency"] = lat
        write_int8_dir(out, data, int8_meta(meta, method, export_dir), report)
        log(world, f"size {report['size_mb']['fp32_torchscript']} -> {report['size_mb']['int8_torchscript']} MB; "
                   f"latency int8/fp32 b1 {lat['int8_vs_fp32']['b1']}, b32 {lat['int8_vs_fp32']['b32']}; wrote {out}")
    return report


def int8_meta(meta: dict[str, Any], method: str, export_dir: str) -> dict[str, Any]:
    """``model.json`` of an int8 directory: the fp32 meta plus how it was made."""
    return {**meta, "format": "torchscript-int8", "file": INT8_FILE, "quantization": method,
            "source_export": str(Path(export_dir).resolve())}


def write_int8_dir(out: str | Path, data: bytes, meta: dict[str, Any], report: dict[str, Any]) -> Path:
    """Write ``model_int8.pt`` + ``model.json`` + ``report.json`` atomically (main process only)."""
    with atomic_dir(out) as tmp:
        (tmp / INT8_FILE).write_bytes(data)
        write_json(tmp / MODEL_RECORD, meta)
        write_json(tmp / REPORT_FILE, report)
    return Path(out)
