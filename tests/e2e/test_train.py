"""End-to-end training on tiny generated shards, with real processes.

Multi-process runs go through ``accelerate launch`` with the project's CPU config, exactly as a
user would start them; each test asserts the job really had 2 ranks that agree.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import (
    BASE,
    REPO,
    accelerate_cmd,
    checkpoint_weights,
    env,
    kill_at_step,
    make_shard_set,
    overrides,
    read_trace,
    run,
    serve_http,
    shards_with_corrupt_rank1_shards,
    tldist_cmd,
)

pytestmark = pytest.mark.slow


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
    assert (out / "checkpoints" / f"step_{result['step']:08d}" / "complete.json").is_file()


def test_resume_after_kill_matches_uninterrupted(tiny_shards, tmp_path):
    """Kill -9 a 2-process run mid-epoch, resume: same steps, same batches, same final weights."""
    extra = ["train.max_steps=14", "checkpoint.every_steps=3", "train.trace_samples=true", "checkpoint.keep_last=5"]
    ref = tmp_path / "ref"
    run(accelerate_cmd("cpu.yaml", "train", "configs/test_tiny.yaml", *overrides(tiny_shards, ref, *extra)))

    out = tmp_path / "killed"
    cmd = accelerate_cmd("cpu.yaml", "train", "configs/test_tiny.yaml", *overrides(tiny_shards, out, *extra))
    done = kill_at_step(cmd, out, 7)
    assert 7 <= done < 14, f"kill landed at step {done}"
    run(accelerate_cmd("cpu.yaml", "train", "configs/test_tiny.yaml", *overrides(tiny_shards, out, *extra)))

    a, b = json.loads((ref / "result.json").read_text()), json.loads((out / "result.json").read_text())
    assert a["step"] == b["step"] == 14
    for rank in (0, 1):
        assert read_trace(ref, rank) == read_trace(out, rank)
    assert a["param_checksum"] == b["param_checksum"]

    wa = checkpoint_weights(ref / "checkpoints" / "step_00000014")
    wb = checkpoint_weights(out / "checkpoints" / "step_00000014")
    assert all((wa[k] == wb[k]).all() for k in wa), "weights differ after resume"


def test_fsdp2_on_cpu_really_shards(tiny_shards, tmp_path):
    out = tmp_path / "fsdp"
    run(accelerate_cmd("fsdp.yaml", "train", "configs/test_tiny.yaml",
                       *overrides(tiny_shards, out, "train.max_steps=4", "train.fsdp_block=InvertedResidual")))
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["sharded_params"] is True
    assert result["eval/count"] == 101
    # param_checksum covers the whole model (every rank's shard), as under DDP: the saved full weights agree

    full = checkpoint_weights(out / "checkpoints" / "step_00000004")
    total = sum(float(t.double().sum()) for t in full.values() if t.is_floating_point())
    assert abs(result["param_checksum"] - total) <= 1e-6 * max(1.0, abs(total)), (result["param_checksum"], total)
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

    from helpers import tiny_image

    img = tmp_path / "x.png"
    img.write_bytes(tiny_image(2, np.random.default_rng(5)))
    proc = run(tldist_cmd("predict", str(tmp_path / "export"), str(img)))
    assert proc.stdout.startswith(str(img)) and " c" in proc.stdout


# ---- bad input: one clear line, exit status 2, no traceback ---------------------------------------

@pytest.mark.parametrize("extra,message", [
    (["data.train=[/nonexistent/shards]"], "data.train[0] '/nonexistent/shards': no manifest at"),
    (["optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
    (["model.num_classes=7"], "'model.num_classes' is 7 but data.train"),
    (["transfer.strategy=partial"], "transfer.strategy"),
    (["train.fsdp=true"], "train.fsdp=true needs a process group"),
    (["data.train=[a,"], "override 'data.train=[a,'"),
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


# ---- fail-safe: one failing rank ends the whole job, fast and with one message ----------------------

def run_failing(cmd: list[str], limit: float = 150) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.time()
    try:
        proc = run(cmd, timeout=limit, check=False)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the job hung: still running after {limit} s") from None
    return proc, time.time() - t0


def test_data_fault_on_one_rank_stops_every_rank_together(tmp_path):
    """One corrupt shard read only by rank 1: its skip fraction crosses data.max_skip_fraction; the ranks
    agree on it at the next step and every rank exits with status 2; the DataError is printed once."""
    train = shards_with_corrupt_rank1_shards(tmp_path, [5])
    proc, _ = run_failing(accelerate_cmd("cpu.yaml", "train", "configs/test_tiny.yaml", f"data.train=[{train}]",
                                         f"output_dir={tmp_path}/o", *BASE, "data.num_workers=0",
                                         "train.max_steps=200"))
    assert proc.returncode != 0
    printed = [line for line in proc.stderr.splitlines() if line.startswith("tldist: error:")]
    assert len(printed) == 1 and "failed to load" in printed[0] and "on rank 1" in printed[0], proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr  # every rank left through the one-line error path
    assert "exitcode  : 1" not in proc.stderr and "SIGABRT" not in proc.stderr


def rank_pid(launcher_pid: int, rank: int) -> int:
    """The pid of the process with RANK=rank among the descendants of ``launcher_pid`` (the rank itself,
    not one of its DataLoader workers, which inherit its environment)."""
    children = {launcher_pid}
    parent: dict[int, int] = {}
    found = True
    while found:
        found = False
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                pid, ppid = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid in children and pid not in children:
                children.add(pid)
                parent[pid] = ppid
                found = True
    matches = set()
    for pid in children - {launcher_pid}:
        try:
            environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"LOCAL_RANK=%d" % rank in environ:
            matches.add(pid)
    for pid in matches:
        if parent[pid] not in matches:
            return pid
    raise AssertionError(f"no rank {rank} process under {launcher_pid}")


def test_interrupt_on_one_rank_ends_the_job_without_collectives(tiny_shards, tmp_path):
    """Ctrl-C (SIGINT) reaches rank 1 alone mid-training while rank 0 waits in DDP's all-reduce: rank 1
    leaves without entering a collective, rank 0's collective fails at once and it exits with one line
    saying why; the job ends in seconds, not at the collective timeout (600 s by default)."""
    out = tmp_path / "o"
    cmd = accelerate_cmd("cpu.yaml", "train", "configs/test_tiny.yaml",
                         *overrides(tiny_shards, out, "train.max_steps=5000", "train.trace_samples=true"))
    proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    trace = out / "trace" / "rank0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (trace.is_file() and len(trace.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    os.kill(rank_pid(proc.pid, 1), signal.SIGINT)
    t0 = time.time()
    try:
        _, stderr = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the job hung after one rank was interrupted") from None
    assert proc.returncode != 0 and time.time() - t0 < 90
    assert "exitcode  : 130" in stderr, stderr[-3000:]  # rank 1: KeyboardInterrupt, no collective
    # rank 0 reports the lost peer in one line, or the launcher ended it first
    assert "another process of this job failed" in stderr or "exitcode  : -15" in stderr
    assert stderr.count("Traceback (most recent call last)") == 1  # the launcher's own ChildFailedError only


PER_RANK_DRAWS = """
import json, sys, torch
from tldist.config import load_config
from tldist.train.main import build
cfg = load_config("configs/test_tiny.yaml", sys.argv[2:])
trainer = build(cfg)
mask = torch.nn.functional.dropout(torch.ones(64), p=0.5).tolist()
rank = trainer.parallel.world.rank
first = next(iter(trainer.train_loader))["key"]
out = {"mask": mask, "keys": first, "world": trainer.num_processes,
       "weights": float(sum(p.double().sum() for p in trainer.model.parameters()))}
open(sys.argv[1] + f"/rank{rank}.json", "w").write(json.dumps(out))
trainer.tracker.finish()
"""


def test_ranks_draw_different_dropout_masks_from_the_same_model(tiny_shards, tmp_path):
    """After build(), each rank's random stream is seed + rank (dropout, drop-path differ per rank),
    while the initial model is identical on every rank and the data order is unchanged."""
    script = tmp_path / "draws.py"
    script.write_text(PER_RANK_DRAWS)
    cmd = accelerate_cmd("cpu.yaml", "train")[:-3]  # the launcher part only
    run([*cmd, str(script), str(tmp_path), *overrides(tiny_shards, tmp_path / "o")])
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["mask"] != r1["mask"]
    assert r0["weights"] == r1["weights"]
    assert r0["keys"] != r1["keys"]  # each rank reads its own slots, as before


def test_log_lines_do_not_break_the_progress_bar_in_a_terminal(tiny_shards, tmp_path):
    """In a terminal the step bar is drawn on stderr and log lines go through tqdm.write: no log line
    is glued to a half-drawn bar (``...8.41step/s]10:58:07 INFO ...``)."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    cmd = tldist_cmd("train", "configs/test_tiny.yaml", *overrides(tiny_shards, tmp_path / "o", "train.max_steps=12",
                                                                   "data.num_workers=0", "train.log_every_steps=3"))
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env(), cwd=REPO)
    os.close(slave)
    out = b""
    deadline = time.time() + 180
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=60)
    os.close(master)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-2000:]
    assert "/12 [" in text  # the bar was drawn
    pieces = [p for line in text.replace("\r", "\n").split("\n") for p in [line]]
    glued = [p for p in pieces if ("INFO" in p or "WARNING" in p) and ("step/s]" in p or "s/step]" in p)]
    assert not glued, glued[:3]
    assert sum(" INFO step " in p for p in pieces) >= 4  # every log line made it out


def test_rerun_after_the_final_checkpoint_still_reports_the_final_eval(tiny_shards, tmp_path):
    """Killed after its last checkpoint but before result.json: the rerun resumes at the last step,
    runs no step, and must still report the (deterministic) final eval, not an empty result."""
    out = tmp_path / "final"
    args = tldist_cmd("train", "configs/test_tiny.yaml", *overrides(tiny_shards, out, "train.max_steps=4"))
    run(args)
    first = json.loads((out / "result.json").read_text())
    (out / "result.json").unlink()
    run(args)
    again = json.loads((out / "result.json").read_text())
    assert again["step"] == first["step"] == 4
    assert again["eval/top1"] == first["eval/top1"] and again["eval/loss"] == first["eval/loss"]
