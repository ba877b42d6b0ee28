"""``tldist eval`` (:mod:`tldist.evaluate`) on a real tiny training run.

Labels are scored by class *name* against the checkpoint's own class list, whatever order or subset
of classes a val set was written with; every ``data.val_sets`` entry is scored under its own name."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from helpers import REPO, make_shard_set, relabelled_copy
from tldist.config import load_config
from tldist.errors import DataError

TINY = ["model.name=resnet18", "model.pretrained=false", "data.image_size=16", "data.batch_size=16",
        "data.num_workers=1", "data.shuffle_buffer=64", "data.hflip=false", "optim.name=adamw", "optim.lr=0.003",
        "optim.lr_ref_batch=16", "train.log_every_steps=5", "tracker.backend=none"]
STEPS = 40


@pytest.fixture(scope="module")
def trained(tiny_shards, tmp_path_factory):
    """resnet18 (16 px) trained briefly on classes c0..c3, scored during training on the tiny val set
    and on two extra val sets whose last two path components are the same (``shards/val``)."""
    from helpers import cli, run

    root = tmp_path_factory.mktemp("evaluate")
    make_shard_set(root / "a" / "shards" / "val", split="val", n=10, shards=1, seed=11, prefix="a")
    make_shard_set(root / "b" / "shards" / "val", split="val", n=20, shards=2, seed=12, prefix="b")
    out = root / "run"
    run(cli("train", "configs/test_tiny.yaml", f"data.train=[{tiny_shards}/train]", f"data.val={tiny_shards}/val",
            f"data.val_sets=[{root}/a/shards/val,{root}/b/shards/val]", f"output_dir={out}",
            f"train.max_steps={STEPS}", *TINY))
    result = json.loads((out / "result.json").read_text())
    assert result["step"] == STEPS and result["eval/top1"] > 40  # learned: a position mix-up would show
    return {"root": root, "run": out, "result": result, "shards": tiny_shards,
            "ckpt": out / "checkpoints" / f"step_{STEPS:08d}"}


def cfg_for(val: Path, *extra: str):
    return load_config(str(REPO / "configs/test_tiny.yaml"), [f"data.val={val}", *TINY, *extra])


@pytest.mark.slow
def test_every_val_set_is_scored_under_its_own_name(trained):
    """``/x/a/shards/val`` and ``/x/b/shards/val`` used to share the name ``shards/val``: one was dropped."""
    r = trained["result"]
    assert r["eval/count"] == 101
    assert r["eval/a/shards/val/count"] == 10 and r["eval/b/shards/val/count"] == 20
    assert "eval/shards/val/count" not in r


@pytest.mark.slow
def test_eval_cli_scores_by_class_name_like_training(trained, tmp_path):
    """A val set written with the classes listed in reverse (c3,c2,c1,c0): same top-1 and loss as
    training's own eval of the same samples, from ``tldist eval`` on the step dir."""
    from helpers import cli, run

    rev = tmp_path / "rev"
    relabelled_copy(trained["shards"] / "val", rev, ["c3", "c2", "c1", "c0"])
    r = trained["result"]
    proc = run(cli("eval", "configs/test_tiny.yaml", f"data.val={rev}", *TINY, "--checkpoint", str(trained["ckpt"])))
    assert f"top1 {r['eval/top1']:.2f}%" in proc.stdout and f"loss {r['eval/loss']:.4f}" in proc.stdout, proc.stdout
    assert "(101 samples)" in proc.stdout


@pytest.mark.slow
def test_export_run_dir_and_weights_file_score_alike(trained, tmp_path):
    """The class list comes from model.json for an export; a run dir resolves to its best checkpoint;
    a bare weights file records none and follows data.train's classes (what training built)."""
    from tldist.evaluate import evaluate_checkpoint
    from tldist.export import export_model

    rev = tmp_path / "rev"
    relabelled_copy(trained["shards"] / "val", rev, ["c3", "c2", "c1", "c0"])
    from safetensors.torch import save_file

    from helpers import checkpoint_weights

    export = export_model(trained["ckpt"], tmp_path / "export")
    r = trained["result"]
    bare = tmp_path / "bare.safetensors"  # a plain weights file, as another tool would hand it over
    save_file({k: v.contiguous() for k, v in checkpoint_weights(trained["ckpt"]).items()}, str(bare))
    for checkpoint, extra in ((export, []), (bare, [f"data.train=[{trained['shards']}/train]"])):
        got = evaluate_checkpoint(cfg_for(rev, *extra), str(checkpoint))
        assert got["count"] == 101 and got["top1"] == pytest.approx(r["eval/top1"], abs=1e-9), checkpoint
        assert got["loss"] == pytest.approx(r["eval/loss"], rel=1e-5)
        assert got["classes"] == ["c0", "c1", "c2", "c3"]
    best = json.loads((trained["run"] / "checkpoints" / "best.json").read_text())
    got = evaluate_checkpoint(cfg_for(trained["shards"] / "val"), str(trained["run"]))  # -> its best checkpoint
    assert got["top1"] == pytest.approx(best["metric"], abs=1e-9) and best["metric"] == r["best_top1"]


@pytest.mark.slow
def test_val_set_with_a_subset_of_classes_is_scored(trained, tmp_path):
    """Only c3 and c1 (written in that order): scored on the model's classes c1 and c3; the classes
    absent from the set have per-class accuracy NaN, not 0."""
    from tldist.evaluate import evaluate_checkpoint

    full = evaluate_checkpoint(cfg_for(trained["shards"] / "val"), str(trained["ckpt"]))
    sub = tmp_path / "sub"
    n = relabelled_copy(trained["shards"] / "val", sub, ["c3", "c1"], keep={"c1", "c3"}, shards=2)
    got = evaluate_checkpoint(cfg_for(sub), str(trained["ckpt"]))
    counts = [sum(row) for row in full["confusion"]]  # samples per true class in the full set
    assert got["count"] == n == counts[1] + counts[3]
    for c in (1, 3):
        assert got["per_class_acc"][c] == pytest.approx(full["per_class_acc"][c])
        assert got["confusion"][c] == full["confusion"][c]
    assert math.isnan(got["per_class_acc"][0]) and math.isnan(got["per_class_acc"][2])
    hits = full["per_class_acc"][1] * counts[1] + full["per_class_acc"][3] * counts[3]
    assert got["top1"] == pytest.approx(100.0 * hits / n)


@pytest.mark.slow
def test_val_set_with_unknown_classes_is_refused(trained, tmp_path):
    from tldist.evaluate import evaluate_checkpoint

    bad = tmp_path / "bad"
    make_shard_set(bad, split="val", n=8, shards=1, num_classes=2, seed=3)  # c0, c1 ...
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["classes"] = ["c0", "zebra"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"val set '.*bad' has classes the model does not know: \['zebra'\]") as e:
        evaluate_checkpoint(cfg_for(bad), str(trained["ckpt"]))
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_wrong_model_name_is_named(trained):
    from tldist.errors import UserError
    from tldist.evaluate import evaluate_checkpoint

    with pytest.raises(UserError, match="holds a 'resnet18' model but config key 'model.name' is 'resnet34'"):
        evaluate_checkpoint(cfg_for(trained["shards"] / "val", "model.name=resnet34"), str(trained["ckpt"]))
