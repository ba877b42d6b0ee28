"""Atomic, resumable checkpoints behind one small interface.

Layout of ``<output_dir>/checkpoints/step_00000120/``:

- ``model.safetensors``  full (unsharded) model state dict, loadable without tldist;
- ``optimizer.pt``       full optimizer state keyed by parameter name;
- ``state.pt``           scheduler state plus per-rank loader positions and RNG states;
- ``trainer.json``       step, epoch, best metric, tracker run id, world size (human-readable);
- ``config.yaml``        the resolved job config.

A checkpoint is written into ``.tmp-step_...`` and renamed into place, so a crash never
leaves a half-written ``step_*`` directory; ``latest()`` only ever sees complete ones.
Full state dicts are gathered with ``torch.distributed.checkpoint.state_dict``, which handles
plain modules, DDP and FSDP2 alike.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from tldist.errors import UserError

_STEP_DIR = re.compile(r"^step_(\d+)$")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def gather_objects(obj: Any) -> list[Any]:
    """All ranks' ``obj`` in rank order (call on every rank)."""
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    """Finds, writes, loads and prunes the checkpoints of one run directory."""

    def __init__(self, root: str | Path, *, keep_last: int, is_main: bool):
        self.root = Path(root)
        self.keep_last = keep_last
        self.is_main = is_main

    # ---- lookup ---------------------------------------------------------------------------
    def all_steps(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / "trainer.json").is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Optional[Path]:
        steps = self.all_steps()
        return steps[-1][1] if steps else None

    def best(self) -> Optional[Path]:
        """The checkpoint with the best eval metric so far, if any was recorded."""
        f = self.root / "best.json"
        if not f.is_file():
            return None
        p = self.root / json.loads(f.read_text())["dir"]
        return p if p.is_dir() else None

    def resolve_resume(self, resume: str) -> Optional[Path]:
        """``auto`` -> latest or None; ``none`` -> None; otherwise an existing checkpoint dir."""
        if resume == "none":
            return None
        if resume == "auto":
            return self.latest()
        p = Path(resume)
        if not (p / "trainer.json").is_file():
            raise UserError(f"checkpoint.resume='{resume}' is not a checkpoint directory (no trainer.json); "
                            f"use 'auto', 'none' or a step_* directory under {self.root}")
        return p

    # ---- save -----------------------------------------------------------------------------
    def save(self, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Any, trainer_state: dict[str, Any], loader_state: dict[str, Any],
             config_yaml: str, metric: Optional[float] = None) -> Path:
        """Write checkpoint ``step`` atomically (call on every rank; rank 0 writes)."""
        model_sd = get_model_state_dict(model, options=_FULL)
        optim_sd = get_optimizer_state_dict(model, optimizer, options=_FULL)
        loaders = gather_objects(loader_state)
        rngs = gather_objects(rng_state())
        final = self.root / f"step_{step:08d}"
        if self.is_main:
            tmp = self.root / f".tmp-step_{step:08d}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in model_sd.items()}, str(tmp / "model.safetensors"))
            torch.save(optim_sd, tmp / "optimizer.pt")
            torch.save({"scheduler": scheduler.state_dict(), "loaders": loaders, "rng": rngs}, tmp / "state.pt")
            (tmp / "config.yaml").write_text(config_yaml)
            (tmp / "trainer.json").write_text(json.dumps({**trainer_state, "step": step}, indent=1))
            _fsync_dir(tmp)
            if final.exists():  # re-saving the same step (e.g. end of run right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            if metric is not None:
                self._write_json("best.json", {"dir": final.name, "step": step, "metric": metric})
            self._prune()
        if _distributed():
            dist.barrier()
        return final

    def _write_json(self, name: str, obj: dict) -> None:
        tmp = self.root / f".{name}.tmp"
        tmp.write_text(json.dumps(obj))
        os.replace(tmp, self.root / name)

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` checkpoints and the best one (main process only)."""
        best = self.best()
        steps = self.all_steps()
        for _, p in steps[: max(0, len(steps) - self.keep_last)]:
            if best is None or p.resolve() != best.resolve():
                shutil.rmtree(p, ignore_errors=True)

    # ---- load -----------------------------------------------------------------------------
    def load(self, path: Path, *, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
             scheduler: Any, rank: int) -> dict[str, Any]:
        """Restore model/optimizer/scheduler/RNG from ``path`` (call on every rank).

        Returns ``{"trainer": trainer.json dict, "loader": this rank's loader state}``.
        """
        from safetensors.torch import load_file

        set_model_state_dict(model, load_file(str(path / "model.safetensors")), options=_FULL)
        if optimizer is not None:
            optim_sd = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
            set_optimizer_state_dict(model, optimizer, optim_sd, options=_FULL)
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        trainer = json.loads((path / "trainer.json").read_text())
        if len(state["loaders"]) <= rank:
            raise UserError(f"checkpoint '{path}' was written by {len(state['loaders'])} processes; this job has "
                            f"more. Resume with the same number of processes ({trainer.get('world_size')}).")
        set_rng_state(state["rng"][rank])
        return {"trainer": trainer, "loader": state["loaders"][rank]}


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
