"""Checkpoints mirrored to remote storage (``checkpoint.remote``, an fsspec URL).

The habit this follows: open_clip's ``--remote-sync`` and Composer's ``save_folder="s3://..."``. After a
checkpoint is renamed into place locally, each rank uploads the files it wrote itself (its DCP part
``__<rank>_*.distcp`` and ``rank<rank>.pt``), in parallel; then rank 0 uploads the shared files and, last,
the completion marker. A remote ``step_*`` directory without its marker is therefore never taken for a
checkpoint, wherever the upload stopped. ``checkpoint.resume=auto`` takes the newest complete checkpoint of
the local directory and the remote one; a remote one is downloaded next to the local ones first (through a
temporary name, renamed into place when every member arrived).

``s3://`` goes through boto3 (the ``s3`` extra, as ``s3://`` shards do); any other fsspec protocol works too
(``file://``, ``gs://`` with gcsfs, ...). The protocol's package must be installed, else
:class:`~tldist.errors.ConfigError` names the key and the package.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from tldist.artifacts.layout import MARKER
from tldist.errors import ConfigError, DataError, UserError
from tldist.s3 import client as s3_client

log = logging.getLogger("tldist")

_STEP = re.compile(r"^step_(\d+)$")  # as tldist.artifacts.checkpoint names them


class _BotoFS:
    """The few file-system operations :class:`RemoteStore` uses, on an S3-protocol store through boto3 (the ``s3``
    extra; endpoint and credentials from the ``AWS_*`` variables, as for ``s3://`` shards, :mod:`tldist.s3`).
    Paths are ``bucket/key``; a "directory" is a key prefix."""

    def __init__(self) -> None:
        self.client = s3_client()

    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        bucket, _, key = path.partition("/")
        return bucket, key

    def _keys(self, path: str) -> list[str]:
        bucket, key = self._split(path)
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key.rstrip("/") + "/"):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return keys

    def makedirs(self, path: str, exist_ok: bool = True) -> None:
        pass  # prefixes need no creating

    def put_file(self, local: str, path: str) -> None:
        self.client.upload_file(local, *self._split(path))

    def get_file(self, path: str, local: str) -> None:
        self.client.download_file(*self._split(path), local)

    def ls(self, path: str, detail: bool = False) -> list[str]:
        bucket, key = self._split(path)
        out: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=key.rstrip("/") + "/" if key else "", Delimiter="/"):
            out += [f"{bucket}/{p['Prefix'].rstrip('/')}" for p in page.get("CommonPrefixes", [])]
            out += [f"{bucket}/{o['Key']}" for o in page.get("Contents", [])]
        return out

    def exists(self, path: str) -> bool:
        bucket, key = self._split(path)
        try:
            self.client.head_object(Bucket=bucket, Key=key)
            return True
        except Exception:  # botocore's ClientError (404): a prefix, or nothing
            return bool(self._keys(path))

    def open(self, path: str, mode: str = "rb") -> io.BytesIO:
        bucket, key = self._split(path)
        return io.BytesIO(self.client.get_object(Bucket=bucket, Key=key)["Body"].read())

    def rm_file(self, path: str) -> None:
        self.client.delete_object(Bucket=self._split(path)[0], Key=self._split(path)[1])

    def rm(self, path: str, recursive: bool = True) -> None:
        bucket, _ = self._split(path)
        keys = self._keys(path)
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})


class RemoteStore:
    """One remote directory of checkpoints, ``url``: ``s3://bucket/prefix`` (boto3, the ``s3`` extra; MinIO, Ceph,
    R2 through ``AWS_ENDPOINT_URL``) or any other fsspec URL (``file://``, ``gs://`` with gcsfs, ...).

    Raises :class:`ConfigError` (key ``checkpoint.remote``) when the protocol's package is missing.
    """

    def __init__(self, url: str):
        import fsspec

        try:
            if url.startswith("s3://"):
                self.fs, root = _BotoFS(), url[len("s3://"):]
            else:
                self.fs, root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError, DataError) as e:
            raise ConfigError(f"config key 'checkpoint.remote' has bad value '{url}': {e} "
                              "(install the package for its protocol: pip install 'tldist[s3]' for s3://, the "
                              "fsspec implementation for others)") from None
        self.url, self.root = url, root.rstrip("/")

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def upload(self, local: Path, names: list[str]) -> None:
        """Copy the files ``names`` of the local checkpoint dir ``local`` into the remote dir of the same name."""
        dest = self._path(local.name)
        self.fs.makedirs(dest, exist_ok=True)
        for name in names:
            self.fs.put_file(str(local / name), f"{dest}/{name}")

    def complete(self) -> list[tuple[int, str]]:
        """``(step, name)`` of the remote checkpoints that hold their completion marker, oldest first."""
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        steps = []
        for entry in entries:
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            m = _STEP.match(name)
            if m and self.fs.exists(self._path(name, MARKER)):
                steps.append((int(m.group(1)), name))
        return sorted(steps)

    def download(self, name: str, local_root: Path) -> Path:
        """Fetch remote checkpoint ``name`` into ``local_root/name`` (through ``.tmp-<name>``, renamed when every
        member listed by its marker arrived with its size). Raises :class:`UserError` naming it otherwise."""
        src, final, tmp = self._path(name), local_root / name, local_root / f".tmp-remote-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with self.fs.open(f"{src}/{MARKER}", "rb") as f:
            members: dict[str, Any] = json.loads(f.read()).get("members", {})
        for member, size in members.items():
            self.fs.get_file(f"{src}/{member}", str(tmp / member))
            if (tmp / member).stat().st_size != size:
                raise UserError(f"remote checkpoint '{self.url}/{name}' member '{member}' has "
                                f"{(tmp / member).stat().st_size} bytes, its marker says {size}: "
                                "re-upload it or resume from another checkpoint")
        self.fs.get_file(f"{src}/{MARKER}", str(tmp / MARKER))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        return final

    def remove(self, name: str) -> None:
        """Delete a remote checkpoint, its marker first (so that a stopped delete leaves no complete-looking dir)."""
        marker = self._path(name, MARKER)
        if self.fs.exists(marker):
            self.fs.rm_file(marker)
        if self.fs.exists(self._path(name)):
            self.fs.rm(self._path(name), recursive=True)

    def prune(self, keep: set[str]) -> None:
        """Delete the remote checkpoints whose names are not in ``keep`` (the local ones after pruning)."""
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return
        for entry in entries:
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if _STEP.match(name) and name not in keep:
                self.remove(name)


def rank_files(path: Path, rank: int) -> list[str]:
    """The files of checkpoint ``path`` that rank ``rank`` wrote: its DCP part(s) and its per-rank state."""
    return sorted(p.name for p in path.iterdir()
                  if p.name.startswith(f"__{rank}_") and p.suffix == ".distcp" or p.name == f"rank{rank}.pt")


def newest(local: Optional[Path], remote: Optional[RemoteStore]) -> tuple[Optional[Path], Optional[str]]:
    """Which to resume from: ``(local checkpoint, None)`` or ``(None, remote name)`` when the remote holds a newer
    complete one (or the local directory holds none)."""
    if remote is None:
        return local, None
    steps = remote.complete()
    if not steps:
        return local, None
    step, name = steps[-1]
    m = _STEP.match(local.name) if local is not None else None
    if m is not None and int(m.group(1)) >= step:
        return local, None
    return None, name
