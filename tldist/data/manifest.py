"""The shard-set manifest: shard names, per-shard sample counts and the class map.

A shard set is a directory (or URL prefix) holding ``<split>-000000.tar``... and a
``manifest.json``. The manifest is what lets training declare its epoch size and split
samples evenly across ranks without reading the shards first.

Sample layout inside a shard (WebDataset convention): ``<key>.<ext>`` holds the image
bytes as written by the source (``jpg``, ``png``, ``webp``...), ``<key>.cls`` holds the
class index as ASCII digits. A manifest written by ``tldist shards index`` for another tool's
shards names them by absolute path or URL and says in ``meta.labels`` where their labels are
(``.json`` field, ``.txt``...; :mod:`tldist.data.labels`).
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from tldist.config import val_set_entries
# IMAGE_EXTS lives with the rest of how samples are read (tldist.data.labels); importable from here as before
from tldist.data.labels import IMAGE_EXTS, LabelRule, register_shards  # noqa: F401
from tldist.errors import ConfigError, DataError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
SEEK_EVERY = 64
"""The sparse seek index (:attr:`ShardInfo.offsets`) holds the byte offset of every 64th sample."""
STORED_EXTS = ("jpg", "png", "webp")
"""Image formats the writer stores as they are; every other source format is re-encoded to lossless PNG,
so that readers with WebDataset's usual ``"jpg;png;webp"`` keys see every sample."""


@dataclass
class ShardInfo:
    name: str
    """Shard file name, relative to the manifest's location (or an absolute URL)."""
    num_samples: int
    """Samples in this shard."""
    size: Optional[int] = None
    """File size in bytes when the manifest was written (``tldist shards index``: a changed size re-counts it)."""
    mtime: Optional[float] = None
    """Modification time (seconds since the epoch) when indexed; a change re-counts the shard."""
    offsets: list[list[int]] = field(default_factory=list)
    """Sparse seek index: ``[sample_index, byte_offset]`` for every :data:`SEEK_EVERY`-th sample (0, 64,
    128...), the offset of the first tar header block of that sample's first member (its pax/GNU extension
    header when it has one), so a reader can ``seek`` there and parse members from that sample on. Empty when
    not recorded (older manifests, compressed shards, counts taken from an index file unread)."""


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

    @property
    def label_rule(self) -> LabelRule:
        """How this set's labels and images are read from a sample's members (``meta.labels``; tldist's
        ``.cls`` when absent); see :mod:`tldist.data.labels`."""
        return LabelRule.from_meta(self.meta, self.classes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("base")
        for s in d["shards"]:  # optional per-shard fields only when recorded: older readers ignore them
            for k in ("size", "mtime", "offsets"):
                if not s[k]:
                    s.pop(k)
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


def manifest_path(location: str | Path, key: str = "data.*") -> Optional[Path]:
    """The manifest file of a local shard set ``location`` (a shard directory, or the ``.json`` file itself;
    ``~`` expanded); None for an http(s) URL, whose manifest is fetched when loaded. Raises
    :class:`DataError` when no manifest is there, telling to point config key ``key`` at one."""
    location = str(location)
    if _is_url(location):
        return None
    path = Path(location).expanduser()
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"no manifest at '{path}': point {key} at a shard directory written by "
                        f"'tldist shards' (it holds {MANIFEST_NAME}) or at the manifest file itself")
    return path


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
        path = manifest_path(location)
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
        shards = [ShardInfo(name=s["name"], num_samples=int(s["num_samples"]),
                            size=int(s["size"]) if s.get("size") is not None else None,
                            mtime=float(s["mtime"]) if s.get("mtime") is not None else None,
                            offsets=[[int(i), int(o)] for i, o in s.get("offsets") or []]) for s in d["shards"]]
        m = Manifest(split=d.get("split", ""), classes=list(d["classes"]), shards=shards,
                     meta=dict(d.get("meta", {})), base=base)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # AttributeError: not a JSON object
        raise DataError(f"manifest '{location}' is malformed ({type(e).__name__}: {e}); rewrite it with 'tldist shards'") from None
    if not m.shards:
        raise DataError(f"manifest '{location}' lists no shards")
    return m


def resolve_shard_urls(manifest: Manifest, pattern: Optional[str] = None, *, check_files: bool = True) -> list[str]:
    """Shard URLs for ``manifest``, optionally taken from a brace pattern instead of its location.

    ``pattern`` (e.g. ``pipe:aws s3 cp s3://bucket/train-{000000..000004}.tar -``) must expand to
    exactly one URL per manifest shard; they are matched by file name, so counts stay correct.
    With ``check_files``, a missing local shard raises :class:`DataError` naming it (one ``stat`` per shard;
    the loaders pass False and let rank 0 alone check, :func:`missing_shards`). The manifest's label rule is
    registered for the returned URLs (:func:`tldist.data.labels.register_shards`), so loader workers forked
    afterwards read their records' labels the way the manifest says.
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
    if check_files:
        for url in missing_shards(urls):
            raise DataError(f"shard '{url}' listed in the manifest does not exist; re-run 'tldist shards' or fix data.*_urls")
    register_shards(urls, manifest.label_rule)
    return urls


def missing_shards(urls: list[str]) -> list[str]:
    """The local shard files of ``urls`` that do not exist (one ``stat`` each; remote URLs are not checked: a
    missing one is found when it is opened)."""
    return [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]


def _basename(url: str) -> str:
    """File name of a shard URL; for ``pipe:`` commands, of the argument that names a tar."""
    if url.startswith("pipe:"):
        tars = [t for t in url[5:].split() if ".tar" in t]
        url = tars[-1] if tars else url
    return url.rsplit("/", 1)[-1]


# ---- shard-set identity and class lists ------------------------------------------------------
def read_classes(data_cfg) -> list[str]:
    """The class list training will use: the train manifests' class names merged by name, in order."""
    classes: list[str] = []
    for location in data_cfg.train:
        manifest = load_manifest(location)
        if not manifest.label_rule.labelled:
            raise ConfigError(f"data.train entry '{location}' has no labels (indexed with --label none): label it "
                              "with 'tldist pseudo-label' or index it again with --label cls|json:KEY|txt")
        for name in manifest.classes:
            if name not in classes:
                classes.append(name)
    return classes


def classes_without_samples(data_cfg) -> Optional[list[str]]:
    """Class names of the train sets (``data.train``, merged by name) that no training sample has, from the
    manifests' ``meta.class_counts``; None when a manifest does not record its counts (older shard sets).
    Such a class gets a head output that nothing trains (e.g. a CSV with 1-based labels: class ``0``)."""
    counts: dict[str, int] = {}
    for location in data_cfg.train:
        m = load_manifest(location)
        per_class = m.meta.get("class_counts")
        if not isinstance(per_class, list) or len(per_class) != m.num_classes:
            return None
        for name, n in zip(m.classes, per_class):
            counts[name] = counts.get(name, 0) + int(n)
    return [name for name, n in counts.items() if n == 0]


def shard_set_id(location: str) -> tuple[str, ...]:
    """Path components that identify a shard set: a local path made absolute and normalised (a
    trailing ``manifest.json`` dropped), a URL's scheme then host and path components."""
    location = str(location).rstrip("/")
    if location.endswith("manifest.json"):
        location = location[: -len("manifest.json")].rstrip("/")
    scheme, sep, rest = location.partition("://")
    if sep:
        return (scheme + ":", *[p for p in rest.split("/") if p])
    return tuple(p for p in os.path.abspath(location).split(os.sep) if p)


def eval_set_names(locations: list[str], keys: list[str] = (), reserved: tuple[str, ...] = ("val",)) -> list[str]:
    """Distinct names for shard sets: ``.../digits/val`` -> ``digits/val``, longer tails where two sets share
    one (``/x/a/shards/val``, ``/x/b/shards/val`` -> ``a/shards/val``, ``b/shards/val``), never a ``reserved`` name.

    Raises :class:`ConfigError` naming both config keys (``keys[i]``, default ``locations[i]``) when two
    locations are the same shard set: it would be scored twice under one name.
    """
    keys = list(keys) or [f"'{loc}'" for loc in locations]
    ids = [shard_set_id(loc) for loc in locations]
    first: dict[tuple[str, ...], int] = {}
    for i, set_id in enumerate(ids):
        if set_id in first:
            j = first[set_id]
            raise ConfigError(f"config keys {keys[j]} ({locations[j]}) and {keys[i]} ({locations[i]}) name the same "
                              "shard set: list each eval set once")
        first[set_id] = i
    parts = [[p for p in set_id if not p.endswith(":")] or list(set_id) for set_id in ids]
    depth = [min(2, len(p)) for p in parts]
    while True:
        names = ["/".join(p[len(p) - d:]) for p, d in zip(parts, depth)]
        clash = [i for i, n in enumerate(names) if names.count(n) > 1 or n in reserved]
        grow = [i for i in clash if depth[i] < len(parts[i])]
        if not grow:
            # only a whole path equal to a reserved name is left (e.g. '/val'): use the location itself
            return [str(locations[i]) if i in clash else n for i, n in enumerate(names)]
        for i in grow:
            depth[i] += 1


def eval_sets(data_cfg) -> list[tuple[str, str]]:
    """``(name, location)`` of every eval set: ``data.val`` as ``val``, then ``data.val_sets`` under
    distinct names (:func:`eval_set_names`). Raises :class:`ConfigError` when an entry repeats another
    one or ``data.val``."""
    extra = [entry.path for entry in val_set_entries(data_cfg.val_sets)]  # an entry may carry scoring options
    locations = ([data_cfg.val] if data_cfg.val else []) + extra
    keys = (["'data.val'"] if data_cfg.val else []) + [f"'data.val_sets[{i}]'" for i in range(len(extra))]
    eval_set_names(locations, keys)  # no set twice (data.val included)
    return ([("val", data_cfg.val)] if data_cfg.val else []) + list(zip(eval_set_names(extra), extra))


def check_num_classes(model_cfg, classes: list[str], source: str) -> int:
    """``model.num_classes`` (0 = from the manifest) must agree with the manifest."""
    if model_cfg.num_classes and model_cfg.num_classes != len(classes):
        raise ConfigError(f"config key 'model.num_classes' is {model_cfg.num_classes} but {source} has "
                          f"{len(classes)} classes ({', '.join(classes[:5])}{'...' if len(classes) > 5 else ''}); "
                          "set model.num_classes=0 to take the manifest's count")
    return len(classes)
