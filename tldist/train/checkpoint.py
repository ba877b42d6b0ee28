"""Atomic, resumable checkpoints behind one small interface.

Layout of ``<output_dir>/checkpoints/step_00000120/``:

- ``model.safetensors``  full (unsharded) model state dict, loadable without tldist;
- ``ema.safetensors``    with ``train.ema_decay`` > 0: the EMA of the weights, a full state dict with the
                         same keys (:mod:`tldist.train.ema`);
- ``optimizer.pt``       full optimizer state keyed by parameter name;
- ``state.pt``           scheduler and GradScaler state, per-rank loader positions and RNG states;
- ``trainer.json``       step, epoch, best metric, tracker run id, world size (human-readable);
- ``config.yaml``        the resolved job config;
- ``complete.json``      written last: every other member's name and size.

A checkpoint is written into ``.tmp-step_...`` and renamed into place; pruning renames a
directory to ``.trash-step_...`` before deleting it. A ``step_*`` directory counts as complete
only when ``complete.json`` lists members that all exist with those sizes, so a crash while
writing, re-saving or pruning never leaves a checkpoint that resume would pick and then fail on:
incomplete ones are skipped with a warning (:func:`is_complete`).

Nothing here is unpickled with arbitrary globals: ``optimizer.pt`` and ``state.pt`` hold only
tensors and plain Python data and are read with ``weights_only=True``
(:func:`tldist.safeload.load_pickle_free`); RNG states are stored as tensors and lists.
Full state dicts are gathered with ``torch.distributed.checkpoint.state_dict``, which handles
plain modules, DDP and FSDP2 alike.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

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
from tldist.safeload import load_pickle_free, read_json

log = logging.getLogger("tldist")

_STEP_DIR = re.compile(r"^step_(\d+)$")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
MEMBERS = ("model.safetensors", "optimizer.pt", "state.pt", "config.yaml", "trainer.json")
"""The files of a checkpoint directory besides the completion marker."""
MARKER = "complete.json"
"""Written last into a checkpoint: ``{"members": {name: size in bytes}}``."""


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a complete checkpoint: its marker lists members that all exist with
    the recorded sizes. Directories from before the marker existed count when every member
    of :data:`MEMBERS` is there."""
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        return all((path / m).is_file() for m in MEMBERS)
    try:
        members = json.loads(marker.read_text())["members"]
        return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in members.items())
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        return False


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
    """This process's RNG states (python, numpy, torch CPU and CUDA) as tensors and plain data,
    so that they load with ``weights_only=True``."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {"python": {"version": version, "internal": list(internal), "gauss": gauss},
             "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                       "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                       "gauss": float(np_state["gauss"])},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


_LEGACY_NUMPY = (np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)))
"""numpy array types (data, no code) that state.pt files written before RNG states became tensors hold."""


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (or the tuple form older checkpoints hold)."""
    py, n = state["python"], state["numpy"]
    if isinstance(py, tuple):  # written by tldist before the tensor form
        random.setstate(py)
        np.random.set_state(n)
        torch.set_rng_state(state["torch"])
        return
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype(np.uint32),
                                                               "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    """Finds, writes, loads and prunes the checkpoints of one run directory."""

    def __init__(self, root: str | Path, *, keep_last: int, is_main: bool):
        self.root = Path(root)
        self.keep_last = keep_last
        self.is_main = is_main
        self._warned: set[Path] = set()
        self.guard: Optional[Callable[[], None]] = None
        """Called on the main process before every write; raises to refuse it (e.g. the run's
        output-directory lock was taken over by another job: this process must not write)."""

    # ---- lookup ---------------------------------------------------------------------------
    def all_steps(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first; incomplete ``step_*`` directories are skipped with
        a warning (once per directory)."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if not m:
                continue
            if is_complete(p):
                found.append((int(m.group(1)), p))
            elif p not in self._warned:
                self._warned.add(p)
                log.warning("skipping incomplete checkpoint %s (a member is missing or truncated: the run was "
                            "killed while writing or deleting it); delete it to silence this warning", p)
        return sorted(found)

    def latest(self) -> Optional[Path]:
        steps = self.all_steps()
        return steps[-1][1] if steps else None

    def best(self) -> Optional[Path]:
        """The checkpoint with the best eval metric so far, if any was recorded."""
        f = self.root / "best.json"
        if not f.is_file():
            return None
        p = self.root / str(read_json(f, what="best-checkpoint record").get("dir", ""))
        return p if p.is_dir() and is_complete(p) else None

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
        if not is_complete(p):
            raise UserError(f"checkpoint.resume='{resume}' is an incomplete checkpoint (a member is missing or "
                            f"truncated); use 'auto' to take the newest complete one, or another step_* directory")
        return p

    # ---- save -----------------------------------------------------------------------------
    def save(self, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Any, trainer_state: dict[str, Any], loader_state: dict[str, Any],
             config_yaml: str, metric: Optional[float] = None, scaler: Any = None, ema: Any = None) -> Path:
        """Write checkpoint ``step`` atomically (call on every rank; rank 0 writes).

        ``scaler`` is the fp16 ``torch.amp.GradScaler`` (or None): its loss scale and growth
        tracker are saved so that a resumed fp16 run continues with the same scale. ``ema`` is the
        :class:`~tldist.train.ema.WeightEma` (or None), gathered like the model into ``ema.safetensors``.
        """
        model_sd = get_model_state_dict(model, options=_FULL)
        ema_sd = ema.full_state_dict() if ema is not None else None
        optim_sd = get_optimizer_state_dict(model, optimizer, options=_FULL)
        loaders = gather_objects(loader_state)
        rngs = gather_objects(rng_state())
        final = self.root / f"step_{step:08d}"
        if self.is_main:
            if self.guard is not None:
                self.guard()
            tmp = self.root / f".tmp-step_{step:08d}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in model_sd.items()}, str(tmp / "model.safetensors"))
            members = MEMBERS
            if ema_sd is not None:
                save_file({k: v.contiguous() for k, v in ema_sd.items()}, str(tmp / "ema.safetensors"))
                members = (*MEMBERS, "ema.safetensors")
            torch.save(optim_sd, tmp / "optimizer.pt")
            torch.save({"scheduler": scheduler.state_dict(), "loaders": loaders, "rng": rngs,
                        "scaler": scaler.state_dict() if scaler is not None else None}, tmp / "state.pt")
            (tmp / "config.yaml").write_text(config_yaml)
            (tmp / "trainer.json").write_text(json.dumps({**trainer_state, "step": step}, indent=1))
            _fsync_dir(tmp)
            (tmp / MARKER).write_text(json.dumps({"members": {m: (tmp / m).stat().st_size for m in members}}))
            _fsync_dir(tmp, only=MARKER)
            if final.exists():  # re-saving the same step (e.g. end of run right after a periodic save)
                self._remove(final)
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
        """Keep the newest ``keep_last`` checkpoints and the best one (main process only); also
        clear what killed saves and prunes left behind."""
        best = self.best()
        steps = self.all_steps()
        for _, p in steps[: max(0, len(steps) - self.keep_last)]:
            if best is None or p.resolve() != best.resolve():
                self._remove(p)
        for p in self.root.glob(".trash-step_*"):
            shutil.rmtree(p, ignore_errors=True)

    def _remove(self, path: Path) -> None:
        """Delete a checkpoint directory so that no kill leaves a partial ``step_*`` behind:
        rename it out of the ``step_*`` namespace first (atomic), then delete."""
        trash = self.root / f".trash-{path.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    # ---- load -----------------------------------------------------------------------------
    def load(self, path: Path, *, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
             scheduler: Any, rank: int, scaler: Any = None, ema: Any = None) -> dict[str, Any]:
        """Restore model/optimizer/scheduler/GradScaler/RNG (and the EMA of the weights, when ``ema``
        is given) from ``path`` (call on every rank).

        A checkpoint without ``ema.safetensors`` (saved with EMA off) starts the EMA from its weights,
        with a warning; with ``ema`` None an ``ema.safetensors`` is ignored.

        Every member is read without arbitrary unpickling; a crafted or corrupt member raises a
        one-line :class:`UserError` naming it before anything is restored from it.
        Returns ``{"trainer": trainer.json dict, "loader": this rank's loader state}``.
        """
        from safetensors.torch import load_file

        state = load_pickle_free(path / "state.pt", what="checkpoint member", allow=_LEGACY_NUMPY)
        optim_sd = load_pickle_free(path / "optimizer.pt", what="checkpoint member") if optimizer is not None else None
        try:
            trainer = json.loads((path / "trainer.json").read_text())
            weights = load_file(str(path / "model.safetensors"))
        except (ValueError, OSError) as e:  # safetensors raises SafetensorError (an Exception) too
            raise UserError(f"checkpoint '{path}' could not be read ({type(e).__name__}: {e})") from None
        except Exception as e:
            raise UserError(f"checkpoint member '{path / 'model.safetensors'}' could not be read "
                            f"({type(e).__name__}: {e})") from None
        if not isinstance(state, dict) or not {"scheduler", "loaders", "rng"} <= set(state):
            raise UserError(f"checkpoint member '{path / 'state.pt'}' is not a tldist state file "
                            "(expected scheduler, loaders and rng entries)")
        set_model_state_dict(model, weights, options=_FULL)
        if ema is not None:
            self._load_ema(path, ema)
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, optim_sd, options=_FULL)
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        if len(state["loaders"]) <= rank:
            raise UserError(f"checkpoint '{path}' was written by {len(state['loaders'])} processes; this job has "
                            f"more. Resume with the same number of processes ({trainer.get('world_size')}).")
        set_rng_state(state["rng"][rank])
        return {"trainer": trainer, "loader": state["loaders"][rank]}


    @staticmethod
    def _load_ema(path: Path, ema: Any) -> None:
        """Restore the EMA of checkpoint ``path``, or start it from the loaded weights (call on every rank)."""
        from safetensors.torch import load_file

        f = path / "ema.safetensors"
        if not f.is_file():
            log.warning("checkpoint %s holds no EMA of the weights (saved with train.ema_decay=0): the EMA starts "
                        "from its weights", path)
            ema.reset()
            return
        try:
            ema_sd = load_file(str(f))
        except Exception as e:  # safetensors raises SafetensorError (an Exception) too
            raise UserError(f"checkpoint member '{f}' could not be read ({type(e).__name__}: {e})") from None
        try:
            ema.load_full_state_dict(ema_sd)
        except (RuntimeError, KeyError, ValueError) as e:
            first = " ".join(str(e).split())[:200]
            raise UserError(f"checkpoint member '{f}' does not fit this model ({first}); resume with the model it "
                            "was saved from, or delete ema.safetensors to restart the EMA from the weights") from None


def _fsync_dir(path: Path, only: Optional[str] = None) -> None:
    """fsync every file of ``path`` (or just ``only``), then the directory entry itself."""
    for f in ([path / only] if only else path.iterdir()):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
