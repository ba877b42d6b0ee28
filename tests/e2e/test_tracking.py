"""W&B from a real offline run: what a user opens the dashboard for is really logged, and a
killed and resumed job uploads one row per step.

The runs' ``.wandb`` files are read back with wandb's own reader (tests/wandb_offline.py); nothing
is mocked.
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

from helpers import REPO
from wandb_offline import read_offline_run, read_segment, read_segments

pytestmark = pytest.mark.slow


def train(tiny_shards, out, *extra):
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "node[01-02]"}
    cmd = [sys.executable, "-m", "tldist.cli", "train", "configs/test_tiny.yaml", f"data.train=[{tiny_shards}/train]",
           f"data.val={tiny_shards}/val", f"output_dir={out}", "tracker.backend=wandb", "data.batch_size=8",
           "train.log_every_steps=2", "train.eval_every_steps=3", "data.num_workers=1", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


def test_offline_run_logs_what_the_dashboard_needs_and_resumes_same_run(tiny_shards, tmp_path):
    out = tmp_path / "run"
    first = train(tiny_shards, out, "train.max_steps=6")
    run = read_offline_run(out)
    assert run["run_ids"] == [first["tracker_run_id"]]
    keys = set().union(*run["history"])
    for key in ("train/loss", "train/lr", "train/images_per_s", "train/images_per_s_per_rank",
                "train/data_wait_frac", "train/grad_norm", "eval/top1", "eval/top5", "eval/loss",
                "eval/per_class_acc/c0", "eval/per_class_acc/c3", "checkpoint/step"):
        assert key in keys, key
    assert any(k.startswith("eval/confusion_matrix") for k in keys)
    assert "eval/predictions._type" in keys  # the sample-predictions table (with images)
    tables = list((out / "wandb").glob("offline-run-*/files/media/table/eval/predictions_*.table.json"))
    assert tables and json.loads(tables[0].read_text())["columns"][:3] == ["image", "key", "label"]
    cfg = run["config"]
    assert cfg["model"]["name"] == "mobilenet_v3_small" and cfg["data"]["batch_size"] == 8  # resolved config
    assert cfg["derived"]["world_size"] == 1 and cfg["derived"]["global_batch"] == 8
    assert cfg["slurm_job_id"] == "4242" and cfg["slurm_job_nodelist"] == "node[01-02]"
    assert len(cfg["git_commit"] or "") in (0, 40)
    assert cfg["data_sources"][0]["samples"] == 300 and cfg["data_sources"][0]["shards"] == 5
    steps = [h["_step"] for h in run["history"] if "train/loss" in h]
    assert steps == [2, 4, 6]

    # Resuming the same output dir (as a requeued job does) logs into the same run id.
    second = train(tiny_shards, out, "train.max_steps=8")
    assert second["tracker_run_id"] == first["tracker_run_id"]
    resumed = read_offline_run(out)
    assert set(resumed["run_ids"]) == {first["tracker_run_id"]}
    assert max(h["_step"] for h in resumed["history"]) == 8

    # checkpoint.resume=none in the same directory is a deliberate fresh start: a new W&B run, whose
    # first steps are logged (not skipped as already held by the old run's segments)
    third = train(tiny_shards, out, "train.max_steps=4", "checkpoint.resume=none")
    assert third["tracker_run_id"] != first["tracker_run_id"]
    fresh = [seg for seg in read_segments(out) if seg["run_id"] == third["tracker_run_id"]]
    assert len(fresh) == 1 and [h["_step"] for h in fresh[0]["history"] if "train/loss" in h] == [2, 4]


# ---- a killed and resumed job: one row per step in what `wandb sync` uploads ----------------------
KILL_RESUME = ["train.max_steps=200", "checkpoint.every_steps=10", "train.log_every_steps=1",
               "train.eval_every_steps=0", "data.samples_per_epoch=1600", "data.batch_size=8", "data.num_workers=1",
               "tracker.backend=wandb", "checkpoint.resume=auto"]


def latest_checkpoint(out: Path) -> int:
    """The step of the newest complete checkpoint (what checkpoint.resume=auto resumes from), 0 if none."""
    from tldist.artifacts.checkpoint import is_complete

    return max((int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*") if is_complete(p)), default=0)


def last_step(segment: Path) -> int:
    """The last history step a segment holds, as wandb's reader sees it (-1: none)."""
    return max((row["_step"] for row in read_segment(segment)["history"]), default=-1)


def run_attempt(cmd: list[str], env: dict, out: Path, log: Path, kill_when=None, on: str = "") -> tuple[Path, int, int]:
    """Run one attempt of the job; returns (its segment, the last step the segment holds, the latest
    checkpoint) at the kill, or at the end when ``kill_when`` is None.

    With ``kill_when(held, checkpoint)``: on each event ``on`` (``"block"``: wandb wrote another
    block of this attempt's segment; ``"checkpoint"``: a checkpoint completed, once the segment
    holds a block), stop the job (SIGSTOP), read the segment with wandb's reader, and SIGKILL the
    job if ``kill_when`` says so, else let it go on (SIGCONT).
    """
    earlier = set(out.glob("wandb/offline-run-*/run-*.wandb"))
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    seen, deadline = None, time.time() + 600
    try:
        while proc.poll() is None and kill_when is not None:
            assert time.time() < deadline, "the attempt never reached the wanted state"
            segment = next((p for p in out.glob("wandb/offline-run-*/run-*.wandb") if p not in earlier), None)
            size = segment.stat().st_size if segment else 0
            event = size // 32768 if on == "block" else latest_checkpoint(out) if size >= 32768 else None
            if not event or event == seen:
                time.sleep(0.02)
                continue
            seen = event
            os.killpg(proc.pid, signal.SIGSTOP)  # the job (wandb's service runs in its own process group)
            while size != segment.stat().st_size or size == 0:  # wandb finishes writing what it already got
                size = segment.stat().st_size
                time.sleep(0.2)
            held, ckpt = last_step(segment), latest_checkpoint(out)
            if kill_when(held, ckpt):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return segment, held, ckpt
            os.killpg(proc.pid, signal.SIGCONT)
        rc = proc.wait(timeout=max(1.0, deadline - time.time()))
        assert rc == 0 and kill_when is None, f"attempt exited {rc} before the wanted kill:\n{log.read_text()[-3000:]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    segment = next(p for p in out.glob("wandb/offline-run-*/run-*.wandb") if p not in earlier)
    return segment, last_step(segment), latest_checkpoint(out)


def test_killed_and_resumed_offline_run_syncs_one_row_per_step(tiny_shards, tmp_path):
    """200 steps, checkpoints every 10, killed twice with SIGKILL, resumed with checkpoint.resume=auto.

    Attempt 1 is killed when its segment holds steps past its last checkpoint: attempt 2 repeats
    those steps and must not log them again. Attempt 2 is killed right after a checkpoint that no
    segment holds yet (wandb writes offline logs in 32 KiB blocks): attempt 3 must log those steps
    from the row journal. Uploading the segments oldest first, as `wandb sync` does, then gives
    steps 1..200 exactly once.
    """
    out = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tldist.cli", "train", "configs/test_tiny.yaml", f"data.train=[{tiny_shards}/train]",
           f"data.val={tiny_shards}/val", f"output_dir={out}", *KILL_RESUME]

    seg1, held1, ckpt1 = run_attempt(cmd, env, out, tmp_path / "attempt1.log", on="block",
                                     kill_when=lambda held, ckpt: ckpt >= 50 and held > ckpt)
    print("attempt 1 killed: holds", held1, "checkpoint", ckpt1)
    assert 50 <= ckpt1 < held1 < 200  # attempt 2 resumes at ckpt1 and computes ckpt1+1..held1 again
    seg2, held2, ckpt2 = run_attempt(cmd, env, out, tmp_path / "attempt2.log", on="checkpoint",
                                     kill_when=lambda held, ckpt: held > held1 and ckpt > held)
    print("attempt 2 killed: holds", held2, "checkpoint", ckpt2)
    assert held1 < held2 < ckpt2 < 200  # steps held2+1..ckpt2 are in no segment: the journal has them
    seg3, held3, _ = run_attempt(cmd, env, out, tmp_path / "attempt3.log")
    assert held3 == 200

    segments = read_segments(out)  # the order `wandb sync` uploads them in: by start time
    assert [s["path"] for s in segments] == [seg1, seg2, seg3]
    assert len({s["run_id"] for s in segments}) == 1
    steps = [[row["_step"] for row in s["history"]] for s in segments]
    uploaded = [step for seg_steps in steps for step in seg_steps]
    twice = sorted({step for step in uploaded if uploaded.count(step) > 1})
    missing = sorted(set(range(1, 201)) - set(uploaded))
    assert not twice and not missing, f"logged more than once: {twice}; in no segment: {missing}"
    assert uploaded == list(range(1, 201))
    assert steps[1][0] == held1 + 1 and steps[2][0] == held2 + 1
    for row in segments[2]["history"][:ckpt2 - held2]:  # logged again from the journal: the scalars
        assert {"train/loss", "train/lr", "train/grad_norm"} <= set(row)
        assert "checkpoint/step" in row or row["_step"] % 10 or row["_step"] == ckpt2
    assert "eval/top1" in segments[2]["history"][-1] and "eval/predictions._type" in segments[2]["history"][-1]
    # tldist reads the transaction logs exactly as wandb does (the killed ones end mid-block)
    from tldist.train.tracking import history_steps

    for s, seg_steps in zip(segments, steps):
        assert list(history_steps(s["path"])) == seg_steps


READER_RUN = """
import sys, wandb
run = wandb.init(project="p", id="reader", mode="offline", dir=sys.argv[1],
                 settings=wandb.Settings(quiet=True, console="off"))
for s in range(1, 121):  # rows of ~0.5 KiB; every 40th with an 80 KB value (a record over three blocks)
    run.log({"x": s, "pad": "p" * 400, **({"big": "z" * 80000} if s % 40 == 0 else {})}, step=s)
run.finish()
"""


def test_transaction_log_reader_reads_what_wandb_reads(tmp_path):
    """tldist's reader of wandb's transaction logs (it decides which steps a resumed run skips)
    sees exactly the history rows wandb's own reader sees in a log cut at any point (what a kill
    leaves: a record cut off, a chunk header cut off, a block boundary), and stops at a corrupt
    chunk as `wandb sync` does."""
    from tldist.train.tracking import history_steps

    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-c", READER_RUN, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full = next(tmp_path.glob("wandb/offline-run-*/run-reader.wandb")).read_bytes()
    big = full.index(b"z" * 1000)

    def steps(data: bytes, name: str) -> tuple[list[int], list[int]]:
        cut = tmp_path / "cut" / name / "run-reader.wandb"
        cut.parent.mkdir(parents=True)
        cut.write_bytes(data)
        return list(history_steps(cut)), [row["_step"] for row in read_segment(cut)["history"]]

    mine, wandbs = steps(full, "full")
    assert mine == wandbs == list(range(1, 121))
    for at in (32768, 32768 + 3, 40000, big + 40000, len(full) - 1):
        mine, wandbs = steps(full[:at], f"cut{at}")
        assert mine == wandbs and mine == list(range(1, len(mine) + 1)), f"cut at byte {at}"
    # a corrupt chunk: wandb's reader skips to the next block, but `wandb sync` stops there
    # (core/internal/runsync/runreader.go), so tldist counts the rows before it only
    corrupt = tmp_path / "corrupt.wandb"
    corrupt.write_bytes(full[:40000] + bytes([full[40000] ^ 0xFF]) + full[40001:])
    assert list(history_steps(corrupt)) == steps(full[:40000], "c")[1]
