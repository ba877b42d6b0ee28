"""Shared fixtures: tiny real shard sets written with tldist's own writer."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
sys.path.insert(0, str(Path(__file__).parent))

from slurm_cluster import slurm_cluster  # noqa: E402,F401  (session-scoped dev SLURM cluster)


@contextlib.contextmanager
def serve_http(directory: Path) -> Iterator[str]:
    """A real HTTP server on loopback serving ``directory`` (in a thread); yields its base URL."""
    import functools
    import http.server
    import threading

    quiet = type("QuietHandler", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(quiet, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def tiny_image(label: int, rng: np.random.Generator, size: int = 16, fmt: str = "PNG") -> bytes:
    """A learnable synthetic image: a bright square whose position and colour encode the class."""
    from PIL import Image

    img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    q = size // 4
    r, c = divmod(label % 16, 4)
    img[r * q:(r + 1) * q, c * q:(c + 1) * q, label % 3] = 230
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def make_shard_set(out: Path, *, split: str, n: int, shards: int, num_classes: int = 4, seed: int = 0,
                   fmt: str = "PNG", prefix: str = "s"):
    """Write ``n`` samples in ``shards`` shards with the production writer; returns the Manifest."""
    from tldist.data.writer import Sample, write_shards

    rng = np.random.default_rng(seed)
    ext = "png" if fmt == "PNG" else "jpg"
    samples = [Sample(key=f"{prefix}{split}{i:05d}", data=tiny_image(i % num_classes, rng, fmt=fmt), ext=ext,
                      label=i % num_classes) for i in range(n)]
    per_shard = -(-n // shards)
    return write_shards(samples, out, split, [f"c{i}" for i in range(num_classes)], max_count=per_shard,
                        max_size=None, check="none")


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """5 train shards (uneven over 2 ranks x 2 workers) and 3 val shards, 4 classes, 16 px."""
    root = tmp_path_factory.mktemp("tiny_shards")
    make_shard_set(root / "train", split="train", n=300, shards=5)
    make_shard_set(root / "val", split="val", n=101, shards=3, seed=1)
    return root


def spawn_ranks(worker, nprocs: int = 2) -> dict:
    """Run ``worker(rank, port, out)`` in ``nprocs`` spawned processes (a free local port for their
    process group) and return what each put into the shared dict ``out`` (keyed by rank)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.get_context("spawn").Manager().dict()
    mp.spawn(worker, args=(port, out), nprocs=nprocs, join=True)
    return dict(out)
