"""`tldist demo`'s progress: one bar (or, without a terminal, one line per run) over the whole study, read
from the study's plan.json, its runs' result.json and train.log files and the stage's log; no training."""

from __future__ import annotations

import io
import json

CELLS = [f"{arm}-k1-seed{s}" for arm in ("finetune", "scratch") for s in range(2)]


def _study(tmp_path, done: int):
    study = tmp_path / "study"
    (study / "runs").mkdir(parents=True)
    (study / "plan.json").write_text(json.dumps({"cells": CELLS, "grid_cells": ["scratch-grid-k1-lr0.1-wu0"]}))
    for name in CELLS[:done]:
        _finish(study, name)
    return study


def _finish(study, name):
    (study / "runs" / name).mkdir(exist_ok=True)
    (study / "runs" / name / "result.json").write_text("{}")


def test_study_progress_one_after_another_reads_the_steps_from_the_study_log(tmp_path):
    from tldist.quickstart import Progress

    study = _study(tmp_path, done=2)
    log = tmp_path / "study.log"
    log.write_text(f"[study] {CELLS[2]}: 40 steps, lr 0.002, warm-up 4 -> x\n12:00:01 INFO step 20/40  loss 1.0\n"
                   "12:00:02 INFO step 30/4")  # an unfinished line is read next time
    out = io.StringIO()
    p = Progress("study", study, stream=out)
    p.poll(log)
    assert (p.total, p.done, p.running) == (5, 2, {CELLS[2]: 0.5})  # 4 cells + 1 scratch grid run
    assert "[demo] study: 2/5 runs done" in out.getvalue()  # not a terminal: one line per finished run
    with open(log, "a") as f:
        f.write("0\n")
    p.poll(log)
    assert p.running == {CELLS[2]: 0.75} and out.getvalue().count("runs done") == 1  # no new line
    _finish(study, CELLS[2])
    p.poll(log)
    assert (p.done, p.running) == (3, {}) and out.getvalue().count("runs done") == 2
    p.close()


def test_study_progress_with_jobs_reads_each_running_runs_own_log(tmp_path):
    from tldist.quickstart import RUN_LOG, Progress
    from tldist.study.runner import RUN_LOG as RUNNER_LOG

    assert RUN_LOG == RUNNER_LOG
    study = _study(tmp_path, done=3)
    for name, text in ((CELLS[3], "12:00:01 INFO step 10/40  loss 1.0\n"), ("scratch-grid-k1-lr0.1-wu0", "")):
        (study / "runs" / name).mkdir()
        (study / "runs" / name / RUN_LOG).write_text(text)
    log = tmp_path / "study.log"
    log.write_text(f"[study] {CELLS[3]}: 40 steps, lr 0.004, warm-up 4 -> x (log: train.log)\n")
    p = Progress("study", study, stream=io.StringIO())
    p.poll(log)
    assert (p.done, p.running) == (3, {CELLS[3]: 0.25, "scratch-grid-k1-lr0.1-wu0": 0.0})


def test_study_progress_draws_one_bar_on_a_terminal(tmp_path):
    from tldist.quickstart import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    study = _study(tmp_path, done=4)
    log = tmp_path / "study.log"
    log.write_text("[study] scratch-grid-k1-lr0.1-wu0: 40 steps\n12:00:01 INFO step 10/40  loss 1.0\n")
    out = Tty()
    p = Progress("study", study, stream=out)
    p.poll(log)
    assert p.bar is not None and abs(p.bar.n - 4.25) < 1e-9
    p.close()
    text = out.getvalue()
    assert "study 4/5 runs:  85%|" in text and ", running scratch-grid-k1-lr0.1-wu0]" in text


def test_pretraining_progress_reads_the_trainers_step_lines(tmp_path):
    from tldist.quickstart import Progress

    log = tmp_path / "pretrain.log"
    log.write_text("12:00:00 INFO step 20/80  loss 2.0  lr 0.001\n")
    out = io.StringIO()
    p = Progress("pretrain", stream=out)
    p.poll(log)
    assert (p.done, p.total) == (20, 80) and "20/80 steps done" in out.getvalue()
    with open(log, "a") as f:
        f.write("12:00:09 INFO step 30/80  loss 1.0\n")
    p.poll(log)  # same quarter: no new line
    assert out.getvalue().count("steps done") == 1
