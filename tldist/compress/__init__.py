"""``tldist compress``: make an exported model smaller or faster for deployment, and measure the cost.

Three jobs, each reading an export directory written by ``tldist export`` (``model.safetensors`` +
``model.json``):

* :mod:`tldist.compress.prune` -- global unstructured magnitude pruning or structured (L1/L2)
  channel pruning, optional short recovery fine-tune; writes a new export directory.
* :mod:`tldist.compress.quantize` -- int8 post-training static quantization calibrated on shards
  (FX graph mode, x86 backend), Linear-only dynamic quantization as the fallback; writes an int8
  TorchScript file and reports size, CPU latency and top-1 against the fp32 model.
* :mod:`tldist.compress.export_formats` -- ONNX and TorchScript files, each checked against the
  eager model on the same inputs.

This module holds what they share: loading an export directory with clear errors, the exact
multi-rank evaluation (every rank scores its part of the val split, counts are summed), sharing
rank 0's results with the other ranks, atomic writing, file sizes and side-by-side CPU latency.
Accuracy is always measured with :func:`evaluate`, so ``accelerate launch -m tldist.cli compress ...``
on N processes gives the same numbers as one process; files are written by rank 0 only.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from tldist.errors import DataError, UserError
from tldist.safeload import read_json
from tldist.export import write_export  # noqa: F401  (re-exported for the subcommands)
from tldist.world import World

INT8_FILE = "model_int8.pt"
"""TorchScript file of a quantized model inside a ``tldist compress quantize`` output directory."""
REPORT_FILE = "report.json"


def log(world: World, message: str) -> None:
    """Print a progress line on rank 0 only."""
    if world.is_main:
        print(f"[compress] {message}", flush=True)


# ---------------------------------------------------------------------------------------
# Export directories
# ---------------------------------------------------------------------------------------

def read_export_meta(path: str | os.PathLike) -> dict[str, Any]:
    """``model.json`` of an fp32 export directory, raising :class:`UserError` for anything else."""
    p = Path(path)
    hint = "give a directory written by 'tldist export CHECKPOINT OUT'"
    if not p.exists():
        raise UserError(f"export directory '{p}' does not exist: {hint}")
    if p.is_file():
        if p.name in ("model.json", "model.safetensors"):
            raise UserError(f"'{p}' is a file: pass its directory '{p.parent}' instead")
        raise UserError(f"'{p}' is a file, not an export directory: {hint}")
    if (p / "trainer.json").is_file() or (p / "checkpoints").is_dir():
        raise UserError(f"'{p}' is a training checkpoint/run, not an export directory: "
                        f"run 'tldist export {p} EXPORT_DIR' first and compress EXPORT_DIR")
    meta_file = p / "model.json"
    if not meta_file.is_file():
        raise UserError(f"'{p}' is not a tldist export directory (no model.json): {hint}")
    meta = read_json(meta_file, what="export metadata")
    if meta.get("format") == "torchscript-int8" or (p / INT8_FILE).is_file():
        raise UserError(f"'{p}' holds an int8 model from 'tldist compress quantize': compress the fp32 export "
                        "directory it was made from instead")
    for key in ("model", "num_classes", "preprocess"):
        if key not in meta:
            raise UserError(f"'{meta_file}' lacks the key '{key}': re-create the export with 'tldist export'")
    for key in ("image_size", "mean", "std"):
        if key not in meta["preprocess"]:
            raise UserError(f"'{meta_file}' lacks the key 'preprocess.{key}': re-create the export with 'tldist export'")
    if not (p / "model.safetensors").is_file():
        raise UserError(f"export directory '{p}' has no model.safetensors: re-create it with 'tldist export'")
    from tldist.export import refuse_multitask

    refuse_multitask(meta, f"export directory '{p}'", "tldist compress")
    return meta


def load_export(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any], list[str]]:
    """Rebuild an exported model on CPU in eval mode: ``(model, meta, head parameter prefixes)``."""
    from tldist.config import ModelConfig
    from tldist.models.factory import build_model

    meta = read_export_meta(path)
    model, info = build_model(ModelConfig(name=meta["model"], pretrained=True, checkpoint=str(path)),
                              int(meta["num_classes"]), image_size=int(meta["preprocess"]["image_size"]), require_head=True)
    return model.eval(), meta, list(info.head)


def model_classes(meta: dict[str, Any]) -> list[str]:
    """Class names of an exported model (``"0".."N-1"`` when the export recorded none)."""
    return list(meta.get("classes") or [str(i) for i in range(int(meta["num_classes"]))])


def check_shards(location: str, meta: dict[str, Any], model_dir: str, role: str, *, same_order: bool = False) -> None:
    """Raise :class:`DataError` unless the shard set's classes fit the model.

    Val sets may hold a subset of the model's classes (labels are remapped by name); with
    ``same_order`` (training) the set's classes must be the model's, in the same order.
    """
    from tldist.data.manifest import load_manifest

    classes = load_manifest(location).classes
    mine = model_classes(meta)
    if not meta.get("classes"):  # no names recorded: only the count can be compared
        ok = len(classes) == len(mine)
    elif same_order:
        ok = list(classes) == mine[:len(classes)]
    else:
        ok = all(c in mine for c in classes)
    if not ok:
        raise DataError(
            f"{role} shards '{location}' have {len(classes)} classes ({_short(classes)}) but the model in "
            f"'{model_dir}' was exported with {len(mine)} ({_short(mine)}): use shards of the dataset the model "
            "was trained on")


def _short(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (temporary file + ``os.replace``)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, p)


def file_mb(path: str | os.PathLike) -> float:
    return round(Path(path).stat().st_size / 1e6, 3)


def compressed_mb(path: str | os.PathLike) -> float:
    """Size after zlib (level 6): what zeroed (pruned) weights save once the file is compressed."""
    return round(len(zlib.compress(Path(path).read_bytes(), 6)) / 1e6, 3)


# ---------------------------------------------------------------------------------------
# Distribution: one process or many under accelerate launch
# ---------------------------------------------------------------------------------------

def start_world() -> tuple[World, torch.device]:
    """Join the job's process group (a no-op for one process): ``(world, device)`` of this rank."""
    from tldist.config import TrainConfig
    from tldist.train.distributed import build_accelerator, world_of

    accelerator = build_accelerator(TrainConfig())
    return world_of(accelerator), accelerator.device


def _dist_on() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def from_rank0(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and return its (picklable) result on every rank (call on every rank).

    An exception on rank 0 is raised there and re-raised on the other ranks (as :class:`UserError`
    when it was one, else ``RuntimeError``), so no rank is left waiting in a collective.
    """
    import torch.distributed as dist

    if not _dist_on():
        return fn()
    box: list[Any] = [None]
    error: Optional[BaseException] = None
    if dist.get_rank() == 0:
        try:
            box = [("ok", fn())]
        except Exception as e:  # noqa: BLE001 - forwarded to the other ranks, re-raised below
            error = e
            box = [("user" if isinstance(e, UserError) else "error", str(e))]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    status, value = box[0]
    if status == "user":
        raise UserError(f"(on rank 0) {value}")
    if status == "error":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def sync_state(model: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (pruning masks included)."""
    import torch.distributed as dist

    if not _dist_on():
        return
    box = [{k: v.detach().cpu() for k, v in model.state_dict().items()} if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    if dist.get_rank() != 0:
        model.load_state_dict(box[0])


def barrier() -> None:
    import torch.distributed as dist

    if _dist_on():
        dist.barrier()


# ---------------------------------------------------------------------------------------
# Exact evaluation across ranks
# ---------------------------------------------------------------------------------------

def eval_inputs(meta: dict[str, Any], device: torch.device | str):
    """The ``Normalizer`` of an exported model's preprocessing, producing batches on ``device``."""
    from tldist.data.transforms import Normalizer

    pre = meta["preprocess"]
    return Normalizer(pre["mean"], pre["std"], device=device)


def shard_batches(location: str, meta: dict[str, Any], world: World, *, batch_size: int, num_workers: int):
    """Eval-transformed batches of ``location`` for this rank (see ``build_eval_loader``)."""
    from tldist.config import DataConfig
    from tldist.data.pipeline import build_eval_loader
    from tldist.data.transforms import preprocess_crop_pct

    pre = meta["preprocess"]
    cfg = DataConfig(val=location, batch_size=batch_size, eval_batch_size=batch_size, num_workers=num_workers,
                     pin_memory=False)
    classes = meta.get("classes") or None
    return build_eval_loader(cfg, world, image_size=int(pre["image_size"]),
                             interpolation=pre.get("interpolation", "bilinear"), crop_pct=preprocess_crop_pct(pre),
                             classes=classes)


@torch.no_grad()
def evaluate(model: Callable[[torch.Tensor], torch.Tensor], meta: dict[str, Any], val: str, world: World, *,
             device: torch.device | str = "cpu", model_device: torch.device | str | None = None,
             batch_size: int = 64, num_workers: int = 1) -> dict[str, Any]:
    """Top-1/top-5/loss of ``model`` on ``val`` (call on every rank; equals a 1-process evaluation).

    ``model_device`` is where the model runs (int8 models: CPU); counts live on ``device``.
    """
    from tldist.train.metrics import EvalAccumulator

    model_device = torch.device(model_device or device)
    normalize = eval_inputs(meta, model_device)
    acc = EvalAccumulator(int(meta["num_classes"]), device)
    for batch in shard_batches(val, meta, world, batch_size=batch_size, num_workers=num_workers):
        logits = model(normalize(batch["image"].to(model_device)))
        acc.update(logits.to(device), batch["label"].to(device), batch["mask"].to(device))
    m = acc.compute()
    return {"top1": round(m["top1"], 4), "top5": round(m["top5"], 4), "loss": round(m["loss"], 6), "count": m["count"]}


# ---------------------------------------------------------------------------------------
# CPU latency, measured side by side
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def measure_latency(models: dict[str, Callable[[torch.Tensor], Any]], image_size: int, *,
                    batch_sizes: tuple[int, ...] = (1, 32), runs: int = 20, warmup: int = 3,
                    threads: int = 0) -> dict[str, Any]:
    """Median CPU forward time (ms) per model and batch size, runs interleaved across models.

    Interleaving (A, B, C, A, B, C...) with the same input and thread count keeps load changes on a
    shared machine from favouring one model. ``threads`` 0 keeps torch's current setting.
    """
    old = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    result: dict[str, Any] = {name: {} for name in models}
    try:
        gen = torch.Generator().manual_seed(0)
        for bs in batch_sizes:
            x = torch.randn(bs, 3, image_size, image_size, generator=gen)
            times: dict[str, list[float]] = {name: [] for name in models}
            for _ in range(warmup):
                for fn in models.values():
                    fn(x)
            for _ in range(runs):
                for name, fn in models.items():
                    t0 = time.perf_counter()
                    fn(x)
                    times[name].append((time.perf_counter() - t0) * 1e3)
            for name in models:
                result[name][f"b{bs}"] = round(statistics.median(times[name]), 3)
    finally:
        torch.set_num_threads(old)
    return {"ms": result, "runs": runs, "threads": threads or old, "batch_sizes": list(batch_sizes)}


def script_bytes(module: torch.jit.ScriptModule, extra: Optional[dict[str, str]] = None) -> bytes:
    """Serialize a TorchScript module (with ``_extra_files``) to bytes, quietly."""
    import warnings

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.* is deprecated in favour of torch.export
        torch.jit.save(module, buf, _extra_files=extra or {})
    return buf.getvalue()


def load_script(data: bytes | str | os.PathLike) -> torch.jit.ScriptModule:
    """Load a TorchScript module from bytes or a file on CPU, quietly.

    Only for TorchScript that tldist has just written itself (``compress export`` re-loads its
    ``model.ts`` to verify it, ``compress quantize`` its serialized bytes): TorchScript is a program
    whose graph runs when called, so user-supplied files must not come here (see
    :func:`tldist.compress.quantize.load_int8` for the one user-facing loader, which checks the format).
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        src = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else str(data)
        return torch.jit.load(src, map_location="cpu").eval()
