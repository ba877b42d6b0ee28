import torch

from tldist.train.metrics import EvalAccumulator


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
