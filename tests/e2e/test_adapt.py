"""``tldist pseudo-label`` and ``tldist adapt {adabn,lpft}`` on tiny real shards, with real processes.

Multi-process runs go through ``accelerate launch`` with the project's CPU config (2 ranks); each
asserts the job had 2 ranks and compares with a 1-process run or an independent reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import TINY, checkpoint_weights, cli, make_shard_set, run

pytestmark = pytest.mark.slow


def read_labels(shard_dir: Path) -> dict[str, int]:
    """``{key: label}`` of every sample of a shard set, read back from the tar files."""
    from tldist.data.manifest import load_manifest, resolve_shard_urls
    from tldist.data.stream import read_shard

    m = load_manifest(shard_dir)
    out: dict[str, int] = {}
    for url, info in zip(resolve_shard_urls(m), m.shards):
        for rec in read_shard(url, 0, info.num_samples):
            assert rec.ok and rec.key not in out
            out[rec.key] = int(rec.fields["cls"])
    return out


def best_checkpoint(run_dir: Path) -> Path:
    from tldist.artifacts.checkpoint import best_checkpoint as best, latest_checkpoint

    return best(run_dir / "checkpoints") or latest_checkpoint(run_dir / "checkpoints")


@pytest.fixture(scope="module")
def work(tiny_shards, tmp_path_factory):
    """A teacher (resnet18, 16 px) trained briefly on the tiny train set, and an unlabelled set of the
    same 4 classes (true labels kept, for the precision check)."""
    root = tmp_path_factory.mktemp("adapt")
    make_shard_set(root / "unlabelled", split="train", n=150, shards=3, seed=7, prefix="u")
    run(cli("train", "configs/test_tiny.yaml", f"data.train=[{tiny_shards}/train]", f"data.val={tiny_shards}/val",
            f"output_dir={root}/teacher", "train.max_steps=40", *TINY))
    assert json.loads((root / "teacher" / "result.json").read_text())["best_top1"] > 40  # it learned something
    return {"root": root, "teacher": root / "teacher", "shards": tiny_shards, "unlabelled": root / "unlabelled"}


# ------------------------------------------------------------------------------------------ pseudo-label

def test_pseudo_label_two_processes_matches_one_and_trains_a_mixture(work, tmp_path):
    root, unl = work["root"], work["unlabelled"]
    args = ["pseudo-label", "--model", str(work["teacher"]), "--unlabelled", str(unl), "--threshold", "0.5",
            "--batch-size", "16"]
    proc = run(cli(*args, "--out", str(tmp_path / "p2"), processes=2))
    assert "pseudo-labels: kept" in proc.stdout
    run(cli(*args, "--out", str(tmp_path / "p1")))
    from tldist.data.manifest import load_manifest

    m2, m1 = load_manifest(tmp_path / "p2"), load_manifest(tmp_path / "p1")
    s2, s1 = m2.meta["pseudo_label"], m1.meta["pseudo_label"]
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    assert s2["scored"] == 150 and s2["failed"] == 0  # every unlabelled sample scored exactly once
    assert s2["threshold"] == 0.5 and Path(s2["teacher"]).name.startswith("step_")
    assert m2.meta["true_labels"] is False and m2.classes == ["c0", "c1", "c2", "c3"]
    labels2, labels1 = read_labels(tmp_path / "p2"), read_labels(tmp_path / "p1")
    assert labels2 == labels1 and 0 < len(labels2) == s2["kept"] == m2.num_samples  # world size does not matter
    assert sum(s2["counts_per_class"].values()) == s2["kept"]
    assert s2["counts_per_class"] == {c: sum(v == i for v in labels2.values()) for i, c in enumerate(m2.classes)}
    truth = read_labels(unl)  # precision in the manifest == precision recomputed from the written shards
    assert s2["precision"] == pytest.approx(100.0 * sum(truth[k] == v for k, v in labels2.items()) / len(labels2))

    # balanced: every class that has pseudo-labels gets the same number
    run(cli(*args, "--balance", "--out", str(tmp_path / "pb"), processes=2))
    counts = [n for n in load_manifest(tmp_path / "pb").meta["pseudo_label"]["counts_per_class"].values() if n]
    assert counts and len(set(counts)) == 1

    # round 2: fine-tune on labelled + pseudo-labelled shards through the mixture support
    out = tmp_path / "round2"
    proc = run(cli("train", "configs/test_tiny.yaml", f"data.train=[{work['shards']}/train,{tmp_path}/p2]",
                   "data.train_weights=[0.5,0.5]", f"data.val={work['shards']}/val", f"output_dir={out}",
                   "train.max_steps=4", f"model.checkpoint={best_checkpoint(root / 'teacher')}", *TINY))
    assert f"train_samples={300 + len(labels2)}" in proc.stdout
    assert json.loads((out / "result.json").read_text())["step"] == 4


# ------------------------------------------------------------------------------------------ AdaBN

def _first_bn_reference(teacher: Path, target: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Population mean / unbiased var of the first BN layer's input over all target images, by hand."""
    from tldist.artifacts.resolve import load_model
    from tldist.config import DataConfig
    from tldist.data.pipeline import build_eval_loader
    from tldist.data.transforms import Normalizer
    from tldist.world import World

    loaded = load_model(teacher)
    pre = loaded.meta["preprocess"]
    loader = build_eval_loader(DataConfig(batch_size=32, num_workers=0), World(0, 1, 0),
                               image_size=pre["image_size"], location=str(target))
    normalize = Normalizer(pre["mean"], pre["std"], device="cpu")
    bn = next(m for m in loaded.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen: list[torch.Tensor] = []
    hook = bn.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].detach().double()))
    with torch.no_grad():
        for batch in loader:
            loaded.model(normalize(batch["image"][batch["mask"]]))
    hook.remove()
    x = torch.cat([s.permute(1, 0, 2, 3).reshape(s.shape[1], -1) for s in seen], 1)
    return x.mean(1), x.var(1, unbiased=True)


def test_adabn_uses_the_exports_preprocessing(tiny_shards, tmp_path):
    """An export whose model.json says resize 16 for 16 px (crop_pct 1.0): the target statistics are
    those of the images as they are, not of images resized to 18 (0.875) as every model used to get."""
    import io

    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    from helpers import samples_of
    from tldist.adapt.adabn import adabn
    from tldist.config import ModelConfig
    from tldist.data.transforms import Normalizer
    from tldist.artifacts.export import write_export
    from tldist.models.factory import build_model

    torch.manual_seed(0)
    model, info = build_model(ModelConfig(name="resnet18", pretrained=False), 4, image_size=16)
    pre = {"image_size": 16, "resize": 16, "mean": list(info.mean), "std": list(info.std), "interpolation": "bilinear"}
    write_export(model, {"model": "resnet18", "num_classes": 4, "classes": ["c0", "c1", "c2", "c3"],
                         "preprocess": pre}, tmp_path / "m")
    adabn(str(tmp_path / "m"), str(tiny_shards / "val"), str(tmp_path / "a"), batch_size=32, num_workers=0)
    raw = torch.stack([torch.from_numpy(np.asarray(Image.open(io.BytesIO(d)).convert("RGB")).copy()).permute(2, 0, 1)
                       for _, d, _ in samples_of(tiny_shards / "val")])
    with torch.no_grad():
        x = Normalizer(pre["mean"], pre["std"], device="cpu")(raw)
        ref = model.eval().conv1(x).double().mean((0, 2, 3))  # the input of bn1, averaged per channel
    torch.testing.assert_close(load_file(str(tmp_path / "a" / "model.safetensors"))["bn1.running_mean"].double(), ref,
                               rtol=1e-4, atol=1e-5)


def test_adabn_two_processes_exact(work, tmp_path):
    from safetensors.torch import load_file

    target = work["shards"] / "val"  # 101 samples over 3 shards: uneven across 2 ranks x 1 worker
    args = ["adapt", "adabn", "--model", str(work["teacher"]), "--target", str(target), "--batch-size", "16"]
    proc = run(cli(*args, "--out", str(tmp_path / "a2"), "--val", str(target), processes=2))
    assert "ranks agree: True" in proc.stdout and "top-1" in proc.stdout
    run(cli(*args, "--out", str(tmp_path / "a1")))
    report = json.loads((tmp_path / "a2" / "adabn.json").read_text())
    assert report["world_size"] == 2 and report["samples"] == 101 and report["ranks_agree"] is True
    assert report["layers_adapted"] == report["bn_layers"] > 10 and report["mean_abs_change"] > 0
    assert "before" in report and report["after"]["count"] == 101
    w2 = load_file(str(tmp_path / "a2" / "model.safetensors"))
    w1 = load_file(str(tmp_path / "a1" / "model.safetensors"))
    teacher = checkpoint_weights(Path(json.loads((tmp_path / "a1" / "model.json").read_text())["adapted_from"]))
    for k, v in w2.items():
        if k.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(v, w1[k], rtol=1e-5, atol=1e-6)  # 2 ranks == 1 rank
        elif not k.endswith("num_batches_tracked"):
            assert torch.equal(v, teacher[k]), k  # learned weights untouched
    ref_mean, ref_var = _first_bn_reference(work["teacher"], target)
    first = next(k[:-len(".running_mean")] for k in w2 if k.endswith("running_mean"))
    torch.testing.assert_close(w2[first + ".running_mean"].double(), ref_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w2[first + ".running_var"].double(), ref_var, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(w2[first + ".running_mean"], teacher[first + ".running_mean"])

    run(cli(*args, "--out", str(tmp_path / "ab"), "--mode", "batch", processes=2))  # the one-pass estimator runs
    assert json.loads((tmp_path / "ab" / "adabn.json").read_text())["mode"] == "batch"


# ------------------------------------------------------------------------------------------ LP-FT

def test_lpft_two_processes(work, tmp_path):

    out = tmp_path / "lpft"
    proc = run(cli("adapt", "lpft", "configs/test_tiny.yaml", f"data.train=[{work['shards']}/train]",
                   f"data.val={work['shards']}/val", f"output_dir={out}",
                   f"model.checkpoint={best_checkpoint(work['teacher'])}",
                   "train.max_steps=3", *TINY, "--probe-epochs", "1", "--probe-steps", "3", processes=2))
    assert "LP-FT" in proc.stdout
    s = json.loads((out / "lpft.json").read_text())
    assert s["probe"]["world_size"] == 2 and s["finetune"]["ranks_agree"] is True
    assert s["probe"]["step"] == 3 and s["finetune"]["step"] == 3
    assert s["finetune"]["lr"] == pytest.approx(0.0003)  # optim.lr / 10
    init = checkpoint_weights(best_checkpoint(work["teacher"]))
    probe = checkpoint_weights(Path(s["finetune"]["init_checkpoint"]))
    ft = checkpoint_weights(sorted((out / "finetune" / "checkpoints").glob("step_*"))[-1])
    head = [k for k in probe if k.startswith("fc.")]
    body = [k for k in probe if k not in head and not k.endswith("num_batches_tracked")]
    assert head and any(not torch.equal(probe[k], init[k]) for k in head)  # the probe trained the head...
    assert all(torch.equal(probe[k], init[k]) for k in body)  # ...and nothing else (BN stats frozen too)
    assert any(not torch.equal(ft[k], probe[k]) for k in body)  # the second stage trains the backbone


# ------------------------------------------------------------------------------------------ bad input

def _empty_set(path: Path) -> Path:
    """A shard set whose manifest lists one shard with no samples."""
    import tarfile

    from tldist.data.manifest import Manifest, ShardInfo

    path.mkdir(parents=True)
    tarfile.open(path / "train-000000.tar", "w").close()
    Manifest(split="train", classes=["c0", "c1", "c2", "c3"], shards=[ShardInfo("train-000000.tar", 0)],
             meta={}).save(path / "manifest.json")
    return path


def _bad_cases(work, tmp: Path) -> list[tuple[list[str], str]]:
    teacher, unl, val = str(work["teacher"]), str(work["unlabelled"]), str(work["shards"] / "val")
    make_shard_set(tmp / "six", split="train", n=12, shards=1, num_classes=6, seed=3)
    six = str(tmp / "six")
    empty = str(_empty_set(tmp / "empty"))
    return [
        (["pseudo-label", "--model", str(tmp / "nope"), "--unlabelled", unl, "--out", str(tmp / "o")],
         "does not exist"),
        (["pseudo-label", "--model", unl, "--unlabelled", unl, "--out", str(tmp / "o")],
         "is neither a tldist export"),
        (["pseudo-label", "--model", teacher, "--unlabelled", six, "--out", str(tmp / "o")], "has 6 classes"),
        (["pseudo-label", "--model", teacher, "--unlabelled", empty, "--out", str(tmp / "o")], "holds no samples"),
        (["pseudo-label", "--model", teacher, "--unlabelled", str(tmp / "none"), "--out", str(tmp / "o")],
         str(tmp / "none")),
        (["pseudo-label", "--model", teacher, "--unlabelled", unl, "--out", str(tmp / "o"), "--threshold", "1.5"],
         "--threshold 1.5"),
        (["pseudo-label", "--model", teacher, "--unlabelled", unl, "--out", unl], "would overwrite"),
        (["adapt", "adabn", "--model", str(tmp / "nope"), "--target", val, "--out", str(tmp / "o")], "does not exist"),
        (["adapt", "adabn", "--model", teacher, "--target", empty, "--out", str(tmp / "o")], "holds no samples"),
        (["adapt", "adabn", "--model", teacher, "--target", val, "--val", six, "--out", str(tmp / "o")],
         "has classes the model does not know: ['c4', 'c5']"),
        (["adapt", "lpft", "configs/test_tiny.yaml", f"data.train=[{unl}]", f"output_dir={tmp}/l",
          f"model.checkpoint={tmp}/nope", *TINY, "--probe-epochs", "1"], "does not exist"),
        (["adapt", "lpft", "configs/test_tiny.yaml", f"data.train=[{six}]", f"output_dir={tmp}/l",
          "model.num_classes=4", *TINY, "--probe-epochs", "1"], "model.num_classes"),
        (["adapt", "lpft", "configs/test_tiny.yaml", f"data.train=[{unl}]", "--probe-epochs", "0"], "--probe-epochs 0"),
    ]


def test_bad_input_is_one_clear_line(work, tmp_path, capsys):
    from tldist.cli import main

    for argv, message in _bad_cases(work, tmp_path):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("tldist: error: ") and "\n" not in err and message in err, (argv, err)
    assert not (tmp_path / "o").exists()
