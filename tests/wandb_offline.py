"""Read back what offline W&B runs wrote, with wandb's own reader.

Each attempt of a job writes one segment, ``<output_dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb``.
``wandb leet inspect --json`` prints its records with wandb-core's transaction-log reader (the
one ``wandb sync`` uploads with: it stops at a record cut off by a kill). History items of a
nested value are flattened with ``.`` (``eval/predictions._type``).
"""

from __future__ import annotations

import glob
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

# raw serialized records of one .wandb file (helpers.wandb_runs reads the run record with it)
from tldist.train.tracking import transaction_log_records as _records  # noqa: F401


def _wandb_cli() -> list[str]:
    exe = Path(sys.executable).with_name("wandb")
    return [str(exe)] if exe.is_file() else [shutil.which("wandb") or "wandb"]


def read_segment(path: str | Path) -> dict:
    """One ``.wandb`` file: ``{"path", "run_id", "start_time", "history": [row dict per history
    record, in file order], "config": {key: value}, "summary": {key: value}}``."""
    proc = subprocess.run([*_wandb_cli(), "leet", "inspect", "--json", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"wandb leet inspect failed on {path}: {proc.stderr[-2000:]}"
    seg: dict = {"path": Path(path), "run_id": None, "start_time": "", "history": [], "config": {}, "summary": {}}
    for line in proc.stdout.splitlines():
        rec = json.loads(line)
        kind = rec["type"]
        if kind == "run":
            seg["run_id"], seg["start_time"] = rec["run"]["run_id"], rec["run"].get("start_time", "")
            seg["config"].update(rec["run"].get("config", {}).get("update", {}))
        elif kind == "history":
            seg["history"].append(rec["history"].get("item", {}))
        elif kind == "config":
            seg["config"].update(rec["config"].get("update", {}))
        elif kind == "summary":
            seg["summary"].update(rec["summary"].get("update", {}))
    return seg


def _start_key(start_time: str) -> tuple[str, float]:
    """RFC 3339 ``2026-11-30T11:17:29.891635Z`` -> a sort key (fractions have varying length)."""
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?", start_time)
    return (m.group(1), float(m.group(2) or 0)) if m else (start_time, 0.0)


def read_segments(output_dir: str | Path) -> list[dict]:
    """Every offline segment under ``output_dir/wandb`` (:func:`read_segment`), in the order
    ``wandb sync`` uploads the segments of one run: by the run's start time."""
    files = glob.glob(str(Path(output_dir) / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert files, f"no offline W&B run under {output_dir}/wandb"
    return sorted((read_segment(f) for f in files), key=lambda s: _start_key(s["start_time"]))


def read_offline_run(output_dir: str | Path) -> dict:
    """All segments merged as a sync uploads them: ``{"run_ids": [one per segment], "history":
    [rows, segment after segment], "config": {...}, "summary": {...}}`` (later segments win)."""
    out: dict = {"run_ids": [], "history": [], "config": {}, "summary": {}}
    for seg in read_segments(output_dir):
        out["run_ids"].append(seg["run_id"])
        out["history"] += seg["history"]
        out["config"].update(seg["config"])
        out["summary"].update(seg["summary"])
    return out
