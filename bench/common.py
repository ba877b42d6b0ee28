"""Helpers shared by the benchmark scripts: machine facts, robust summaries, plain-text tables.

Every benchmark reports *ratios taken side by side in one run* (variants interleaved, repeated),
because the 2-core machines these run on are shared and absolute numbers drift with the load.
"""

from __future__ import annotations

import datetime
import os
import platform
import socket
import statistics
import sys
from pathlib import Path
from typing import Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = Path(os.environ.get("TLDIST_BENCH_DIR", "/tmp/tldist_bench"))

if str(REPO) not in sys.path:  # run as `python bench/x.py` from anywhere
    sys.path.insert(0, str(REPO))


def loadavg() -> str:
    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or "unknown"


def machine_line() -> str:
    """One line: date, host kind, cores, CPU, torch version, load average now."""
    import torch

    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f"# {now}  {os.cpu_count()} cores ({cpu_model()}), {platform.system()} {platform.machine()}, "
            f"python {platform.python_version()}, torch {torch.__version__}, load avg {loadavg()}")


def median_spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    vals = list(values)
    return statistics.median(vals), min(vals), max(vals)


def fmt_ms(values: Sequence[float], digits: int = 2) -> str:
    """'median [min–max]' of repeated measurements."""
    med, lo, hi = median_spread(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-markdown table (also readable as plain text)."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_env(**extra: str) -> dict[str, str]:
    """Environment for launched training processes: 1 OpenMP thread per process, no W&B, repo importable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.update(extra)
    return env


def abba(variants: Sequence[str], repeats: int) -> list[tuple[int, str]]:
    """Interleaved order A B C, C B A, A B C... -> [(repeat, variant)]; drifts in load hit all variants alike."""
    order = []
    for r in range(repeats):
        seq = list(variants) if r % 2 == 0 else list(reversed(variants))
        order += [(r, v) for v in seq]
    return order


def rss_mb() -> float:
    """This process's resident memory now, MiB (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Peak:
    """``with Peak() as p: ...`` -> ``p.dt`` (wall seconds) and ``p.peak - p.base`` (peak RSS above the start of
    the block, MiB; sampled every 5 ms by a thread, after a ``gc.collect`` and glibc's ``malloc_trim``)."""

    def __enter__(self):
        import ctypes
        import gc
        import threading
        import time

        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.base = self.peak = rss_mb()
        self.stop = False

        def run():
            while not self.stop:
                self.peak = max(self.peak, rss_mb())
                time.sleep(0.005)

        self.t = threading.Thread(target=run, daemon=True)
        self.t.start()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import time

        self.dt = time.perf_counter() - self.t0
        self.stop = True
        self.t.join()
        self.peak = max(self.peak, rss_mb())

