"""The shard-set manifest: shard names, per-shard sample counts and the class map.

A shard set is a directory (or URL prefix) holding ``<split>-000000.tar``... and a
``manifest.json``. The manifest is what lets training declare its epoch size and split
samples evenly across ranks without reading the shards first.

Sample layout inside a shard (WebDataset convention): ``<key>.<ext>`` holds the image
bytes as written by the source (``jpg``, ``png``, ``webp``...), ``<key>.cls`` holds the
class index as ASCII digits.
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from tldist.errors import DataError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")


@dataclass
class ShardInfo:
    name: str
    """Shard file name, relative to the manifest's location (or an absolute URL)."""
    num_samples: int
    """Samples in this shard."""


@dataclass
class Manifest:
    split: str
    """``train``, ``val``... (free text)."""
    classes: list[str]
    """Class names; position is the class index stored in ``.cls``."""
    shards: list[ShardInfo]
    """Shards in their canonical order."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Provenance: source, options used to write the shards, teacher checkpoint for pseudo-labels..."""
    base: str = ""
    """Directory or URL prefix the shard names are relative to (set on load, not saved)."""

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def shard_urls(self) -> list[str]:
        """Absolute path or URL of every shard, in manifest order."""
        return [_join(self.base, s.name) for s in self.shards]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("base")
        d["format_version"] = FORMAT_VERSION
        d["num_samples"] = self.num_samples
        return d

    def save(self, path: str | Path) -> Path:
        """Write atomically to ``path`` (a directory gets ``manifest.json``)."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / MANIFEST_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".manifest.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        os.replace(tmp, path)
        return path


def _join(base: str, name: str) -> str:
    if "://" in name or name.startswith(("/", "pipe:")) or not base:
        return name
    return base.rstrip("/") + "/" + name


def _is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def load_manifest(location: str | Path) -> Manifest:
    """Load a manifest from a shard directory, a ``.json`` path, or an http(s) URL of either.

    Raises :class:`DataError` naming the location when it is missing or malformed.
    """
    location = str(location)
    if _is_url(location):
        url = location if location.endswith(".json") else location.rstrip("/") + "/" + MANIFEST_NAME
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                raw = r.read()  # bytes: json.loads decodes them (a bad encoding is malformed)
        except OSError as e:
            raise DataError(f"cannot fetch manifest '{url}': {e}") from None
        base = url.rsplit("/", 1)[0]
    else:
        path = Path(location)
        if path.is_dir():
            path = path / MANIFEST_NAME
        if not path.is_file():
            raise DataError(
                f"no manifest at '{path}': point data.* at a shard directory written by "
                f"'tldist shards' (it holds {MANIFEST_NAME}) or at the manifest file itself"
            )
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read manifest '{path}': {e.strerror or e}") from None
        base = str(path.parent)
    return _parse(raw, location, base)


def _parse(raw: str | bytes, location: str, base: str) -> Manifest:
    try:
        d = json.loads(raw)
        version = d.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise DataError(f"manifest '{location}' has format_version {version}; this tldist reads up to {FORMAT_VERSION}")
        shards = [ShardInfo(name=s["name"], num_samples=int(s["num_samples"])) for s in d["shards"]]
        m = Manifest(split=d.get("split", ""), classes=list(d["classes"]), shards=shards,
                     meta=dict(d.get("meta", {})), base=base)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # AttributeError: not a JSON object
        raise DataError(f"manifest '{location}' is malformed ({type(e).__name__}: {e}); rewrite it with 'tldist shards'") from None
    if not m.shards:
        raise DataError(f"manifest '{location}' lists no shards")
    return m


def resolve_shard_urls(manifest: Manifest, pattern: Optional[str] = None) -> list[str]:
    """Shard URLs for ``manifest``, optionally taken from a brace pattern instead of its location.

    ``pattern`` (e.g. ``pipe:aws s3 cp s3://bucket/train-{000000..000004}.tar -``) must expand to
    exactly one URL per manifest shard; they are matched by file name, so counts stay correct.
    For local shards, a missing file raises :class:`DataError` naming it.
    """
    if not pattern:
        urls = manifest.shard_urls()
    else:
        from braceexpand import braceexpand

        expanded = list(braceexpand(pattern))
        by_name = {_basename(u): u for u in expanded}
        missing = [s.name for s in manifest.shards if _basename(s.name) not in by_name]
        if len(expanded) != len(manifest.shards) or missing:
            raise DataError(
                f"shard pattern '{pattern}' expands to {len(expanded)} URLs but the manifest lists "
                f"{len(manifest.shards)} shards" + (f"; no URL for {missing[:3]}" if missing else "")
            )
        urls = [by_name[_basename(s.name)] for s in manifest.shards]
    for url in urls:
        if "://" not in url and not url.startswith("pipe:") and not Path(url).is_file():
            raise DataError(f"shard '{url}' listed in the manifest does not exist; re-run 'tldist shards' or fix data.*_urls")
    return urls


def _basename(url: str) -> str:
    """File name of a shard URL; for ``pipe:`` commands, of the argument that names a tar."""
    if url.startswith("pipe:"):
        tars = [t for t in url[5:].split() if ".tar" in t]
        url = tars[-1] if tars else url
    return url.rsplit("/", 1)[-1]
