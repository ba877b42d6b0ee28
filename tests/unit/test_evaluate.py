"""tldist.evaluate: the metric accumulator, and an export scored with its own preprocessing and by class name."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import evaluate_export as _eval
from tldist.evaluate import EvalAccumulator
from tldist.world import World


def test_topk_with_mask_and_per_class():
    logits = torch.tensor([
        [9.0, 1, 0, 0, 0, 0],   # label 0, top1 hit
        [1.0, 0, 9, 8, 7, 6],   # label 1, miss top1 and top5 (1 ranks 6th)
        [0.0, 9, 8, 7, 6, 5],   # label 2, top5 hit only
        [5.0, 5, 5, 5, 5, 9],   # masked out
    ])
    labels = torch.tensor([0, 1, 2, 3])
    acc = EvalAccumulator(6)
    acc.update(logits, labels, torch.tensor([True, True, True, False]))
    r = acc.compute()
    assert r["count"] == 3
    assert abs(r["top1"] - 100 / 3) < 1e-9
    assert abs(r["top5"] - 200 / 3) < 1e-9
    assert r["per_class_acc"][:3] == [1.0, 0.0, 0.0]
    assert r["confusion"][1][2] == 1


def test_split_batches_sum_to_whole():
    torch.manual_seed(0)
    logits, labels = torch.randn(50, 10), torch.randint(0, 10, (50,))
    whole, parts = EvalAccumulator(10), EvalAccumulator(10)
    whole.update(logits, labels)
    for i in range(0, 50, 7):
        parts.update(logits[i:i + 7], labels[i:i + 7])
    a, b = whole.compute(), parts.compute()
    assert a["top1"] == b["top1"] and a["top5"] == b["top5"]
    assert abs(a["loss"] - b["loss"]) < 1e-5  # float32 per-batch sums


def test_classes_absent_from_the_set_are_nan_not_zero():
    """A class with no val sample was not measured: NaN, while a present class with no hit is 0.0."""
    import math

    logits = torch.tensor([[0.0, 9, 0, 0], [9.0, 0, 0, 0], [0.0, 0, 0, 9]])
    acc = EvalAccumulator(4)
    acc.update(logits, torch.tensor([1, 0, 0]), torch.tensor([True, True, False]))  # class 3 only masked
    per_class = acc.compute()["per_class_acc"]
    assert per_class[:2] == [1.0, 1.0]
    assert math.isnan(per_class[2]) and math.isnan(per_class[3])
    acc.update(torch.tensor([[9.0, 0, 0, 0]]), torch.tensor([2]))
    assert acc.compute()["per_class_acc"][2] == 0.0  # present, never right: a real 0


def test_eval_uses_the_exports_preprocessing(tiny_export, tiny_shards):
    """The images compress scores are those of model.json's ``resize``: resize 16 for 16 px images means
    as they are (crop_pct 1.0), resize 18 means PIL bilinear to 18 and a center crop; every export
    used to get 0.875 whatever model.json said."""
    import io

    import numpy as np
    from PIL import Image

    from helpers import samples_of
    from tldist.evaluate import shard_loader as shard_batches

    meta = json.loads((tiny_export / "model.json").read_text())
    raw = {k: Image.open(io.BytesIO(d)).convert("RGB") for k, d, _ in samples_of(tiny_shards / "val")}
    for resize in (16, 18, 20):
        meta["preprocess"]["resize"] = resize
        o = (resize - 16) // 2
        seen = 0
        for batch in shard_batches(str(tiny_shards / "val"), meta, World(), batch_size=32, num_workers=0):
            for key, image, ok in zip(batch["key"], batch["image"], batch["mask"].tolist()):
                if not ok:
                    continue
                want = np.asarray(raw[key].resize((resize, resize), Image.BILINEAR).crop((o, o, o + 16, o + 16)))
                assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(want.copy())), (resize, key)
                seen += 1
        assert seen == 101


def test_eval_scores_by_class_name(tiny_export, tiny_shards, tmp_path):
    """A val set written with the classes in another order, or only some of them, scores by name."""
    from helpers import exported as load_exported, relabelled_copy

    model, meta = load_exported(tiny_export)
    base = _eval(model, meta, tiny_shards / "val")
    relabelled_copy(tiny_shards / "val", tmp_path / "rev", ["c3", "c2", "c1", "c0"])
    rev = _eval(model, meta, tmp_path / "rev")
    assert rev["top1"] == base["top1"] and rev["loss"] == pytest.approx(base["loss"], abs=1e-5)
    n = relabelled_copy(tiny_shards / "val", tmp_path / "sub", ["c2", "c0"], keep={"c0", "c2"}, shards=1)
    assert _eval(model, meta, tmp_path / "sub")["count"] == n
