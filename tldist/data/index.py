"""``tldist shards index``: a manifest for WebDataset shards another tool wrote, the tars left as they are.

Shards written by ``wds.ShardWriter``, img2dataset, DataComp or timm's ``*-wds`` sets on the Hub are trained
on in place: this module writes only ``manifest.json`` (per-shard sample counts, the class list, how labels
are read, a sparse seek index), whose shard names are absolute paths or URLs when the tars live elsewhere.

* **Sources** (:func:`expand_sources`): a directory (its ``*.tar``; or the splits named by timm's ``_info.json``
  or by wids shard indexes, ``*.json`` with a ``shardlist``), a brace pattern (``/data/x-{000000..000999}.tar``)
  or glob, a list file (one path or URL a line), a wids index file, or URLs (``http(s)://``, ``pipe:``, ``s3://``).
* **Counting** (:func:`scan_shard`): tar headers only; member data is seeked over (read past on streams),
  except the small label members (``.cls``/``.json``/``.txt``) when labels must be read. Shards are scanned
  by ``workers`` processes. A sample is the webdataset group of consecutive members with the same key (the
  member name up to the first dot of its base name: ``base_plus_ext``).
* **Counts from index files**: when ``_info.json`` (``splits.<name>.shard_lengths``) or a wids index
  (``shardlist[i].nsamples``) gives the counts and the class names need no reading (``--classes``, or the
  names in ``_info.json``), only ``check`` shards (first, last, seeded picks) are counted, and a mismatch
  stops with the shard named; ``recount`` counts every shard.
* **Classes**: ``--classes FILE`` (one name a line; its order is the class order), else ``_info.json``'s names
  (``label_names``/``classes``, or a ClassLabel's ``names`` under ``features``), else from the labels:
  class indices ``0..max`` named ``"0"``, ``"1"``...; class names sorted.
* **Unusable samples** (no image member, no label, a label outside the classes) are counted and named in
  ``meta.unusable``/``meta.unusable_examples``; more than ``max_unusable`` of the samples stops the index with
  the first one named (training skips the others as it skips corrupt samples). A shard without any image
  member always stops it.
* **Re-runs**: a shard whose size and modification time (local files; ``Content-Length``/``Last-Modified``
  over HTTP; S3's object size and time) are unchanged keeps its count, seek index and labels; the others
  are counted again. A re-run that changes nothing leaves the manifest untouched. The per-shard label
  counts that let a re-run skip unchanged shards are kept beside the manifest in ``.tldist-index.json``
  (a cache: without it a re-run reads every shard's labels again).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import random
import urllib.request
from collections import Counter
from email.utils import parsedate_to_datetime
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, BinaryIO, Optional, Sequence, Union

from braceexpand import braceexpand
from webdataset.tariterators import base_plus_ext

import tldist
from tldist.data.labels import LabelError, LabelRule
from tldist.data.manifest import MANIFEST_NAME, SEEK_EVERY, Manifest, ShardInfo, load_manifest
from tldist.data.retry import is_remote, open_shard
from tldist.data.tar import iter_members
from tldist.errors import ConfigError, DataError
from tldist.paths import check_output_dir, make_output_dir
from tldist.s3 import client as s3_client, split_url

log = logging.getLogger("tldist.data")

CACHE_NAME = ".tldist-index.json"
INFO_NAMES = ("_info.json", "info.json")
"""timm's dataset info files (``timm/data/readers/reader_wds.py``), looked for in a source directory."""
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd
MAX_EXAMPLES = 10
DEFAULT_CHECK = 3


@dataclass
class Split:
    """One shard set to index: its shards and what index files said about it."""

    name: str
    """``train``, ``validation``... (the output goes to ``OUT/<name>`` when the source defines splits)."""
    urls: list[str]
    """Shard paths or URLs, in order."""
    counts: Optional[list[int]] = None
    """Samples per shard from an index file (``_info.json``/wids), checked before use; None: count them."""
    counts_from: str = ""
    """Which file gave ``counts``."""
    classes: Optional[list[str]] = None
    """Class names from ``_info.json``, if it had them."""
    named: bool = False
    """Named by an index file (``_info.json`` splits, a wids index): indexed into ``OUT/<name>``."""


@dataclass
class ShardScan:
    """What scanning one shard found (picklable: scans run in worker processes)."""

    url: str
    num_samples: int = 0
    offsets: list[list[int]] = field(default_factory=list)
    values: dict[Any, int] = field(default_factory=dict)
    """Raw label value (int index or str name) -> samples with it."""
    unusable: int = 0
    examples: list[str] = field(default_factory=list)
    """``key: reason`` of the first unusable samples."""
    members: dict[str, int] = field(default_factory=dict)
    """Member extension -> count (what the shard holds)."""
    images: int = 0
    """Samples with an image member."""
    size: Optional[int] = None
    mtime: Optional[float] = None


class _Tracked:
    """A shard stream that counts the bytes consumed and notes where the header blocks of each member start.

    :func:`~tldist.data.tar.iter_members` reads a member's header blocks, asks ``select``, then seeks over
    (or reads) its data: so the first ``read`` after the previous member was passed over is the start of the
    next member's headers (``mark``), and ``arm()`` is called once a member is done. Forward seeks on a
    non-seekable stream read and drop the bytes.
    """

    def __init__(self, raw: BinaryIO):
        self.raw, self.pos, self.mark, self.armed, self.head = raw, 0, 0, True, b""
        self._seek = bool(getattr(raw, "seekable", lambda: False)())

    def read(self, n: int = -1) -> bytes:
        if self.armed:
            self.mark, self.armed = self.pos, False
        data = self.raw.read(n)
        if self.pos == 0:
            self.head = data[:6]
        self.pos += len(data)
        return data

    def arm(self) -> None:
        self.armed = True

    def seekable(self) -> bool:
        return True

    def seek(self, n: int, whence: int = 1) -> int:
        if whence != 1 or n < 0:
            raise ValueError("only forward relative seeks")
        if self._seek:
            self.raw.seek(n, 1)
        else:
            left = n
            while left > 0:
                chunk = self.raw.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
        self.pos += n
        return self.pos

    def close(self) -> None:
        self.raw.close()


def scan_shard(url: str, rule: LabelRule, read_labels: bool = True) -> ShardScan:
    """Count the samples of the shard at ``url`` from its tar headers, with the byte offset of every
    :data:`~tldist.data.manifest.SEEK_EVERY`-th sample's first member and, when ``read_labels``, the raw
    label of each sample (only the label members' bytes are read).

    Raises :class:`DataError` naming the shard when it cannot be read or is not a tar.
    """
    out = ShardScan(url)
    out.size, out.mtime = stat_shard(url)
    label_ext = rule.member if read_labels and rule.labelled else None
    images = set(rule.image)
    key: Optional[str] = None
    fields: dict[str, bytes] = {}
    exts: set[str] = set()
    values: Counter = Counter()
    members: Counter = Counter()

    def finish() -> None:
        if key is None:
            return
        problem = ""
        if not exts & images:
            problem = f"no image member (found {', '.join(sorted(exts))})"
        elif label_ext is not None:
            try:
                values[rule.raw(fields)] += 1
            except LabelError as e:
                problem = str(e)
        if exts & images:
            out.images += 1
        if problem:
            out.unusable += 1
            if len(out.examples) < MAX_EXAMPLES:
                out.examples.append(f"{key}: {problem}")

    def select(name: str) -> bool:
        nonlocal key, fields, exts
        prefix, ext = base_plus_ext(name)
        if prefix is None:  # no extension: not part of a sample (webdataset skips it too)
            stream.arm()
            return False
        ext = ext.lower()
        if prefix != key:
            finish()
            if out.num_samples % SEEK_EVERY == 0:
                out.offsets.append([out.num_samples, stream.mark])
            key, fields, exts = prefix, {}, set()
            out.num_samples += 1
        exts.add(ext)
        members[ext] += 1
        if ext == label_ext:
            return True  # arm() once it is read
        stream.arm()
        return False

    try:
        stream = _Tracked(open_shard(url))
    except Exception as e:  # DataError (S3), OSError, ValueError (webdataset: no handler)
        raise DataError(f"shard '{url}' cannot be opened: {e}") from None
    try:
        for name, data in iter_members(stream, select):
            fields[base_plus_ext(name)[1].lower()] = data
            stream.arm()
        finish()
    except DataError:
        raise
    except Exception as e:  # tarfile.ReadError, ValueError (bad number), OSError, a command that failed
        failure = getattr(stream.raw, "failure", None)
        if failure:  # the download or command failed, not the tar
            raise DataError(f"shard '{url}' could not be read to its end after {out.num_samples} samples "
                            f"({failure})") from None
        raise DataError(f"shard '{url}' is not a readable tar after {out.num_samples} samples "
                        f"({type(e).__name__}: {e}); check it with 'tar tf'") from None
    finally:
        try:
            stream.close()
        except Exception as e:  # a command (curl, pipe:) that failed after the tar's end blocks
            raise DataError(f"shard '{url}' could not be read to its end ({e})") from None
    if stream.head.startswith(_COMPRESSED):
        out.offsets = []  # byte offsets inside a compressed stream cannot be seeked to
    out.values, out.members = dict(values), dict(members)
    return out


def stat_shard(url: str) -> tuple[Optional[int], Optional[float]]:
    """``(size in bytes, modification time in seconds)`` of a shard when its location can tell without
    reading it: local files, ``http(s)://`` (``Content-Length``, ``Last-Modified``), ``s3://``; else
    ``(None, None)`` (``pipe:`` commands)."""
    try:
        if not is_remote(url):
            st = os.stat(url)
            return st.st_size, st.st_mtime
        if url.startswith(("http://", "https://")):
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=30) as r:
                length, modified = r.headers.get("Content-Length"), r.headers.get("Last-Modified")
            return (int(length) if length else None,
                    parsedate_to_datetime(modified).timestamp() if modified else None)
        if url.startswith("s3://"):
            bucket, key = split_url(url)
            head = s3_client().head_object(Bucket=bucket, Key=key)
            return int(head["ContentLength"]), head["LastModified"].timestamp()
    except (OSError, ValueError, DataError):
        return None, None
    except Exception:  # botocore's ClientError and friends: the shard is unchanged-unknown, so it is counted
        return None, None
    return None, None


# ---- sources --------------------------------------------------------------------------------------
def expand_sources(sources: Sequence[str], split: Optional[str] = None) -> list[Split]:
    """The shard sets named by ``sources`` (see the module docstring). A directory or index file that names
    splits gives one :class:`Split` each (only ``split`` when given); everything else is one split, named
    ``split`` (default ``train``). Raises :class:`DataError` naming the source that matches no shard."""
    if not sources:
        raise ConfigError("give at least one SOURCE: a shard directory, a brace pattern, a list file or URLs")
    if len(sources) == 1 and not is_remote(sources[0]) and "{" not in sources[0]:
        path = Path(sources[0]).expanduser()
        splits = None
        if path.is_dir():
            splits = _dir_splits(path)
        elif path.suffix == ".json" and path.is_file():
            splits = _json_splits(path)
        if splits is not None:
            if split is not None:
                if split not in {s.name for s in splits}:
                    raise DataError(f"'{path}' names the splits {[s.name for s in splits]}, not '{split}': "
                                    "pick one of them with --split")
                splits = [s for s in splits if s.name == split]
            return splits
    urls: list[str] = []
    for source in sources:
        urls += _expand_one(source)
    return [Split(split or "train", urls)]


def _dir_splits(path: Path) -> Optional[list[Split]]:
    """Splits of a directory: from its ``_info.json``, its wids indexes, else all its shards (one split)."""
    for name in INFO_NAMES:
        if (path / name).is_file():
            splits = _json_splits(path / name)
            if splits:
                return splits
    wids = []
    for f in sorted(path.glob("*.json")):
        if f.name == MANIFEST_NAME or f.name.endswith("_stats.json") or f.stat().st_size > 64 << 20:
            continue
        doc = _read_json(f)
        if isinstance(doc, dict) and "shardlist" in doc:
            wids += _wids_splits(f, doc)
    if wids:
        return wids
    shards = sorted(str(p) for p in path.iterdir() if p.name.endswith(SHARD_SUFFIXES) and p.is_file())
    if not shards:
        raise DataError(f"directory '{path}' holds no shards (*.tar, *.tar.gz) and no _info.json or wids index")
    return [Split("", shards)]  # named by the caller's --split


def _json_splits(path: Path) -> list[Split]:
    doc = _read_json(path)
    if not isinstance(doc, dict):
        raise DataError(f"'{path}' is not a JSON object; give a timm _info.json or a wids shard index")
    if "shardlist" in doc:
        return _wids_splits(path, doc)
    splits = doc.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise DataError(f"'{path}' has neither 'splits' (timm _info.json) nor 'shardlist' (wids); "
                        "point SOURCE at the shards themselves")
    classes = info_classes(doc)
    out = []
    for name, s in splits.items():
        try:
            files, lengths = list(s["filenames"]), [int(n) for n in s.get("shard_lengths") or []]
        except (KeyError, TypeError, ValueError):
            raise DataError(f"'{path}' split '{name}' lacks 'filenames' (timm's _info.json format)") from None
        urls = [f if is_remote(f) or f.startswith("/") else str(path.parent / f) for f in files]
        ok = len(lengths) == len(urls)
        out.append(Split(str(s.get("name") or name), urls, lengths if ok else None, path.name if ok else "", classes,
                         named=True))
    return out


def _wids_splits(path: Path, doc: dict[str, Any]) -> list[Split]:
    try:
        shards = [(str(s["url"]), int(s["nsamples"])) for s in doc["shardlist"]]
    except (KeyError, TypeError, ValueError):
        raise DataError(f"'{path}' is not a wids shard index: every 'shardlist' entry needs 'url' and 'nsamples'") \
            from None
    base = str(doc.get("base") or "")
    urls = [u if is_remote(u) or u.startswith("/") else
            (base.rstrip("/") + "/" + u if base else str(path.parent / u)) for u, _ in shards]
    name = path.stem if path.stem not in ("_info", "info") else "train"
    return [Split(name, urls, [n for _, n in shards], path.name, named=True)]


def info_classes(info: dict[str, Any]) -> Optional[list[str]]:
    """Class names from a dataset info file: ``label_names``, ``classes`` or ``class_names``, or the ``names``
    of a ClassLabel feature (Hugging Face's ``features``); None when it has none."""
    for k in ("label_names", "classes", "class_names"):
        if isinstance(info.get(k), list) and info[k]:
            return [str(c) for c in info[k]]
    features = info.get("features")
    if isinstance(features, dict):
        for feat in features.values():
            if isinstance(feat, dict) and isinstance(feat.get("names"), list) and feat["names"]:
                return [str(c) for c in feat["names"]]
    return None


def _expand_one(source: str) -> list[str]:
    """Shard URLs of one SOURCE argument (a pattern, a list file, a shard or a URL)."""
    if is_remote(source):
        return list(braceexpand(source))
    expanded = list(braceexpand(source)) if "{" in source else [source]
    if len(expanded) == 1 and any(c in source for c in "*?["):
        found = sorted(glob.glob(os.path.expanduser(source)))
        if not found:
            raise DataError(f"pattern '{source}' matches no file; check the path and the pattern")
        return found
    paths = [os.path.expanduser(p) for p in expanded]
    if len(paths) == 1 and Path(paths[0]).is_file() and not paths[0].endswith(SHARD_SUFFIXES):
        return _list_file(Path(paths[0]))
    missing = [p for p in paths if not Path(p).is_file()]
    if len(missing) == len(paths):
        what = "brace pattern" if "{" in source else "shard"
        raise DataError(f"{what} '{source}' matches no file (e.g. '{missing[0]}' does not exist); check the path "
                        "and the {first..last} range")
    if missing:
        raise DataError(f"brace pattern '{source}' names {len(missing)} missing shards, e.g. '{missing[0]}'; "
                        "fix the range or the set")
    return paths


def _list_file(path: Path) -> list[str]:
    """Shards listed one a line (``#`` comments and blank lines skipped; relative paths from the file's folder)."""
    try:
        lines = [ln.strip() for ln in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"list file '{path}' cannot be read ({e}); give one shard path or URL a line") from None
    urls = []
    for ln in lines:
        if not ln or ln.startswith("#"):
            continue
        if is_remote(ln) or ln.startswith("/"):
            urls += list(braceexpand(ln))
        else:
            urls += [str(path.parent / p) for p in braceexpand(ln)]
    if not urls:
        raise DataError(f"list file '{path}' lists no shards; give one shard path or URL a line")
    missing = [u for u in urls if not is_remote(u) and not Path(u).is_file()]
    if missing:
        raise DataError(f"list file '{path}' names {len(missing)} missing shards, e.g. '{missing[0]}'")
    return urls


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"'{path}' cannot be read as JSON ({e})") from None


# ---- indexing -------------------------------------------------------------------------------------
def read_class_file(path: Optional[str]) -> Optional[list[str]]:
    """Class names from ``--classes FILE`` (one a line, blank lines skipped); None without a file."""
    if not path:
        return None
    try:
        names = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--classes '{path}' cannot be read: {e}") from None
    if not names:
        raise ConfigError(f"--classes '{path}' is empty; write one class name per line")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"--classes '{path}' lists '{dup}' twice; each class name once")
    return names


def _scan_job(args: tuple[str, LabelRule, bool]) -> Union[ShardScan, DataError]:
    try:
        return scan_shard(*args)
    except DataError as e:  # returned, not raised: the pool reports the first one by shard order
        return e


def _scan_all(urls: Sequence[str], rule: LabelRule, read_labels: bool, workers: int) -> list[ShardScan]:
    jobs = [(u, rule, read_labels) for u in urls]
    if workers <= 1 or len(jobs) <= 1:
        results = [_scan_job(j) for j in jobs]
    else:
        with get_context("fork").Pool(min(workers, len(jobs))) as pool:
            results = pool.map(_scan_job, jobs, chunksize=1)
    for r in results:
        if isinstance(r, DataError):
            raise r
    return results  # type: ignore[return-value]


def _name_in(url: str, out: Path) -> str:
    """How the manifest names a shard: relative to ``out`` when it lies inside it, else absolute or the URL."""
    if is_remote(url):
        return url
    p = Path(url).resolve()
    try:
        return str(p.relative_to(out.resolve()))
    except ValueError:
        return str(p)


def index_split(split: Split, out: str | Path, *, label: str = "cls", classes_file: Optional[str] = None,
                workers: int = 1, recount: bool = False, check: int = DEFAULT_CHECK, max_unusable: float = 0.0,
                seed: int = 0) -> tuple[Manifest, str]:
    """Write ``out/manifest.json`` for ``split`` (see the module docstring); returns ``(manifest, what
    happened)``: ``indexed``, ``re-indexed: K of N shards counted again`` or ``unchanged``.

    Raises :class:`DataError` naming the shard for unreadable shards, a shard without image members, counts
    that disagree with an index file, or more than ``max_unusable`` (a fraction) unusable samples;
    :class:`ConfigError` for bad options.
    """
    out = Path(out)
    check_output_dir(out, "OUT")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1 processes, got {workers}")
    if not 0 <= max_unusable < 1:
        raise ConfigError(f"--max-unusable {max_unusable} must be a fraction in [0, 1)")
    names = read_class_file(classes_file)
    probe = LabelRule.parse(label)
    read_labels = probe.labelled
    if not split.urls:
        raise DataError(f"split '{split.name}' lists no shards")
    split.urls = [u if is_remote(u) else os.path.abspath(u) for u in split.urls]
    options = {"label": label, "classes": names, "sources": split.urls, "max_unusable": max_unusable,
               "counts_from": split.counts_from}
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]
    old, cache = _previous(out, digest)
    known = names or split.classes
    trust = split.counts is not None and not recount and (known is not None or not read_labels)
    stats = [stat_shard(u) for u in split.urls] if (old is not None or cache) else None
    # -- which shards must be read: changed ones (or all), minus those an index file vouches for
    scans: dict[int, ShardScan] = {}
    reuse: dict[int, dict[str, Any]] = {}
    for i, url in enumerate(split.urls):
        entry = cache.get(url)
        if entry is not None and stats is not None and stats[i][0] is not None \
                and [entry.get("size"), entry.get("mtime")] == list(stats[i]):
            reuse[i] = entry
    todo = [i for i in range(len(split.urls)) if i not in reuse]
    checked: list[str] = []
    if trust:
        picks = _check_picks(len(split.urls), check, seed)
        checked = [split.urls[i] for i in picks]
        todo = [i for i in todo if i in picks]
    for i, s in zip(todo, _scan_all([split.urls[i] for i in todo], probe, read_labels, workers)):
        if trust and s.num_samples != split.counts[i]:
            raise DataError(f"shard '{split.urls[i]}' holds {s.num_samples} samples but {split.counts_from} says "
                            f"{split.counts[i]}; the index file is stale: index with --recount")
        scans[i] = s
    if old is not None and not scans and len(reuse) == len(split.urls):
        return old, "unchanged"
    # -- per shard: a fresh scan, a reused cache entry, or (trusted) the index file's count
    shards, per_shard = [], []
    for i, url in enumerate(split.urls):
        if i in scans:
            s = scans[i]
            entry = {"size": s.size, "mtime": s.mtime, "num_samples": s.num_samples, "offsets": s.offsets,
                     "values": _encode_values(s.values), "unusable": s.unusable, "examples": s.examples,
                     "members": s.members, "images": s.images, "labels_read": read_labels}
        elif i in reuse:
            entry = reuse[i]
        else:
            size, mtime = stats[i] if stats is not None else stat_shard(url)
            entry = {"size": size, "mtime": mtime, "num_samples": split.counts[i], "offsets": [], "values": None,
                     "unusable": 0, "examples": [], "members": {}, "images": split.counts[i], "labels_read": False}
        if entry["num_samples"] and entry["members"] and not entry["images"]:
            found = ", ".join(f".{e}" for e in sorted(entry["members"])) or "nothing"
            raise DataError(f"shard '{url}' has no image member in any sample (found {found}; images are read "
                            f"from {', '.join(probe.image[:4])}...); it is not an image shard set")
        per_shard.append(entry)
        shards.append(ShardInfo(_name_in(url, out), int(entry["num_samples"]), size=entry["size"],
                                mtime=entry["mtime"], offsets=[list(o) for o in entry["offsets"]]))
    classes, values_kind, class_counts = _resolve_classes(split, probe, names, per_shard)
    rule = LabelRule(member=probe.member, key=probe.key, values=values_kind, classes=tuple(classes))
    unusable, examples = _unusable(split, per_shard, rule, classes)
    total = sum(s.num_samples for s in shards)
    if total == 0:
        raise DataError(f"the shards of '{split.name or 'SOURCE'}' hold no samples (first: '{split.urls[0]}')")
    if unusable > max_unusable * total:
        raise DataError(f"{unusable} of {total} samples have no usable image or label, e.g. {examples[0]}; fix the "
                        f"set or pick the label with --label, or index anyway with --max-unusable "
                        f"{max(0.001, round(unusable / total * 1.5, 3))} (training skips them like corrupt samples)")
    members: Counter = Counter()
    for e in per_shard:
        members.update(e["members"])
    meta: dict[str, Any] = {
        "tldist_version": tldist.__version__,
        "source": {"type": "index", "sources": split.urls[:3] + (["..."] if len(split.urls) > 3 else []),
                   "counts_from": split.counts_from if trust else "tar headers", "checked": checked},
        "index": {"digest": digest, "label": label, "classes_file": classes_file},
        "labels": rule.to_meta(),
        "unusable": unusable, "unusable_examples": examples,
        "members": dict(sorted(members.items())),
    }
    if class_counts is not None:
        meta["class_counts"] = class_counts
    manifest = Manifest(split=split.name or "train", classes=list(classes), shards=shards, meta=meta, base=str(out))
    make_output_dir(out, "OUT")
    manifest.save(out / MANIFEST_NAME)
    _write_cache(out, digest, {u: e for u, e in zip(split.urls, per_shard)})
    counted = len(scans)
    what = "indexed" if old is None else f"re-indexed: {counted} of {len(shards)} shards counted again"
    return manifest, what


def _check_picks(n: int, check: int, seed: int) -> list[int]:
    """The shards counted to check an index file: the first, the last and seeded random ones (``check`` in all)."""
    if check <= 0 or n == 0:
        return []
    picks = {0, n - 1}
    rest = [i for i in range(n) if i not in picks]
    random.Random(seed).shuffle(rest)
    return sorted(list(picks)[:check] + rest[:max(0, check - 2)])


def _encode_values(values: dict[Any, int]) -> list[list[Any]]:
    return [[v, n] for v, n in values.items()]


def _resolve_classes(split: Split, rule: LabelRule, names: Optional[list[str]], per_shard: list[dict[str, Any]]):
    """``(classes, 'indices'|'names', class_counts or None)`` from the options and the labels read."""
    if not rule.labelled:
        return list(names or split.classes or []), "indices", None
    counts: Counter = Counter()
    complete = True
    for e in per_shard:
        if e["values"] is None:
            complete = False
            continue
        for v, n in e["values"]:
            counts[v] += n
    kinds = {type(v) for v in counts}
    if kinds == {int, str}:
        ex_i, ex_s = next(v for v in counts if isinstance(v, int)), next(v for v in counts if isinstance(v, str))
        raise DataError(f"labels under --label {rule.spec} mix class indices and names (e.g. {ex_i} and {ex_s!r}); "
                        "fix the set's labels")
    by_name = rule.member == "txt" or kinds == {str}
    given = names or split.classes
    if by_name:
        classes = list(given) if given else sorted(str(v) for v in counts)
        index = {c: i for i, c in enumerate(classes)}
        class_counts = [0] * len(classes)
        for v, n in counts.items():
            if str(v) in index:
                class_counts[index[str(v)]] += n
        return classes, "names", class_counts if complete else None
    top = max((v for v in counts if v >= 0), default=-1)
    if given:
        classes = list(given)
    else:
        classes = [str(i) for i in range(top + 1)]
    class_counts = [0] * len(classes)
    for v, n in counts.items():
        if 0 <= v < len(classes):
            class_counts[v] += n
    return classes, "indices", class_counts if complete else None


def _unusable(split: Split, per_shard: list[dict[str, Any]], rule: LabelRule, classes: list[str]):
    """Samples without an image or label, plus labels outside the classes: ``(count, examples)``."""
    count, examples = 0, []
    valid = set(classes) if rule.values == "names" else None
    for url, e in zip(split.urls, per_shard):
        count += e["unusable"]
        examples += [f"shard '{url}': sample {x}" for x in e["examples"]][:MAX_EXAMPLES - len(examples)]
        for v, n in e["values"] or []:
            bad = (str(v) not in valid) if valid is not None else not (isinstance(v, int) and 0 <= v < len(classes))
            if bad and rule.labelled:
                count += n
                if len(examples) < MAX_EXAMPLES:
                    what = f"class name {v!r} is not in the class list" if valid is not None else \
                        f"label {v} is outside the {len(classes)} classes"
                    examples.append(f"shard '{url}': {n} sample(s): {what}")
    return count, examples


def _previous(out: Path, digest: str) -> tuple[Optional[Manifest], dict[str, dict[str, Any]]]:
    """The manifest and per-shard cache of an earlier index of ``out`` with the same options, else (None, {})."""
    path = out / CACHE_NAME
    if not path.is_file() or not (out / MANIFEST_NAME).is_file():
        return None, {}
    try:
        cache = json.loads(path.read_text())
        m = load_manifest(out)
    except (OSError, ValueError, DataError):
        return None, {}
    if cache.get("digest") != digest or m.meta.get("index", {}).get("digest") != digest:
        return None, {}
    return m, dict(cache.get("shards") or {})


def _write_cache(out: Path, digest: str, shards: dict[str, dict[str, Any]]) -> None:
    tmp = out / (CACHE_NAME + ".tmp")
    tmp.write_text(json.dumps({"digest": digest, "shards": shards}))
    os.replace(tmp, out / CACHE_NAME)


def index_shards(sources: Sequence[str], out: str | Path, *, split: Optional[str] = None,
                 **kw: Any) -> dict[str, tuple[Manifest, str]]:
    """Index every split of ``sources`` (:func:`expand_sources`): into ``out`` for a single set, into
    ``out/<split>`` when the source names splits (``_info.json``, wids indexes). Options are those of
    :func:`index_split`. Returns ``{output directory: (manifest, what happened)}``."""
    splits = expand_sources(sources, split)
    named = any(s.named for s in splits)
    result = {}
    for s in splits:
        s.name = s.name or split or "train"
        target = Path(out) / s.name if named else Path(out)
        result[str(target)] = index_split(s, target, **kw)
    return result


def summary(path: str, manifest: Manifest, what: str) -> str:
    """One line per indexed split (plus the unusable samples, when any)."""
    m = manifest
    rule = m.label_rule
    line = (f"{m.split}: {path}  {len(m.shards)} shards  {m.num_samples} samples  {m.num_classes} classes  "
            f"labels: {rule.spec}{' (names)' if rule.values == 'names' else ''}  [{what}]")
    if m.meta.get("unusable"):
        line += f"\n  {m.meta['unusable']} unusable samples (skipped in training), e.g. {m.meta['unusable_examples'][0]}"
    return line

