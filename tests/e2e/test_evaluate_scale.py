"""EvalAccumulator on 2 gloo ranks: only per-class counts are all-reduced, the mistake pairs are gathered to
rank 0 alone, and the result equals one process scoring every sample."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import spawn_ranks
from tldist.evaluate import EvalAccumulator

pytestmark = pytest.mark.slow

CLASSES = 50


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    labels = torch.randint(0, CLASSES, (600,), generator=g)
    logits = torch.randn(600, CLASSES, generator=g)
    logits[torch.arange(600), (labels + 1) % CLASSES] += 1.5  # a frequent confusion: c -> c+1
    return logits, labels


def _worker(rank: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        logits, labels = _data()
        small = EvalAccumulator(CLASSES, confusion_max_classes=CLASSES - 1, top_confused=7)
        dense = EvalAccumulator(CLASSES, top_confused=7)
        for i in range(rank * 64, 600, 128):  # this rank's batches
            small.update(logits[i:i + 64], labels[i:i + 64])
            dense.update(logits[i:i + 64], labels[i:i + 64])
        out[rank] = {"small": small.compute(), "dense": dense.compute()}
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process_and_only_rank0_holds_pairs():
    out = spawn_ranks(_worker)
    logits, labels = _data()
    one = EvalAccumulator(CLASSES, top_confused=7)
    one.update(logits, labels)
    ref = one.compute()
    for rank in (0, 1):
        for name in ("small", "dense"):
            r = out[rank][name]
            for k in ("top1", "top5", "balanced_acc", "count", "per_class_count"):
                assert r[k] == ref[k], (rank, name, k)
            assert r["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert out[0]["dense"]["confusion"] == ref["confusion"]  # rank 0: the dense matrix below the threshold
    assert out[0]["small"]["confusion"] is None  # above it: none
    assert out[0]["small"]["top_confused"] == out[0]["dense"]["top_confused"] == ref["top_confused"]
    t, p, _ = ref["top_confused"][0]
    assert p == (t + 1) % CLASSES  # the planted confusion comes first
    for name in ("small", "dense"):  # the other rank received no pairs and built no matrix
        assert out[1][name]["confusion"] is None and out[1][name]["top_confused"] is None
