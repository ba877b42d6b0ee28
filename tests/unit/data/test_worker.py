"""tldist.data.worker: batches allocated in shared memory, and a failing transform is an error, not a
skipped sample."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image


class _BufferProbe(torch.utils.data.IterableDataset):
    def __iter__(self):
        from tldist.data.worker import batch_buffer

        batch = batch_buffer(2, 4)
        yield {"shared_in_worker": batch.is_shared(), "image": batch.fill_(3)}


def test_worker_batches_are_allocated_in_shared_memory():
    """Batches are born in shared memory inside workers (nothing to copy when they are sent)."""
    from tldist.data.worker import batch_buffer

    assert not batch_buffer(2, 4).is_shared()  # in the main process: ordinary memory
    (item,) = list(torch.utils.data.DataLoader(_BufferProbe(), batch_size=None, num_workers=1))
    assert item["shared_in_worker"] is True and item["image"].shape == (2, 3, 4, 4) and bool(item["image"].eq(3).all())


def test_a_failing_transform_is_an_error_not_a_skipped_sample():
    """Only undecodable bytes count as bad data: a transform that fails on a decoded image (a code
    or library fault, like timm's Posterize with Pillow 13) must stop the run, not be skipped."""
    import random

    from tldist.data.stream import Record
    from tldist.data.transforms import TrainTransform
    from tldist.data.worker import SampleError, decode_record

    buf = io.BytesIO()
    Image.new("RGB", (12, 10), (200, 10, 10)).save(buf, format="PNG")
    rec = Record("k", "mem://x", {"png": buf.getvalue(), "cls": b"1"})
    image, label = decode_record(rec, "pil", TrainTransform(8), random.Random(0), num_classes=2, label_map=None)
    assert image.shape == (3, 8, 8) and label == 1

    def broken(img, rng, out=None):
        raise ValueError("bits must be > 0")

    with pytest.raises(ValueError, match="bits"):
        decode_record(rec, "pil", broken, random.Random(0), num_classes=2, label_map=None)
    with pytest.raises(SampleError, match="cannot decode"):
        decode_record(Record("k", "mem://x", {"png": b"\x89PNG garbage", "cls": b"1"}), "pil", TrainTransform(8),
                      random.Random(0), num_classes=2, label_map=None)
