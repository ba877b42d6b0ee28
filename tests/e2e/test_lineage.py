"""Issue 23 end to end, with real processes: the metric a user reads is the metric of what they deploy,
whatever chain of commands made the model; user mistakes and data decisions are one line or counted."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import REPO, TINY, cli, env, run

pytestmark = pytest.mark.slow


def _eval_line(stdout: str) -> float:
    return float(re.search(r"top1 ([\d.]+)%", stdout).group(1))


@pytest.fixture(scope="module")
def ema_run(tiny_shards, tmp_path_factory):
    """Issue 23's run: EMA 0.9, best checkpoint judged on eval_ema/top1, 30 steps, eval and save every 10."""
    out = tmp_path_factory.mktemp("lineage") / "ema"
    run(cli("train", "configs/test_tiny.yaml", f"data.train=[{tiny_shards}/train]", f"data.val={tiny_shards}/val",
            f"output_dir={out}", *TINY, "train.max_steps=30", "train.eval_every_steps=10",
            "checkpoint.every_steps=10", "checkpoint.keep_last=5", "train.ema_decay=0.9",
            "checkpoint.best_metric=eval_ema/top1"))
    return out


def test_eval_scores_the_weights_the_run_chose_and_says_which(ema_run, tiny_shards):
    """Fault 1: 'tldist eval --checkpoint RUN' printed the raw weights' top-1 when the run chose the EMA."""
    result = json.loads((ema_run / "result.json").read_text())
    best = json.loads((ema_run / "checkpoints" / "best.json").read_text())
    last = ema_run / "checkpoints" / "step_00000030"
    base = ["eval", "configs/test_tiny.yaml", *TINY, f"data.val={tiny_shards}/val"]
    proc = run(cli(*base, "--checkpoint", str(ema_run)))
    assert f"weights: ema, step {best['step']}" in proc.stdout
    assert _eval_line(proc.stdout) == pytest.approx(result["best_top1"], abs=0.006)
    # a step dir: the same rule; --weights raw gives the raw weights' number; overrides may follow the flags
    proc = run(cli("eval", "configs/test_tiny.yaml", "--checkpoint", str(last), *TINY, f"data.val={tiny_shards}/val"))
    assert "weights: ema, step 30" in proc.stdout
    assert _eval_line(proc.stdout) == pytest.approx(result["eval_ema/top1"], abs=0.006)
    proc = run(cli(*base, "--checkpoint", str(last), "--weights", "raw"))
    assert "weights: raw, step 30" in proc.stdout
    assert _eval_line(proc.stdout) == pytest.approx(result["eval/top1"], abs=0.006)
    # predict names the weights it used, like every other command
    img = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img, format="PNG")
    (ema_run.parent / "x.png").write_bytes(img.getvalue())
    proc = run(cli("predict", str(ema_run), str(ema_run.parent / "x.png")))
    assert f"weights: ema, step {best['step']}" in proc.stderr


@pytest.fixture(scope="module")
def pruned_export(tiny_shards, tmp_path_factory):
    """A trained resnet18 export, then structurally pruned by 'tldist compress prune --structured'."""
    pytest.importorskip("torch_pruning")
    root = tmp_path_factory.mktemp("pruned")
    run(cli("train", "configs/test_tiny.yaml", f"data.train=[{tiny_shards}/train]", f"output_dir={root / 'base'}",
            *TINY, "train.max_steps=4"))
    run(cli("export", str(root / "base"), str(root / "export")))
    run(cli("compress", "prune", str(root / "export"), "--out", str(root / "pruned"), "--val", f"{tiny_shards}/val",
            "--structured", "--ratio", "0.5"))
    return root / "pruned"


def test_a_model_fine_tuned_from_a_pruned_export_can_be_exported_evaluated_and_taught_from(pruned_export, tiny_shards,
                                                                                          tmp_path):
    """Fault 2: every step_* of a run started from a pruned export records the pruned shapes; export, eval,
    distill.teacher and a resume without model.checkpoint rebuild it."""
    run_dir = tmp_path / "ft"
    train = ["train", "configs/test_tiny.yaml", f"data.train=[{tiny_shards}/train]", f"output_dir={run_dir}", *TINY,
             "checkpoint.every_steps=2"]
    run(cli(*train, f"model.checkpoint={pruned_export}", "train.max_steps=2"))
    record = json.loads((run_dir / "checkpoints" / "step_00000002" / "model.json").read_text())
    assert record["structured_pruning"]["modules"] == json.loads(
        (pruned_export / "model.json").read_text())["structured_pruning"]["modules"]
    # resumed without repeating model.checkpoint: the checkpoint's own record rebuilds the pruned model
    run(cli(*train, "train.max_steps=4"))
    assert json.loads((run_dir / "result.json").read_text())["step"] == 4
    run(cli("export", str(run_dir), str(tmp_path / "export")))
    assert "structured_pruning" in json.loads((tmp_path / "export" / "model.json").read_text())
    proc = run(cli("eval", "configs/test_tiny.yaml", *TINY, f"data.val={tiny_shards}/val", "--checkpoint",
                   str(run_dir / "checkpoints" / "step_00000004")))
    assert "(101 samples)" in proc.stdout
    run(cli("train", "configs/test_tiny.yaml", f"data.train=[{tiny_shards}/train]", f"output_dir={tmp_path / 'kd'}",
            *TINY, f"distill.teacher={run_dir}", "train.max_steps=2"))


def _one_line_exit_2(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "tldist.cli", *args], capture_output=True, text=True, env=env(),
                          cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_outputs_under_a_file_are_one_line(tiny_shards, tmp_path):
    """Fault 3: the output check looked at the path, not at its parents (NotADirectoryError tracebacks)."""
    afile = tmp_path / "results.csv"
    afile.write_text("x")
    err = _one_line_exit_2("study", "configs/test_tiny.yaml", f"data.train=[{tiny_shards}/train]",
                           f"data.val={tiny_shards}/val", "--out", str(afile))
    assert str(afile) in err
    err = _one_line_exit_2("shards", "subset", str(tiny_shards / "train"), str(afile / "sub"), "-k", "1")
    assert f"'{afile}' is a file" in err
    err = _one_line_exit_2("train", "configs/test_tiny.yaml", f"data.train=[{tiny_shards}/train]", *TINY,
                           f"output_dir={afile / 'run'}")
    assert f"'{afile}' is a file" in err
    err = _one_line_exit_2("export", str(tmp_path / "nope"), str(afile / "x"))  # the output first: before W&B
    assert f"'{afile}' is a file" in err
    err = _one_line_exit_2("export", str(tmp_path / "nope"), str(tmp_path / "x"))
    assert "nope" in err


def test_a_stray_word_after_the_flags_is_named(tmp_path):
    err = _one_line_exit_2("eval", "configs/test_tiny.yaml", "--checkpoint", str(tmp_path), "oops")
    assert "unrecognized arguments: oops" in err and "key=value" in err


def test_odd_formats_are_kept_and_left_out_files_counted(tmp_path):
    """Fault 4: .pgm was silently left out, TIFF/PPM kept odd member names webdataset's "jpg;png" misses,
    and files left out were not counted."""
    import webdataset as wds

    root = tmp_path / "tree"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i, fmt in enumerate(("PNG", "PPM", "TIFF", "BMP")):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), np.uint8)).save(root / c / f"{i}.{fmt.lower()}", fmt)
        Image.fromarray(rng.integers(0, 255, (8, 8), np.uint8)).save(root / c / "g.pgm", "PPM")
        (root / c / "notes.txt").write_text("not an image")
    proc = run(cli("shards", "imagefolder", str(root), str(tmp_path / "out"), "--min-shards", "1"))
    assert "10 samples" in proc.stdout and "2 files left out: 2 not an image format (.txt)" in proc.stdout
    assert "re-encoded to a standard format" in proc.stdout
    manifest = json.loads((tmp_path / "out" / "train" / "manifest.json").read_text())
    assert manifest["meta"]["class_counts"] == [5, 5]
    dataset = wds.WebDataset(str(tmp_path / "out" / "train" / "train-000000.tar"), shardshuffle=False)
    got = list(dataset.decode("pil").to_tuple("jpg;png", "cls"))
    assert len(got) == 10 and sorted(c for _, c in got) == [0] * 5 + [1] * 5


def test_a_class_without_training_samples_is_named_at_train_start(tiny_shards, tmp_path):
    """Fault 4: a CSV with 1-based labels gets a class '0' no sample has; training names it when it starts."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        p = tmp_path / "img" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(p)
        rows.append(f"{p},{1 + i % 2}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    proc = run(cli("shards", "csv", str(tmp_path / "list.csv"), str(tmp_path / "out"), "--min-shards", "1"))
    assert "1 class(es) with no sample: 0" in proc.stdout
    proc = run(cli("train", "configs/test_tiny.yaml", f"data.train=[{tmp_path}/out/train]", *TINY,
                   f"output_dir={tmp_path / 'run'}", "train.max_steps=1"))
    assert re.search(r"1 class\(es\) of data.train have no training sample: 0\b", proc.stdout + proc.stderr)
