"""Knowledge distillation (``tldist distill`` / ``distill.teacher``) in real runs (2 processes == 1 process,
kill and resume exact, one-line errors) on tiny generated shards with a resnet18 teacher trained by the test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from helpers import accelerate_cmd, kill_at_step, make_shard_set, run

TEACHER = ["model.name=resnet18", "model.pretrained=false", "data.image_size=16", "data.batch_size=16",
           "data.num_workers=1", "data.shuffle_buffer=64", "data.hflip=false", "optim.name=adamw", "optim.lr=0.003",
           "optim.lr_ref_batch=16", "train.log_every_steps=5", "tracker.backend=none"]
# The student: resnet18 (no dropout, so ranks draw nothing of their own) at 24 px while the teacher sees 16 px.
STUDENT = ["model.name=resnet18", "model.pretrained=false", "data.image_size=24", "data.batch_size=8",
           "data.shuffle_buffer=64", "data.hflip=false", "optim.name=sgd", "optim.lr=0.05", "optim.lr_ref_batch=16",
           "train.log_every_steps=3", "tracker.backend=none", "train.max_steps=8", "train.trace_samples=true",
           "checkpoint.every_steps=2", "checkpoint.keep_last=8", "distill.temperature=3", "distill.alpha=0.7"]


def cli(*args: str, processes: int = 1, accelerate_config: str = "cpu.yaml") -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "tldist.cli", *args]
    return accelerate_cmd(accelerate_config, *args, processes=processes)


def weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    from helpers import checkpoint_weights

    return checkpoint_weights(out / "checkpoints" / f"step_{step:08d}")


def trace(out: Path, rank: int) -> dict[int, list[str]]:
    steps: dict[int, list[str]] = {}
    for line in (out / "trace" / f"rank{rank}.jsonl").read_text().splitlines():
        rec = json.loads(line)
        steps[rec["step"]] = rec["keys"]  # a resumed run re-does the steps after its checkpoint: last wins
    return steps


# ------------------------------------------------------------------------------------------ real runs

@pytest.fixture(scope="module")
def work(tiny_shards, tmp_path_factory):
    """A resnet18 teacher (16 px) trained briefly on the tiny shards, and a 1-process distillation run
    of a resnet18 student (24 px; 2 loader workers, grad_accum 2) as the reference."""
    root = tmp_path_factory.mktemp("distill")
    run(cli("train", "configs/test_tiny.yaml", f"data.train=[{tiny_shards}/train]", f"data.val={tiny_shards}/val",
            f"output_dir={root}/teacher", "train.max_steps=20", *TEACHER))
    assert json.loads((root / "teacher" / "result.json").read_text())["best_top1"] > 40  # it learned something
    ref = root / "ref"
    proc = run(cli("distill", "configs/test_tiny.yaml", *student(tiny_shards, ref, root / "teacher"),
                   "data.num_workers=2", "train.grad_accum=2"))
    return {"root": root, "shards": tiny_shards, "teacher": root / "teacher", "ref": ref,
            "ref_log": proc.stdout + proc.stderr}


def student(shards: Path, out: Path, teacher: Path) -> list[str]:
    return [f"data.train=[{shards}/train]", f"data.val={shards}/val", f"output_dir={out}", f"distill.teacher={teacher}",
            *STUDENT]


@pytest.mark.slow
def test_two_processes_equal_one(work, tmp_path):
    """2 ranks x 1 worker x batch 8 read the same samples per step as 1 rank x 2 workers x 2 micro-batches
    of 8 (the same loader slots), so the distilled weights agree."""
    ref = work["ref"]
    assert "distill: teacher" in work["ref_log"] and "16 px" in work["ref_log"] and "24 px" in work["ref_log"]
    out = tmp_path / "two"
    run(cli("train", "configs/test_tiny.yaml", *student(work["shards"], out, work["teacher"]), "data.num_workers=1",
            processes=2))  # `train` with distill.teacher is the same job as `distill`
    r1, r2 = json.loads((ref / "result.json").read_text()), json.loads((out / "result.json").read_text())
    assert r1["world_size"] == 1 and r2["world_size"] == 2 and r2["ranks_agree"] is True
    assert r1["step"] == r2["step"] == 8
    t1, t2a, t2b = trace(ref, 0), trace(out, 0), trace(out, 1)
    assert all(t1[k] == t2a[k] + t2b[k] for k in t1) and len(t1) == 8  # the same samples in every step
    w1, w2 = weights(ref, 8), weights(out, 8)
    params = [k for k in w1 if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    for k in params:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    record = json.loads((ref / "checkpoints" / "step_00000008" / "model.json").read_text())["distill"]
    assert record["alpha"] == 0.7 and record["temperature"] == 3.0 and Path(record["teacher"]).name.startswith("step_")


@pytest.mark.slow
def test_the_teacher_changes_the_result(work, tmp_path):
    """The same run without distill.teacher reads the same batches but ends with other weights."""
    ref, plain = work["ref"], tmp_path / "plain"
    run(cli("train", "configs/test_tiny.yaml", *student(work["shards"], plain, work["teacher"]), "data.num_workers=2",
            "train.grad_accum=2", "distill.teacher=null"))
    assert trace(plain, 0) == trace(ref, 0)
    wp, w1 = weights(plain, 8), weights(ref, 8)
    params = [k for k in w1 if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert any(not torch.allclose(wp[k], w1[k], rtol=1e-3, atol=1e-4) for k in params)


@pytest.mark.slow
def test_fsdp2_shards_the_student_and_keeps_a_full_teacher(work, tmp_path):
    out = tmp_path / "fsdp"
    run(cli("distill", "configs/test_tiny.yaml", *student(work["shards"], out, work["teacher"]), "data.num_workers=1",
            "train.max_steps=2", "train.trace_samples=false", "train.fsdp_block=BasicBlock", processes=2,
            accelerate_config="fsdp.yaml"))
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["sharded_params"] is True and result["step"] == 2


@pytest.mark.slow
def test_kill_and_resume_is_exact(work, tmp_path):
    """kill -9 a distillation run mid-way and resume it: the same batches and bitwise the same weights as
    the uninterrupted reference run."""
    out = tmp_path / "killed"
    args = student(work["shards"], out, work["teacher"]) + ["data.num_workers=2", "train.grad_accum=2"]
    done = kill_at_step(cli("distill", "configs/test_tiny.yaml", *args), out, 5)
    assert 5 <= done < 8, f"kill landed at step {done}"
    run(cli("distill", "configs/test_tiny.yaml", *args))
    ref = work["ref"]
    a, b = json.loads((ref / "result.json").read_text()), json.loads((out / "result.json").read_text())
    assert a["step"] == b["step"] == 8 and a["param_checksum"] == b["param_checksum"]
    assert trace(ref, 0) == trace(out, 0)
    wa, wb = weights(ref, 8), weights(out, 8)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ after resume"


@pytest.mark.slow
def test_teacher_outputs_follow_the_class_names(work):
    """A teacher whose classes come in another order than the data's: its logits are reordered by name."""
    from tldist.artifacts.resolve import load_model
    from tldist.config import DistillConfig
    from tldist.train.distill import build_distiller

    classes = ["c2", "c0", "c3", "c1"]
    d = build_distiller(DistillConfig(teacher=str(work["teacher"])), classes, torch.device("cpu"),
                        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), image_size=16)
    assert not d.teacher.training and not any(p.requires_grad for p in d.teacher.parameters())
    x = torch.randn(2, 3, 16, 16)
    own = load_model(work["teacher"]).model(x).detach()
    torch.testing.assert_close(d.teacher_logits(x), own[:, [2, 0, 3, 1]])
    assert build_distiller(DistillConfig(), classes, "cpu", mean=(0, 0, 0), std=(1, 1, 1), image_size=16) is None


@pytest.mark.slow
def test_bad_input_is_one_clear_line(work, tmp_path, capsys):
    from tldist.cli import main

    make_shard_set(tmp_path / "six", split="train", n=24, shards=1, num_classes=6, seed=3)
    teacher, base = str(work["teacher"]), ["configs/test_tiny.yaml", f"output_dir={tmp_path}/o", *STUDENT]
    cases = [
        (["distill", *base, f"data.train=[{work['shards']}/train]"], "tldist distill needs a teacher"),
        (["distill", *base, f"data.train=[{work['shards']}/train]", f"distill.teacher={tmp_path}/nope"],
         f"config key 'distill.teacher' has bad value '{tmp_path}/nope': it does not exist"),
        (["distill", *base, f"data.train=[{work['shards']}/train]", f"distill.teacher={work['shards']}"],
         "config key 'distill.teacher'"),  # a directory that is no checkpoint, run or export
        (["distill", *base, f"data.train=[{tmp_path}/six]", f"distill.teacher={teacher}"],
         f"distill.teacher '{teacher}' was trained on other classes than data.train: teacher only [], "
         "data only [c4, c5]"),
        (["distill", *base, f"data.train=[{work['shards']}/train]", f"distill.teacher={teacher}", "distill.alpha=1.5"],
         "config key 'distill.alpha' has bad value 1.5"),
        (["distill", *base, f"data.train=[{work['shards']}/train]", f"distill.teacher={teacher}",
          "distill.temperature=0"], "config key 'distill.temperature' has bad value 0"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("tldist: error: ") and "\n" not in err and message in err, (argv, err)
