"""``tldist eval`` (:mod:`tldist.evaluate`) and eval-set naming on a real tiny training run.

Labels are scored by class *name* against the checkpoint's own class list, whatever order or subset
of classes a val set was written with; every ``data.val_sets`` entry is scored under its own name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import pytest

from conftest import REPO, make_shard_set
from tldist.config import load_config
from tldist.errors import ConfigError, DataError

TINY = ["model.name=resnet18", "model.pretrained=false", "data.image_size=16", "data.batch_size=16",
        "data.num_workers=1", "data.shuffle_buffer=64", "data.hflip=false", "optim.name=adamw", "optim.lr=0.003",
        "optim.lr_ref_batch=16", "train.log_every_steps=5", "tracker.backend=none"]
STEPS = 40


def samples_of(shard_dir: Path) -> list[tuple[str, bytes, str]]:
    """``(key, image bytes, class name)`` of every sample of a shard set, in manifest order."""
    from tldist.data.manifest import IMAGE_EXTS, load_manifest, resolve_shard_urls
    from tldist.data.stream import read_shard

    m = load_manifest(shard_dir)
    out = []
    for url, info in zip(resolve_shard_urls(m), m.shards):
        for rec in read_shard(url, 0, info.num_samples):
            ext = next(e for e in IMAGE_EXTS if e in rec.fields)
            out.append((rec.key, rec.fields[ext], m.classes[int(rec.fields["cls"])]))
    return out


def relabelled_copy(src: Path, out: Path, classes: list[str], keep: Optional[set[str]] = None,
                    shards: int = 3) -> int:
    """Write the samples of ``src`` (those whose class is in ``keep``) with the class list ``classes``
    (labels follow the names), like ``tldist shards --classes c3,c2,...``; returns the sample count."""
    from tldist.data.writer import Sample, write_shards

    rows = [(k, d, c) for k, d, c in samples_of(src) if keep is None or c in keep]
    per_shard = -(-len(rows) // shards)
    write_shards([Sample(key=k, data=d, ext="png", label=classes.index(c)) for k, d, c in rows], out, "val",
                 classes, max_count=per_shard, max_size=None, check="none")
    return len(rows)


@pytest.fixture(scope="module")
def trained(tiny_shards, tmp_path_factory):
    """resnet18 (16 px) trained briefly on classes c0..c3, scored during training on the tiny val set
    and on two extra val sets whose last two path components are the same (``shards/val``)."""
    from test_adapt import cli, run

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
    from test_adapt import cli, run

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
    export = export_model(trained["ckpt"], tmp_path / "export")
    r = trained["result"]
    for checkpoint, extra in ((export, []), (trained["ckpt"] / "model.safetensors",
                                             [f"data.train=[{trained['shards']}/train]"])):
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


# ---- eval set names ----------------------------------------------------------------------------

def test_eval_set_names_are_distinct_tails():
    from tldist.train.main import eval_set_names

    assert eval_set_names(["/d/digits/val", "/d/letters/val"]) == ["digits/val", "letters/val"]
    assert eval_set_names(["/x/a/shards/val", "/x/b/shards/val", "/y/other/val"]) == \
        ["a/shards/val", "b/shards/val", "other/val"]
    assert eval_set_names(["http://h/a/val", "/h/a/val/manifest.json"]) == ["http://h/a/val", "/h/a/val/manifest.json"]
    names = eval_set_names(["/val", "/x/val"])
    assert "val" not in names and len(set(names)) == 2  # "val" is data.val's name


@pytest.mark.parametrize("overrides, keys", [
    (["data.val=/x/a/val", "data.val_sets=[/x/a/val/]"], ("'data.val'", "'data.val_sets[0]'")),
    (["data.val_sets=[/x/a/val,/x/b/val,/x/a/val/manifest.json]"], ("'data.val_sets[0]'", "'data.val_sets[2]'")),
])
def test_the_same_eval_set_twice_is_refused(overrides, keys):
    from tldist.train.main import eval_sets

    cfg = load_config(None, ["data.train=[t]", *overrides])
    with pytest.raises(ConfigError) as e:
        eval_sets(cfg.data)
    assert all(k in str(e.value) for k in keys) and "/x/a/val" in str(e.value)


def test_eval_sets_keep_data_val_as_val():
    from tldist.train.main import eval_sets

    cfg = load_config(None, ["data.train=[t]", "data.val=/s/val", "data.val_sets=[val,/x/shards/val]"])
    sets = eval_sets(cfg.data)
    assert sets[0] == ("val", "/s/val") and [loc for _, loc in sets] == ["/s/val", "val", "/x/shards/val"]
    assert len({n for n, _ in sets}) == 3
