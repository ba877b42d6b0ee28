"""End-to-end training on tiny generated shards, with real processes.

Multi-process runs go through ``accelerate launch`` with the project's CPU config, exactly as a
user would start them; each test asserts the job really had 2 ranks that agree.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, make_shard_set, serve_http

pytestmark = pytest.mark.slow

BASE = [
    "model.pretrained=false", "data.image_size=16", "data.batch_size=8",
    "data.num_workers=2", "data.shuffle_buffer=64", "data.hflip=false", "optim.lr=0.05", "optim.lr_ref_batch=16",
    "train.log_every_steps=2", "tracker.backend=none",
]


def tldist_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tldist.cli", *args]


def accelerate_cmd(config: str, *args: str, processes: int = 2) -> list[str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs/accelerate" / config),
            "--num_processes", str(processes), "--main_process_port", str(port), "-m", "tldist.cli", *args]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}


def run(cmd, timeout=240, check=True):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}")
    return proc


def overrides(shards: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.train=[{shards}/train]", f"data.val={shards}/val", f"output_dir={out}", *BASE, *extra]


def read_trace(out: Path, rank: int) -> dict[int, list[str]]:
    steps: dict[int, list[str]] = {}
    for line in (out / "trace" / f"rank{rank}.jsonl").read_text().splitlines():
        rec = json.loads(line)
        steps[rec["step"]] = rec["keys"]  # a resumed run re-does steps after its checkpoint: last wins
    return steps


def test_ddp_two_processes_uneven_shards(tiny_shards, tmp_path):
    """5 shards over 2 ranks x 2 workers: no hang, every val sample scored exactly once."""
    out = tmp_path / "run"
    proc = run(accelerate_cmd("cpu.yaml", "train", "configs/test_tiny.yaml", *overrides(tiny_shards, out, "train.epochs=2")))
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["ranks_agree"] is True
    assert result["eval/count"] == 101  # every val sample once (101 is odd: ranks get different counts)
    steps_per_epoch = 300 // (2 * 8)
    assert result["step"] == 2 * steps_per_epoch
    assert "steps_per_epoch=18" in proc.stdout
    assert (out / "checkpoints" / f"step_{result['step']:08d}" / "model.safetensors").is_file()


def test_resume_after_kill_matches_uninterrupted(tiny_shards, tmp_path):
    """Kill -9 a 2-process run mid-epoch, resume: same steps, same batches, same final weights."""
    extra = ["train.max_steps=14", "checkpoint.every_steps=3", "train.trace_samples=true", "checkpoint.keep_last=5"]
    ref = tmp_path / "ref"
    run(accelerate_cmd("cpu.yaml", "train", "configs/test_tiny.yaml", *overrides(tiny_shards, ref, *extra)))

    out = tmp_path / "killed"
    cmd = accelerate_cmd("cpu.yaml", "train", "configs/test_tiny.yaml", *overrides(tiny_shards, out, *extra))
    proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    trace = out / "trace" / "rank0.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline:
        if trace.is_file() and len(trace.read_text().splitlines()) >= 7:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(trace.read_text().splitlines())
    assert 7 <= done < 14, f"kill landed at step {done}"
    run(accelerate_cmd("cpu.yaml", "train", "configs/test_tiny.yaml", *overrides(tiny_shards, out, *extra)))

    a, b = json.loads((ref / "result.json").read_text()), json.loads((out / "result.json").read_text())
    assert a["step"] == b["step"] == 14
    for rank in (0, 1):
        assert read_trace(ref, rank) == read_trace(out, rank)
    assert a["param_checksum"] == b["param_checksum"]
    from safetensors.torch import load_file

    wa = load_file(str(ref / "checkpoints" / "step_00000014" / "model.safetensors"))
    wb = load_file(str(out / "checkpoints" / "step_00000014" / "model.safetensors"))
    assert all((wa[k] == wb[k]).all() for k in wa), "weights differ after resume"


def test_fsdp2_on_cpu_really_shards(tiny_shards, tmp_path):
    out = tmp_path / "fsdp"
    run(accelerate_cmd("fsdp.yaml", "train", "configs/test_tiny.yaml",
                       *overrides(tiny_shards, out, "train.max_steps=4", "train.fsdp_block=InvertedResidual")))
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["sharded_params"] is True
    assert result["eval/count"] == 101
    # the full (gathered) checkpoint loads into a plain model
    proc = run(tldist_cmd("eval", "configs/test_tiny.yaml", *overrides(tiny_shards, tmp_path / "e"),
                          "--checkpoint", str(out / "checkpoints" / "step_00000004")))
    assert f"{result['eval/top1']:.2f}%" in proc.stdout


def test_single_process_train_eval_export_predict(tiny_shards, tmp_path):
    out = tmp_path / "single"
    # resnet18: torchvision's mobilenet_v3 uses BN momentum 0.01, too slow for 100 steps of running stats
    run(tldist_cmd("train", "configs/test_tiny.yaml", *overrides(tiny_shards, out, "train.epochs=3", "model.name=resnet18",
                                                                   "data.train_crop_scale=[0.5,1.0]",
                                                                   "transfer.layer_decay=0.7")))
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 1
    assert result["best_top1"] > 50.0, result  # 4 easy classes: far above the 25% of chance
    proc = run(tldist_cmd("eval", "configs/test_tiny.yaml", *overrides(tiny_shards, tmp_path / "e"), "model.name=resnet18",
                          "--checkpoint", str(out / "checkpoints" / json.loads(
                              (out / "checkpoints" / "best.json").read_text())["dir"])))
    assert f"top1 {result['best_top1']:.2f}%" in proc.stdout
    run(tldist_cmd("export", str(out), str(tmp_path / "export")))
    meta = json.loads((tmp_path / "export" / "model.json").read_text())
    assert meta["classes"] == ["c0", "c1", "c2", "c3"] and meta["preprocess"]["image_size"] == 16
    import numpy as np

    from conftest import tiny_image

    img = tmp_path / "x.png"
    img.write_bytes(tiny_image(2, np.random.default_rng(5)))
    proc = run(tldist_cmd("predict", str(tmp_path / "export"), str(img)))
    assert proc.stdout.startswith(str(img)) and " c" in proc.stdout


# ---- bad input: one clear line, exit status 2, no traceback ---------------------------------------

@pytest.mark.parametrize("extra,message", [
    (["data.train=[/nonexistent/shards]"], "no manifest at '/nonexistent/shards'"),
    (["optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
    (["model.num_classes=7"], "'model.num_classes' is 7 but data.train"),
    (["transfer.strategy=partial"], "transfer.strategy"),
])
def test_bad_input_is_one_clear_line(tiny_shards, tmp_path, extra, message):
    proc = run(tldist_cmd("train", "configs/test_tiny.yaml", *overrides(tiny_shards, tmp_path / "bad"), *extra),
               check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_shard_file_is_named(tmp_path):
    make_shard_set(tmp_path / "train", split="train", n=40, shards=2)
    (tmp_path / "train" / "train-000001.tar").unlink()
    proc = run(tldist_cmd("train", "configs/test_tiny.yaml", f"data.train=[{tmp_path}/train]",
                          f"output_dir={tmp_path}/o", *BASE), check=False, timeout=120)
    assert proc.returncode == 2 and "train-000001.tar" in proc.stderr and "Traceback" not in proc.stderr


def corrupt_member(shard: Path, key: str) -> None:
    """Rewrite ``shard`` with the JPEG of sample ``key`` replaced by garbage bytes."""
    import io
    import tarfile

    with tarfile.open(shard) as tf:
        members = [(ti, tf.extractfile(ti).read() if ti.isfile() else None) for ti in tf.getmembers()]
    with tarfile.open(shard, "w") as tf:
        for ti, data in members:
            if ti.name == f"{key}.jpg":
                data = data[:20] + b"\x00garbage" * 10
                ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def test_corrupt_jpeg_is_skipped_and_counted(tmp_path):
    """A corrupt JPEG inside a shard: training finishes, the sample is skipped and reported."""
    m = make_shard_set(tmp_path / "train", split="train", n=64, shards=2, fmt="JPEG")
    corrupt_member(tmp_path / "train" / m.shards[0].name, "strain00004")
    out = tmp_path / "o"
    proc = run(tldist_cmd("train", "configs/test_tiny.yaml", f"data.train=[{tmp_path}/train]", f"output_dir={out}",
                          *BASE, "data.num_workers=0", "train.max_steps=6", "data.max_skip_fraction=0.5"))
    assert "strain00004" in proc.stdout + proc.stderr  # the warning names the sample
    result = json.loads((out / "result.json").read_text())
    assert result["step"] == 6 and result["data_skipped"] == 1


def test_training_over_http_with_faults(tmp_path):
    """Shards served by a real local web server, one sample corrupt and one shard truncated: the run
    finishes, names both faults, and counts and trains exactly as it does from local disk."""
    import tarfile

    m = make_shard_set(tmp_path / "shards" / "train", split="train", n=60, shards=3, fmt="JPEG")
    corrupt_member(tmp_path / "shards" / "train" / m.shards[0].name, "strain00003")
    cut = tmp_path / "shards" / "train" / m.shards[2].name  # samples 40..59; cut inside sample 50's image
    with tarfile.open(cut) as tf:
        offset = next(ti for ti in tf.getmembers() if ti.name == "strain00050.jpg").offset_data
    cut.write_bytes(cut.read_bytes()[:offset + 10])
    results, logs = {}, {}
    with serve_http(tmp_path / "shards") as url:
        for name, location in [("local", f"{tmp_path}/shards/train"), ("http", f"{url}/train")]:
            out = tmp_path / name
            proc = run(tldist_cmd("train", "configs/test_tiny.yaml", f"data.train=[{location}]", f"output_dir={out}",
                                  *BASE, "data.num_workers=1", "train.max_steps=10", "data.max_skip_fraction=0.5"))
            results[name], logs[name] = json.loads((out / "result.json").read_text()), proc.stdout + proc.stderr
    http_run, local_run = results["http"], results["local"]
    assert http_run["step"] == 10 and http_run["data_skipped"] >= 10  # the truncated tail, at least once
    assert (http_run["data_read"], http_run["data_skipped"]) == (local_run["data_read"], local_run["data_skipped"])
    assert http_run["param_checksum"] == local_run["param_checksum"]  # the very same samples, in the same order
    assert m.shards[2].name in logs["http"] and "strain00003" in logs["http"]
