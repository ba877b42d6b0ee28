"""Multi-task heads (``model.heads=separate``): a 2-process training run on a mixture of two tiny shard sets."""

from __future__ import annotations

import json
import subprocess

import pytest

from helpers import make_shard_set


@pytest.mark.slow
def test_two_processes_separate_heads(tiny_shards, tmp_path):

    from helpers import REPO, TINY, checkpoint_weights, cli, env, run

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
    assert checkpoint_weights(ckpt)["fc.weight"].shape[0] == 4 + 3  # c0..c3 and c0..c2 apart
    tasks = json.loads((ckpt / "model.json").read_text())["tasks"]
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

    from helpers import tiny_image

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
