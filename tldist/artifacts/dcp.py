"""Reading and writing sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), without running
code from the files.

DCP writes one data file per rank (``__<rank>_0.distcp``) and a ``.metadata`` index, in parallel: no rank
gathers another's shards. Its stock reader is not safe on files someone else may have written (torch
2.14.1): ``.metadata`` is read with a plain ``pickle.load`` (``torch/distributed/checkpoint/filesystem.py``,
``FileSystemReader.read_metadata``) and non-tensor items with ``torch.load(weights_only=False)``
(``default_planner.py``, ``DefaultLoadPlanner.load_bytes``); a crafted file runs any command when loaded.
Here:

- :class:`SafeReader` unpickles ``.metadata`` with an allow-list of the plain data classes DCP's index is
  made of (``Metadata``, ``TensorStorageMetadata``, ``ChunkStorageMetadata``, ``BytesStorageMetadata``,
  ``MetadataIndex``, ``StorageMeta``, ``TensorProperties``, ``_StorageInfo``, ``torch.Size``, dtypes, the
  strided layout, paths as strings) and then checks its structure: sizes within a bound, chunks inside
  their tensor, data files that are plain names inside the checkpoint directory;
- :class:`SafeLoadPlanner` (and :class:`SafeFullStatePlanner`) read non-tensor items with
  ``torch.load(weights_only=True)``; tensor items already are.

A refused file raises :class:`~tldist.safeload.UnsafeFileError`, a one-line
:class:`~tldist.errors.UserError` naming the file; nothing of it has been constructed. A data file that
cannot be read (corrupt, cut off) raises a one-line :class:`~tldist.errors.UserError` naming it. DCP wraps
every rank's error into a ``CheckpointException`` (a ``BaseException`` holding tracebacks): :func:`load`
and :func:`read_full` raise the wrapped :class:`~tldist.errors.UserError` itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import warnings
import pathlib
import pickle
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    _MEM_FORMAT_ENCODING,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.futures import Future

from tldist.errors import UserError
from tldist.safeload import UnsafeFileError, _offending_global, _reason
from tldist.world import distributed

METADATA = ".metadata"
"""DCP's index file, written last by the coordinating rank."""
MAX_NUMEL = 2**40
"""Largest tensor (elements) a checkpoint index may declare: refuses absurd sizes before any allocation."""


def _path_str(*parts: Any) -> str:
    if not all(isinstance(p, str) for p in parts):
        raise pickle.UnpicklingError("a path in the checkpoint index is not made of strings")
    return str(pathlib.PurePath(*parts))


_DCP = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[tuple[str, str], Any] = {
    (_DCP, "Metadata"): Metadata, (_DCP, "TensorStorageMetadata"): TensorStorageMetadata,
    (_DCP, "ChunkStorageMetadata"): ChunkStorageMetadata, (_DCP, "BytesStorageMetadata"): BytesStorageMetadata,
    (_DCP, "MetadataIndex"): MetadataIndex, (_DCP, "StorageMeta"): StorageMeta,
    (_DCP, "TensorProperties"): TensorProperties, (_DCP, "_MEM_FORMAT_ENCODING"): _MEM_FORMAT_ENCODING,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,  # how torch.strided pickles
    ("pathlib", "PosixPath"): _path_str, ("pathlib", "PurePosixPath"): _path_str,
    ("pathlib", "WindowsPath"): _path_str, ("pathlib", "PureWindowsPath"): _path_str,
    ("collections", "OrderedDict"): dict,
    **{("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
}
"""Every global a ``.metadata`` written by DCP refers to (read off real checkpoints of models and optimizers)."""


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it refers to the global {module}.{name}, which a checkpoint index "
                                         "never holds") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it holds a persistent id, which a checkpoint index never holds")


def _sizes(s: Any) -> bool:
    return isinstance(s, torch.Size) and all(isinstance(x, int) and x >= 0 for x in s)


def _check_index(md: Any) -> None:
    """Raise ``ValueError`` unless ``md`` is a well-formed DCP index (see the module docstring)."""
    if type(md) is not Metadata or not isinstance(md.state_dict_metadata, dict) or not isinstance(md.storage_data, dict):
        raise ValueError("it is not a checkpoint index")
    for key, entry in md.state_dict_metadata.items():
        if not isinstance(key, str):
            raise ValueError(f"it has a key {key!r} that is not a string")
        if isinstance(entry, BytesStorageMetadata):
            continue
        if type(entry) is not TensorStorageMetadata or not _sizes(entry.size) or \
                not isinstance(entry.properties.dtype, torch.dtype) or entry.size.numel() > MAX_NUMEL:
            raise ValueError(f"its entry for '{key}' is malformed")
        for c in entry.chunks:
            if type(c) is not ChunkStorageMetadata or not (_sizes(c.offsets) and _sizes(c.sizes)) or \
                    len(c.offsets) != len(entry.size) or len(c.sizes) != len(entry.size) or \
                    any(o + s > d for o, s, d in zip(c.offsets, c.sizes, entry.size)):
                raise ValueError(f"a chunk of '{key}' lies outside the tensor")
    for index, info in md.storage_data.items():
        name = getattr(info, "relative_path", None)
        if type(index) is not MetadataIndex or type(info) is not _StorageInfo or not isinstance(name, str) or \
                os.path.basename(name) != name or name in ("", ".", "..") or \
                not isinstance(info.offset, int) or not isinstance(info.length, int) or info.offset < 0 or \
                info.length < 0 or info.transform_descriptors:
            raise ValueError("it points at data outside the checkpoint directory, or is malformed")


def read_index(path: str | os.PathLike) -> Metadata:
    """The checked DCP index of checkpoint directory ``path``; :class:`UnsafeFileError` (one line) for a
    crafted or corrupt one, :class:`UserError` when it is missing."""
    f = Path(path) / METADATA
    try:
        with open(f, "rb") as fh:
            md = _IndexUnpickler(fh).load()
        _check_index(md)
    except FileNotFoundError:
        raise UserError(f"checkpoint '{path}' has no {METADATA}: it was not completely written") from None
    except (pickle.UnpicklingError, ValueError, EOFError, AttributeError, TypeError, IndexError, OSError) as e:
        raise UnsafeFileError(f"checkpoint member '{f}' was not read: {e}; re-create the checkpoint") from None
    return md


class SafeReader(FileSystemReader):
    """DCP's ``FileSystemReader`` with the index read by :func:`read_index`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:  # **kwargs: dcp.load checks for it
        md = read_index(self.path)
        if md.storage_meta is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def read_data(self, plan: Any, planner: Any) -> Future:
        """DCP's ``read_data``, one data file at a time, so that an error names the file it came from."""
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for name, items in per_file.items():
            try:
                with warnings.catch_warnings():  # "Detected pickle protocol N": noise for crafted files, refused
                    warnings.filterwarnings("ignore", message=".*pickle protocol.*", category=UserWarning)
                    super().read_data(dataclasses.replace(plan, items=items), planner).wait()
            except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, AssertionError...
                raise _member_error(Path(self.path) / name, e) from None
        done: Future = Future()
        done.set_result(None)
        return done


def _member_error(f: Path, e: Exception) -> UserError:
    """The one-line error for data file ``f`` of a checkpoint that raised ``e`` while read."""
    name = _offending_global(str(e)) if isinstance(e, pickle.UnpicklingError) else None
    if name is not None:
        return UnsafeFileError(f"refusing to load checkpoint member '{f}': it references {name}, which is not on "
                               "tldist's list of safe types (loading it could run code); nothing was executed. "
                               "Re-create the checkpoint")
    return UserError(f"checkpoint member '{f}' could not be read ({type(e).__name__}: {_reason(str(e))}); the file "
                     "is corrupt or truncated: resume from another checkpoint")


def _raise_user_error(e: CheckpointException) -> None:
    """Raise the :class:`UserError` DCP wrapped into ``e`` (the lowest rank's: every rank holds the same
    failures), if there is one."""
    for rank in sorted(e.failures):
        err = e.failures[rank][0]
        if isinstance(err, UserError):
            err.same_on_every_rank = True
            raise err from None


def first_failure(e: BaseException) -> str:
    """The error behind ``e`` on one line: for DCP's ``CheckpointException`` (every rank's error with its
    traceback) the lowest failing rank's error alone."""
    if isinstance(e, CheckpointException) and e.failures:
        e = e.failures[min(e.failures)][0]
    return " ".join(f"{type(e).__name__}: {e}".split())


class _SafeBytes:
    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:  # as DefaultLoadPlanner's, weights_only
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:  # SafeReader.read_data names the file
            raise pickle.UnpicklingError(f"item '{read_item.dest_index.fqn}': {e}") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class SafeLoadPlanner(_SafeBytes, DefaultLoadPlanner):
    """DCP's default load planner, with non-tensor items read ``weights_only``."""


class SafeFullStatePlanner(_SafeBytes, _EmptyStateDictLoadPlanner):
    """Rebuilds the saved state dict (or the keys asked for) from the index, in one process."""


def load(state_dict: dict[str, Any], path: str | os.PathLike, *, process_group: Any = None) -> None:
    """Load checkpoint ``path`` into ``state_dict`` in place (call on every rank of the group; DTensors load their
    own shards, resharded from whatever layout saved them)."""
    import torch.distributed.checkpoint as dcp

    with single_process_quiet():
        try:
            dcp.load(state_dict, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner(),
                     process_group=process_group, no_dist=not distributed())
        except CheckpointException as e:
            _raise_user_error(e)
            raise


@contextlib.contextmanager
def single_process_quiet() -> Iterator[None]:
    """Silence DCP's warning that it runs in a single process: without a process group that is the intent.

    An asynchronous save warns from its background thread, after this block has ended, so the filter is also
    installed for the process when the first single-process save starts (``warnings.catch_warnings`` only
    covers the calling thread's block)."""
    if not distributed():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def read_full(path: str | os.PathLike, prefix: str) -> dict[str, torch.Tensor]:
    """The full (unsharded) tensors saved under ``prefix.`` in checkpoint ``path``, keys without the prefix, on
    the CPU, in this process alone (no process group): what export, eval and ``model.checkpoint=`` read."""
    md = read_index(path)
    keys = [k for k in md.state_dict_metadata if k.startswith(prefix + ".")]
    if not keys:
        raise UserError(f"checkpoint '{path}' holds no '{prefix}' state")
    sd: dict[str, Any] = {}
    try:
        _load_state_dict(sd, storage_reader=SafeReader(str(path)), planner=SafeFullStatePlanner(keys=keys),
                         no_dist=True)
    except CheckpointException as e:
        _raise_user_error(e)
        raise UserError(f"checkpoint '{path}' could not be read ({first_failure(e)[:300]})") from None
    flat = _flatten(sd)
    return {k[len(prefix) + 1:]: v for k, v in flat.items() if k.startswith(prefix + ".")}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def saved_keys(path: str | os.PathLike, prefix: Optional[str] = None) -> dict[str, Any]:
    """The index entries of checkpoint ``path`` (key -> ``TensorStorageMetadata``/``BytesStorageMetadata``),
    optionally those under ``prefix.``."""
    entries = read_index(path).state_dict_metadata
    return {k: v for k, v in entries.items() if prefix is None or k.startswith(prefix + ".")}
