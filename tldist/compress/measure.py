"""What compression costs and buys: file sizes, side-by-side CPU latency, TorchScript bytes, and the
progress lines of the ``tldist compress`` jobs (rank 0 only)."""

from __future__ import annotations

import io
import os
import statistics
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from tldist.world import World

REPORT_FILE = "report.json"
"""The report every ``tldist compress`` job writes into its output directory."""


def log(world: World, message: str) -> None:
    """Print a progress line on rank 0 only."""
    if world.is_main:
        print(f"[compress] {message}", flush=True)


def file_mb(path: str | os.PathLike | bytes) -> float:
    """Size in MB (10^6 bytes) of a file, or of ``bytes``."""
    return round((len(path) if isinstance(path, bytes) else Path(path).stat().st_size) / 1e6, 3)


def compressed_mb(path: str | os.PathLike | bytes) -> float:
    """Size after zlib (level 6) of a file or ``bytes``: what zeroed (pruned) weights save once compressed."""
    data = path if isinstance(path, bytes) else Path(path).read_bytes()
    return round(len(zlib.compress(data, 6)) / 1e6, 3)


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
