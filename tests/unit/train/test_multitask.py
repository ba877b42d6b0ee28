"""Multi-task heads (``model.heads=separate``, tldist.train.multitask): label mapping, the per-task loss
and config checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import make_shard_set
from tldist.config import load_config
from tldist.errors import ConfigError
from tldist.train.multitask import TaskHeads


def heads(weights=()):
    # task 0 has classes [a, b, c], task 1 [c, d]; merged by name: [a, b, c, d] -> task 1's map is [2, 3]
    return TaskHeads(["t0", "t1"], [["a", "b", "c"], ["c", "d"]], [None, [2, 3]], 4, weights)


def test_columns_and_classes():
    h = heads()
    assert h.num_outputs == 5 and h.classes == ["t0:a", "t0:b", "t0:c", "t1:c", "t1:d"]
    assert h.span(0) == (0, 3) and h.span(1) == (3, 5)
    labels, source = torch.tensor([0, 2, 2, 3]), torch.tensor([0, 0, 1, 1])
    assert h.columns(labels, source).tolist() == [0, 2, 3, 4]  # merged "c" maps to each task's own column
    with pytest.raises(RuntimeError, match="does not belong"):
        h.columns(torch.tensor([0]), torch.tensor([1]))  # merged label "a" is not a class of task 1


def test_loss_is_weighted_per_task_softmax():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, requires_grad=True)
    labels, source = torch.tensor([1, 2, 2, 3]), torch.tensor([0, 0, 1, 1])
    got = heads([1.0, 3.0]).loss(logits, labels, source)
    want = (F.cross_entropy(logits[:2, 0:3], torch.tensor([1, 2]), reduction="sum")
            + 3.0 * F.cross_entropy(logits[2:, 3:5], torch.tensor([0, 1]), reduction="sum")) / 4
    torch.testing.assert_close(got, want)
    got.backward()
    assert logits.grad[:2, 3:].abs().sum() == 0 and logits.grad[2:, :3].abs().sum() == 0  # heads don't mix
    smooth = heads().loss(logits, labels, source, label_smoothing=0.1)
    assert torch.isfinite(smooth)


def test_bind_eval_refuses_one_name_for_two_heads():
    """Two eval sets under one name would overwrite each other's scores and skew the mean eval/top1."""
    h = heads()
    assert h.bind_eval("a/val", 0) == ["a", "b", "c"] and h.bind_eval("b/val", 1) == ["c", "d"]
    assert h.bind_eval("a/val", 0) == ["a", "b", "c"]  # binding again to the same head is fine
    assert h.eval_span("a/val") == (0, 3) and h.eval_span("b/val") == (3, 5)
    with pytest.raises(ConfigError, match="'b/val' is used for the heads of tasks 1 and 0"):
        h.bind_eval("b/val", 0)
    with pytest.raises(ConfigError, match="there are 2 tasks"):
        h.bind_eval("c/val", 2)


def test_task_names_are_distinct_path_tails(tmp_path):
    """Train sets whose last two path components match get longer distinct names, not task0/task1."""
    from tldist.train.multitask import build_task_heads

    for d in ("x", "y"):
        make_shard_set(tmp_path / d / "shards" / "train", split="train", n=8, shards=1, num_classes=2, prefix=d)
    cfg = load_config(None, [f"data.train=[{tmp_path}/x/shards/train,{tmp_path}/y/shards/train]",
                             "model.heads=separate"])
    assert build_task_heads(cfg.data).names == ["x/shards/train", "y/shards/train"]


@pytest.mark.parametrize("overrides, key", [
    (["model.heads=separate", "data.val=v"], "data.val"),
    (["model.heads=separate", "data.val_sets=[v]"], "data.val_sets"),
    (["train.task_weights=[1,2]"], "train.task_weights"),
    (["model.heads=separate", "train.task_weights=[1,0]"], "train.task_weights"),
    (["model.heads=joint"], "model.heads"),
])
def test_bad_config_names_the_key(overrides, key):
    cfg = load_config(None, ["data.train=[a,b]", *overrides])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg.validate()
