"""Atomic, resumable, sharded checkpoints of everything a run holds, behind one small interface.

The manager is built once with the run's stateful pieces (torchtitan's checkpointer)::

    ckpt = CheckpointManager(run.checkpoints, states={"model": ModelState(model), "optimizer":
                             OptimizerState(model, opt), "scheduler": sched, "loader": loader, "rng": RngState(),
                             **features}, keep_last=2, is_main=rank == 0, config_yaml=..., model_record=...)
    ckpt.save(step, trainer={...}, metric=top1)      # every rank
    trainer = ckpt.load(path)                       # every rank: restores every state in place
    ckpt.close()                                    # every rank: waits for an asynchronous save

Each state is an object with ``state_dict()``/``load_state_dict()``. How it is stored follows from what it is:

- a **sharded** state (``sharded_state_dict()``/``load_sharded_state_dict()``: model, optimizer, EMA) is
  written with ``torch.distributed.checkpoint`` (DCP): every rank writes its own shards (FSDP2) or, for
  replicated tensors (DDP), one rank writes each, in parallel; nothing is gathered. On load every rank reads
  only the chunks overlapping its own shards, resharded from whatever layout saved them: 2 -> 1 ranks,
  1 -> 2, DDP <-> FSDP2, N nodes -> M nodes;
- a **per-rank** state (``per_rank = True``: loader counters, RNG streams) is one small file per rank; on
  another world size it goes to the state's ``load_resharded(states of every old rank)`` when it has one
  (the loader: same global position) and is re-derived otherwise (RNG streams: ``train.seed + rank``);
- any other state (scheduler, GradScaler, distillation record) is small and written by rank 0.

Layout of ``<output_dir>/checkpoints/step_00000120/``:

- ``.metadata``, ``__<rank>_0.distcp``  the DCP checkpoint of the sharded states (``model.*``, ``optimizer.*``,
                                     ``ema.*``), one data file per rank;
- ``state.pt``                        the small states by name (rank 0);
- ``rank<r>.pt``                      the per-rank states of rank ``r``;
- ``model.json``                      the model record: how to rebuild the model (:mod:`tldist.artifacts.export`);
- ``trainer.json``                    step, best metric, tracker run id, world size and layout history;
- ``config.yaml``                     the resolved job config;
- ``model.safetensors``               only with ``checkpoint.full_weights``: the full model, loadable without tldist;
- ``complete.json``                   written last: every other member's name and size.

A checkpoint is written into ``.tmp-step_...`` and renamed into place once every rank's part is on disk;
pruning renames a directory to ``.trash-step_...`` before deleting it. A ``step_*`` directory counts as
complete only when ``complete.json`` lists members that all exist with those sizes, so a crash while
writing (also in the background, ``checkpoint.async_save``), re-saving or pruning never leaves a checkpoint
that resume would pick and then fail on: incomplete ones are skipped with a warning (:func:`is_complete`).

Nothing here runs code from the files: DCP's index and items are read by :mod:`tldist.artifacts.dcp` (an
allow-list unpickler, ``weights_only`` items), the small files hold tensors and plain data and are read with
``weights_only=True`` (:func:`tldist.safeload.load_pickle_free`). Checkpoints written before the sharded
format (``model.safetensors`` + ``optimizer.pt`` + ``state.pt``) still give their weights to export, eval and
``model.checkpoint=``; resuming one is refused with one line saying how to continue from it.
"""

from __future__ import annotations

import copy
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
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from tldist.artifacts import dcp as safe_dcp
from tldist.artifacts import layout
from tldist.artifacts.remote import RemoteStore, newest, rank_files
from tldist.errors import UserError
from tldist.safeload import load_pickle_free, read_json
from tldist.world import barrier, broadcast_object, current_world, distributed

log = logging.getLogger("tldist")

_STEP_DIR = re.compile(r"^step_(\d+)$")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
LEGACY_MEMBERS = (layout.WEIGHTS, "optimizer.pt", "state.pt", layout.CONFIG, layout.TRAINER)
"""The files of a checkpoint of the format before the sharded one (full state on rank 0)."""
MARKER = layout.MARKER
"""Written last into a checkpoint: ``{"members": {name: size in bytes}}``."""
SMALL = "state.pt"
"""The small states (rank 0)."""


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a complete checkpoint: its marker lists members that all exist with
    the recorded sizes. Directories from before the marker existed count when every member
    of :data:`LEGACY_MEMBERS` is there."""
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        return all((path / m).is_file() for m in LEGACY_MEMBERS)
    try:
        members = json.loads(marker.read_text())["members"]
        return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in members.items())
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        return False


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


def per_rank_file(rank: int) -> str:
    """The file of rank ``rank``'s per-rank states in a checkpoint."""
    return f"rank{rank}.pt"


def is_sharded(path: Path) -> bool:
    """Whether checkpoint ``path`` is of the sharded (DCP) format."""
    return (Path(path) / safe_dcp.METADATA).is_file()


class RngState:
    """This process's RNG streams (python, numpy, torch CPU and CUDA) as a per-rank checkpoint state."""

    per_rank = True

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)

    def load_resharded(self, states: list[dict[str, Any]]) -> None:
        """Another world size: the streams stay as ``train.seed + rank`` derived them at build (dropout and
        drop-path follow the topology; the data order and augmentation do not depend on these streams)."""
        log.info("resume on another world size: RNG streams re-derived from train.seed + rank (%d saved, not used)",
                 len(states))


class ModelState:
    """A (DDP-wrapped, FSDP2-sharded or plain) model as a sharded checkpoint state (DCP's state-dict API)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def sharded_state_dict(self) -> dict[str, Any]:
        """This rank's view of the model state: DTensor shards under FSDP2, full tensors otherwise."""
        return get_model_state_dict(self.model)

    def load_sharded_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full model state dict on the CPU (call on every rank: gathers FSDP2 shards)."""
        return get_model_state_dict(self.model, options=_FULL)


class OptimizerState:
    """An optimizer over a (possibly sharded) model as a sharded checkpoint state, keyed by parameter name."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def sharded_state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_sharded_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)


# ---- finding checkpoints ----------------------------------------------------------------------------
_warned: set[Path] = set()


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` (a run's ``checkpoints/``), oldest first; incomplete
    ``step_*`` directories are skipped with a warning (once per directory and process)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if not m:
            continue
        if is_complete(p):
            found.append((int(m.group(1)), p))
        elif p not in _warned:
            _warned.add(p)
            log.warning("skipping incomplete checkpoint %s (a member is missing or truncated: the run was "
                        "killed while writing or deleting it); delete it to silence this warning", p)
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The newest complete checkpoint under ``root``, or None."""
    steps = list_checkpoints(root)
    return steps[-1][1] if steps else None


def best_checkpoint(root: str | Path) -> Optional[Path]:
    """The checkpoint with the best eval metric under ``root`` (``best.json``), if it is still complete."""
    f = Path(root) / layout.BEST
    if not f.is_file():
        return None
    p = Path(root) / str(read_json(f, what="best-checkpoint record").get("dir", ""))
    return p if p.is_dir() and is_complete(p) else None


def resolve_resume(root: str | Path, resume: str, remote: Optional[RemoteStore] = None) -> Optional[Path]:
    """``checkpoint.resume``: ``auto`` -> the latest under ``root`` or None; ``none`` -> None; otherwise
    an existing, complete checkpoint directory (else :class:`UserError` naming the key).

    With ``remote`` (``checkpoint.remote``; call on every rank then), ``auto`` takes the newest complete
    checkpoint of ``root`` and the remote directory: rank 0 decides and downloads a newer remote one into
    ``root``, and on nodes whose ``root`` is a different (node-local) disk, local rank 0 downloads it too.
    """
    if resume == "none":
        return None
    if resume == "auto":
        if remote is None:
            return latest_checkpoint(root)
        return _resume_from_remote(Path(root), remote)
    p = Path(resume)
    if not (p / layout.TRAINER).is_file():
        raise UserError(f"checkpoint.resume='{resume}' is not a checkpoint directory (no {layout.TRAINER}); "
                        f"use 'auto', 'none' or a step_* directory under {root}")
    if not is_complete(p):
        raise UserError(f"checkpoint.resume='{resume}' is an incomplete checkpoint (a member is missing or "
                        f"truncated); use 'auto' to take the newest complete one, or another step_* directory")
    return p


def _resume_from_remote(root: Path, remote: RemoteStore) -> Optional[Path]:
    world = current_world()
    choice = None
    if world.is_main:
        local, name = newest(latest_checkpoint(root), remote)
        if name is not None:
            log.info("checkpoint.remote: %s/%s is newer than any local checkpoint: downloading it", remote.url, name)
            local = remote.download(name, root)
        choice = (str(local) if local is not None else None, name)
    path, name = broadcast_object(choice)
    if path is None:
        return None
    barrier()
    if name is not None and world.local_rank == 0 and not Path(path).is_dir():  # another node's disk
        remote.download(name, root)
    barrier()
    return Path(path)


class CheckpointManager:
    """Writes, loads and prunes the checkpoints of one run (see the module docstring).

    Args:
        root: the run's ``checkpoints/`` directory.
        states: name -> stateful piece of the run (see the module docstring for how each is stored).
        keep_last: periodic checkpoints to keep (the best one is kept as well).
        is_main: whether this process writes the shared files (rank 0).
        config_yaml: the resolved job config, saved as ``config.yaml`` in every checkpoint.
        model_record: the model record (``model.json``) saved with every checkpoint, or None.
        async_save: write the sharded states in the background (``checkpoint.async_save``; torchtitan's
            ``async_mode``): :meth:`save` returns once they are copied to host memory; the checkpoint is
            renamed into place when every rank's part is written; the next save and :meth:`close` wait for it.
        full_weights: also write ``model.safetensors`` (the full model, gathered on rank 0;
            ``checkpoint.full_weights``).
        remote: mirror every checkpoint there once it is in place (``checkpoint.remote``,
            :mod:`tldist.artifacts.remote`): each rank uploads its own part, rank 0 the shared files and the
            marker last; remote checkpoints are pruned with the local ones.
    """

    def __init__(self, root: str | Path, *, states: dict[str, Any], keep_last: int, is_main: bool,
                 config_yaml: str = "", model_record: Optional[dict[str, Any]] = None, async_save: bool = False,
                 full_weights: bool = False, remote: Optional[RemoteStore] = None):
        self.root = Path(root)
        self.remote = remote
        self.states = dict(states)
        self.keep_last = keep_last
        self.is_main = is_main
        self.config_yaml = config_yaml
        self.model_record = model_record
        self.async_save = async_save
        self.full_weights = full_weights
        self.guard: Optional[Callable[[], None]] = None
        """Called on the main process before every write; raises to refuse it (e.g. the run's
        output-directory lock was taken over by another job: this process must not write)."""
        self._pending: Optional[tuple[Any, Callable[[], None]]] = None
        self._pending_final: Optional[Path] = None
        # The background write's collectives must not meet the training's on one group (gloo checks their order)
        self._group = dist.new_group(backend="gloo") if async_save and distributed() else None

    def _kinds(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        sharded = {n: o for n, o in self.states.items() if hasattr(o, "sharded_state_dict")}
        per_rank = {n: o for n, o in self.states.items() if n not in sharded and getattr(o, "per_rank", False)}
        small = {n: o for n, o in self.states.items() if n not in sharded and n not in per_rank}
        return sharded, per_rank, small

    # ---- save -----------------------------------------------------------------------------
    def save(self, step: int, *, trainer: dict[str, Any], metric: Optional[float] = None) -> Path:
        """Write checkpoint ``step`` (call on every rank; each rank writes its own part).

        ``trainer`` is the loop's JSON state (``trainer.json``); ``metric`` marks this checkpoint as the
        best so far (``best.json``). With ``async_save`` this returns once the sharded states are copied
        to host memory (the path returned is where the checkpoint will be once written).
        """
        self.wait()
        world = current_world()
        sharded, per_rank, small = self._kinds()
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp-step_{step:08d}"
        if self.is_main:
            if self.guard is not None:
                self.guard()
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()  # the directory exists before any rank writes into it
        full = self.states["model"].full_state_dict() if self.full_weights and "model" in self.states else None
        mine = tmp / per_rank_file(world.rank)
        torch.save({name: obj.state_dict() for name, obj in per_rank.items()}, mine)
        _fsync_file(mine)
        small_sd = copy.deepcopy({name: obj.state_dict() for name, obj in small.items()})  # written later if async
        state = {name: obj.sharded_state_dict() for name, obj in sharded.items()}
        writer = FileSystemWriter(str(tmp), sync_files=True)
        finish = lambda: self._finish(tmp, final, step, trainer, metric, small_sd, full, world.world_size)  # noqa: E731
        if self.async_save:
            with safe_dcp.single_process_quiet():
                future = dcp.async_save(state, storage_writer=writer, process_group=self._group,
                                        no_dist=not distributed())
            self._pending, self._pending_final = (future, finish), final
        else:
            with safe_dcp.single_process_quiet():
                dcp.save(state, storage_writer=writer, no_dist=not distributed())
            barrier()  # every rank's part is on disk
            finish()
            barrier()
            self._mirror(final)
        return final

    def _mirror(self, final: Path) -> None:
        """Upload checkpoint ``final`` to ``checkpoint.remote`` (call on every rank, once it is in place)."""
        if self.remote is None:
            return
        world = current_world()
        self.remote.upload(final, rank_files(final, world.rank))  # every rank its own part, in parallel
        barrier()
        if self.is_main:
            ranks = {n for r in range(world.world_size) for n in rank_files(final, r)}
            shared = sorted(p.name for p in final.iterdir() if p.name not in ranks and p.name != MARKER)
            self.remote.upload(final, [*shared, MARKER])  # the marker last: only then is it complete there
            self.remote.prune({p.name for _, p in list_checkpoints(self.root)})
        barrier()

    def _finish(self, tmp: Path, final: Path, step: int, trainer: dict[str, Any], metric: Optional[float],
                small: dict[str, Any], full: Optional[dict[str, torch.Tensor]], world_size: int) -> None:
        """The shared files, the completion marker and the rename into place (rank 0, once every rank's part
        is written)."""
        if not self.is_main:
            return
        torch.save(small, tmp / SMALL)
        (tmp / layout.CONFIG).write_text(self.config_yaml)
        (tmp / layout.TRAINER).write_text(json.dumps({**trainer, "step": step}, indent=1))
        if self.model_record is not None:
            (tmp / layout.MODEL_RECORD).write_text(json.dumps({**self.model_record, "step": step}, indent=1))
        if full is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in full.items()}, str(tmp / layout.WEIGHTS))
        missing = [per_rank_file(r) for r in range(world_size) if not (tmp / per_rank_file(r)).is_file()]
        if missing:
            raise RuntimeError(f"checkpoint {tmp} lacks {missing}: a rank's part was not written")
        _fsync_dir(tmp)
        members = {p.name: p.stat().st_size for p in tmp.iterdir() if p.name != MARKER}
        (tmp / MARKER).write_text(json.dumps({"members": members}))
        _fsync_dir(tmp, only=MARKER)
        if final.exists():  # re-saving the same step (e.g. end of run right after a periodic save)
            self._remove(final)
        os.replace(tmp, final)
        if metric is not None:
            self._write_json(layout.BEST, {"dir": final.name, "step": step, "metric": metric})
        self._prune()

    def wait(self) -> None:
        """Wait for an asynchronous save in flight and put it into place (call on every rank)."""
        if self._pending is None:
            return
        future, finish = self._pending
        self._pending = None
        future.result()  # this rank's part (on rank 0: after every rank reported, the index is written)
        finish()
        if self.remote is not None:
            barrier()  # the checkpoint is in place before anyone uploads from it
            self._mirror(self._pending_final)

    def close(self) -> None:
        """End of the run: :meth:`wait` (call on every rank, on the success path)."""
        self.wait()
        barrier()

    def _write_json(self, name: str, obj: dict) -> None:
        tmp = self.root / f".{name}.tmp"
        tmp.write_text(json.dumps(obj))
        os.replace(tmp, self.root / name)

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` checkpoints and the best one (main process only); also
        clear what killed saves and prunes left behind."""
        best = best_checkpoint(self.root)
        steps = list_checkpoints(self.root)
        for _, p in steps[: max(0, len(steps) - self.keep_last)]:
            if best is None or p.resolve() != best.resolve():
                self._remove(p)
        for p in [*self.root.glob(".trash-step_*"), *self.root.glob(".tmp-step_*"),
                  *self.root.glob(".tmp-remote-step_*")]:  # none is in flight now
            shutil.rmtree(p, ignore_errors=True)

    def _remove(self, path: Path) -> None:
        """Delete a checkpoint directory so that no kill leaves a partial ``step_*`` behind:
        rename it out of the ``step_*`` namespace first (atomic), then delete."""
        trash = self.root / f".trash-{path.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    # ---- load -----------------------------------------------------------------------------
    def load(self, path: Path) -> dict[str, Any]:
        """Restore every state of the manager from checkpoint ``path``, in place (call on every rank);
        returns its ``trainer.json``.

        The sharded states are resharded onto this job's layout whatever saved them; per-rank states go
        through ``load_resharded`` when the world size changed. Every member is read without running code
        from it, and all small members are read (and a crafted or corrupt one refused with one line naming
        it) before anything is restored. A state the checkpoint lacks (the EMA, turned on at resume) goes
        to the state's ``missing_from_checkpoint(path)``; a state the checkpoint holds and the run does not
        have is ignored.
        """
        path = Path(path)
        if not is_sharded(path):
            raise UserError(f"checkpoint '{path}' is in the format before sharded checkpoints (model.safetensors + "
                            "state.pt) and cannot be resumed with this tldist: start a new run from its weights with "
                            f"model.checkpoint={path} checkpoint.resume=none (the optimizer and data position start "
                            "afresh), or finish the run with the tldist that wrote it")
        world = current_world()
        try:
            trainer = json.loads((path / layout.TRAINER).read_text())
        except (ValueError, OSError) as e:
            raise UserError(f"checkpoint '{path}' could not be read ({type(e).__name__}: {e})") from None
        saved_world = int(trainer.get("world_size") or world.world_size)
        sharded, per_rank, small = self._kinds()
        small_sd = load_pickle_free(path / SMALL, what="checkpoint member", allow=_LEGACY_NUMPY)
        if not isinstance(small_sd, dict):
            raise UserError(f"checkpoint member '{path / SMALL}' is not a tldist state file")
        ranks = [world.rank] if saved_world == world.world_size else list(range(saved_world))
        rank_sds = [load_pickle_free(path / per_rank_file(r), what="checkpoint member", allow=_LEGACY_NUMPY)
                    for r in ranks]
        if not all(isinstance(sd, dict) for sd in rank_sds):
            raise UserError(f"checkpoint '{path}' has a per-rank state file that is not a tldist state file")
        index = safe_dcp.saved_keys(path)
        present = {name for name in sharded if any(k.startswith(name + ".") for k in index)}
        if "model" in sharded and "model" not in present:
            raise UserError(f"checkpoint '{path}' holds no model state: it is not a tldist checkpoint")
        template = {name: sharded[name].sharded_state_dict() for name in sharded if name in present}
        for name in ("model", "ema"):  # DCP reads only the keys asked for: a larger model's state would pass silently
            extra = sorted({k[len(name) + 1:] for k in index if k.startswith(name + ".")} - set(template.get(name, ())))
            if name in template and extra:
                err = UserError(f"checkpoint '{path}' holds the '{name}' state of another model ({len(extra)} keys this "
                                f"model lacks, e.g. '{extra[0]}'); resume with the model it was saved from, or start "
                                f"a new run from its weights: model.checkpoint={path} checkpoint.resume=none")
                err.same_on_every_rank = True
                raise err
        try:
            safe_dcp.load(template, path)
            for name, obj in sharded.items():
                if name in present:
                    obj.load_sharded_state_dict(template[name])
                else:
                    obj.missing_from_checkpoint(path)
        except (RuntimeError, KeyError, ValueError, CheckpointException) as e:  # every rank gets DCP's error alike
            first = safe_dcp.first_failure(e)[:300]
            err = UserError(f"checkpoint '{path}' does not fit this run's model or optimizer ({first}); resume with "
                            "the model, optimizer and transfer settings it was saved with, or start a new run "
                            f"from its weights: model.checkpoint={path} checkpoint.resume=none")
            err.same_on_every_rank = True
            raise err from None
        for name, obj in small.items():
            if small_sd.get(name) is not None:
                obj.load_state_dict(small_sd[name])
        for name, obj in per_rank.items():
            saved = [sd.get(name) for sd in rank_sds]
            if any(s is None for s in saved):
                continue
            if saved_world == world.world_size:
                obj.load_state_dict(saved[0])
            elif hasattr(obj, "load_resharded"):
                obj.load_resharded(saved)
            else:
                raise UserError(f"checkpoint '{path}' was written by {saved_world} processes and its '{name}' state "
                                f"cannot move to {world.world_size}: resume with {saved_world} processes")
        return trainer


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


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
