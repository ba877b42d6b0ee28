"""Read back what an offline W&B run wrote, from its ``run-<id>.wandb`` file.

wandb 0.31 ships no Python reader for these files (its reader moved into wandb-core), so this
decodes the documented container (a LevelDB-style log: 32 KiB blocks, 7-byte record headers,
FULL/FIRST/MIDDLE/LAST chunks) and parses each record with wandb's own protobuf ``Record``.
"""

from __future__ import annotations

import glob
import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7  # crc32 (4) + length (2) + type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, chunks = 7, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            chunks = payload
        elif kind == MIDDLE:
            chunks += payload
        elif kind == LAST:
            yield chunks + payload
            chunks = b""


def read_offline_run(output_dir: str | Path) -> dict:
    """``{"run_ids", "history": [dict per log call], "config": {key: value}, "summary": {...}}``."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(glob.glob(str(Path(output_dir) / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert files, f"no offline W&B run under {output_dir}/wandb"
    out: dict = {"run_ids": [], "history": [], "config": {}, "summary": {}}
    for f in files:
        for raw in _records(Path(f)):
            rec = pb.Record()
            rec.ParseFromString(raw)
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                out["run_ids"].append(rec.run.run_id)
                for u in rec.run.config.update:
                    out["config"][u.key or "/".join(u.nested_key)] = json.loads(u.value_json)
            elif kind == "history":
                out["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                       for i in rec.history.item})
            elif kind == "config":
                for u in rec.config.update:
                    out["config"][u.key or "/".join(u.nested_key)] = json.loads(u.value_json)
            elif kind == "summary":
                for u in rec.summary.update:
                    out["summary"][u.key or "/".join(u.nested_key)] = json.loads(u.value_json)
    return out
