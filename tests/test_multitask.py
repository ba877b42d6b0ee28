"""Multi-task heads (``model.heads=separate``): label mapping, the per-task loss, config checks and a
2-process training run on a mixture of two tiny shard sets."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
import torch.nn.functional as F

from conftest import make_shard_set
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


@pytest.mark.slow
def test_two_processes_separate_heads(tiny_shards, tmp_path):
    from safetensors.torch import load_file

    from test_adapt import REPO, TINY, cli, env, run

    make_shard_set(tmp_path / "b" / "train", split="train", n=120, shards=3, num_classes=3, seed=4, prefix="b")
    make_shard_set(tmp_path / "b" / "val", split="val", n=45, shards=2, num_classes=3, seed=5, prefix="b")
    out = tmp_path / "run"
    run(cli("train", "configs/test_tiny.yaml", f"data.train=[{tiny_shards}/train,{tmp_path}/b/train]",
            f"data.val_sets=[{tiny_shards}/val,{tmp_path}/b/val]", "model.heads=separate",
            "train.task_weights=[1.0,2.0]", f"output_dir={out}", "train.max_steps=6", *TINY, processes=2))
    r = json.loads((out / "result.json").read_text())
    name_a, name_b = f"{tiny_shards.name}/val", "b/val"
    assert r["world_size"] == 2 and r["ranks_agree"] is True and r["step"] == 6
    assert r[f"eval/{name_a}/count"] == 101 and r[f"eval/{name_b}/count"] == 45  # each set once, own head
    assert r["eval/top1"] == pytest.approx((r[f"eval/{name_a}/top1"] + r[f"eval/{name_b}/top1"]) / 2)
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    assert load_file(str(ckpt / "model.safetensors"))["fc.weight"].shape[0] == 4 + 3  # c0..c3 and c0..c2 apart
    tasks = json.loads((ckpt / "trainer.json").read_text())["tasks"]
    assert [(t["offset"], len(t["classes"]), t["loss_weight"]) for t in tasks] == [(0, 4, 1.0), (4, 3, 2.0)]
    # `tldist eval` scores one head; which head a val set belongs to is not recorded (b/val's classes
    # c0..c2 are in both tasks): refused with the reason, not a traceback
    proc = subprocess.run(cli("eval", "configs/test_tiny.yaml", f"data.val={tmp_path}/b/val", *TINY,
                              "--checkpoint", str(ckpt)), capture_output=True, text=True, cwd=REPO, env=env())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "multi-task model" in proc.stderr and "tldist eval works on one head" in proc.stderr, proc.stderr
    # export keeps the task layout; predict scores each task over its own head
    export = tmp_path / "export"
    run(cli("export", str(ckpt), str(export)))
    meta = json.loads((export / "model.json").read_text())
    assert [(t["offset"], len(t["classes"])) for t in meta["tasks"]] == [(0, 4), (4, 3)]
    import numpy as np

    from conftest import tiny_image

    img = tmp_path / "x.png"
    img.write_bytes(tiny_image(1, np.random.default_rng(3)))
    lines = run(cli("predict", str(export), str(img), "--top-k", "5")).stdout.strip().splitlines()
    assert [line.split("  ")[1] for line in lines] == [f"[{t['name']}]" for t in meta["tasks"]]
    assert [len(line.split("  ")[2:]) for line in lines] == [4, 3]  # top-5 capped at each head's classes
    for line in lines:
        assert abs(sum(float(x.split()[1]) for x in line.split("  ")[2:]) - 1) < 0.01  # one softmax per head
    # compress and adapt work on one head: refused with the reason
    for cmd in (cli("compress", "prune", str(export), "--out", str(tmp_path / "p"), "--val", f"{tmp_path}/b/val",
                    "--sparsity", "0.5"),
                cli("adapt", "adabn", "--model", str(ckpt), "--target", f"{tmp_path}/b/train", "--out", str(tmp_path / "a"))):
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env())
        assert proc.returncode == 2 and "multi-task" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
