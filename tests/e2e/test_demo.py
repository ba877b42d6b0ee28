"""``tldist demo --quick`` (the CI path) in a real process: shards, 2-process pretraining, then a study."""

from __future__ import annotations

from tldist.data.demo import DIGITS
from tldist.data.manifest import load_manifest


def test_demo_quick_runs_every_stage(tmp_path):
    """`tldist demo --quick` (the CI path): shards, 2-process pretraining, then a 2 x 2 x 1 study on the target."""
    import csv
    import json
    import subprocess
    import sys

    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "tldist.cli", "demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = out / "study"
    with open(study / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["arm"], r["labels_per_class"], r["seed"]) for r in rows} == {
        (arm, k, "0") for arm in ("finetune", "scratch") for k in ("1", "all")}
    assert all(0.0 <= float(r["top1"]) <= 100.0 for r in rows)
    # progress over the whole study (not a terminal: one line per finished run); each run's log in its own file
    assert "[demo] study: 4/4 runs done" in proc.stderr  # runs finishing together share a line
    assert all("done: step 4" in (study / "runs" / f"{a}-k{k}-seed0" / "train.log").read_text()
               for a in ("finetune", "scratch") for k in ("1", "all"))
    assert (study / "study.png").stat().st_size > 0
    summary = (study / "summary.md").read_text()
    assert "finetune" in summary and summary.strip() in proc.stdout  # the table is printed at the end
    result = json.loads((out / "demo_results.json").read_text())
    assert result["quick"] is True and len(result["rows"]) == 4 and result["source_top1"] is not None
    assert load_manifest(out / "shards" / "source" / "train").classes == DIGITS
