"""How a sample's label and image are read from its tar members, the way its manifest says.

tldist's own shards hold ``<key>.<image ext>`` and ``<key>.cls`` (the class index in ASCII). Shard sets
indexed with ``tldist shards index`` may keep their labels elsewhere, as other writers do:

* ``cls``: the ``.cls`` member holds the class index as ASCII digits (``wds.ShardWriter``, timm's ``*-wds`` sets);
* ``json:KEY``: field ``KEY`` of the ``.json`` member, a class index (int) or a class name (string:
  img2dataset/DataComp metadata, timm's ``target_key``);
* ``txt``: the ``.txt`` member is the class name (UTF-8, surrounding whitespace dropped);
* ``none``: the set has no labels (unlabelled data for ``tldist pseudo-label``); the label is ``-1``.

A manifest records its rule in ``meta.labels`` (:meth:`LabelRule.to_meta`); a manifest without it is a
``cls`` set, read as tldist always read its own. The image is the first member whose extension is in
:attr:`LabelRule.image` (``meta.labels.image``; default :data:`IMAGE_EXTS`).

Everything that reads labels goes through :class:`LabelRule`: the training and eval workers
(:func:`tldist.data.worker.decode_record`), ``tldist shards verify``, ``subset`` and ``pseudo-label``.
Loader workers find the rule of a record by its shard URL (:func:`rule_for_shard`), registered when the
loader resolved the manifest's shard URLs (:func:`tldist.data.manifest.resolve_shard_urls`) before its
worker processes started.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Union

from tldist.errors import ConfigError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff", "pgm", "pbm", "pnm", "gif", "jpe", "jfif",
              "avif", "jp2")
"""Member extensions read as the image of a sample, in this order of preference (shards written by tldist hold
``jpg``, ``png`` or ``webp``; other writers' may hold the rest: the raster formats webdataset's image decoder
takes that tldist's decoders read)."""
LABEL_MEMBERS = ("cls", "json", "txt", "none")
"""Where a label can live (see the module docstring)."""


class LabelError(ValueError):
    """A sample without a usable label or image; the message says why (``no .json member``...)."""


@dataclass(frozen=True)
class LabelRule:
    """How to read one shard set's labels and images from a sample's members (``{ext: bytes}``)."""

    member: str = "cls"
    """``cls``, ``json``, ``txt`` or ``none``."""
    key: str = ""
    """The ``.json`` field holding the label (``member='json'`` only)."""
    values: str = "indices"
    """``indices`` (the member holds the class index) or ``names`` (it holds the class name, looked up in
    :attr:`classes`)."""
    classes: tuple[str, ...] = ()
    """The set's class names (position = class index); needed for ``values='names'``."""
    image: tuple[str, ...] = IMAGE_EXTS
    """Image member extensions, in order of preference."""
    _index: Mapping[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.member not in LABEL_MEMBERS:
            raise ConfigError(f"label member '{self.member}' is unknown: use one of {', '.join(LABEL_MEMBERS)}")
        if self.member == "json" and not self.key:
            raise ConfigError("a json label needs its field: write json:KEY, e.g. json:label")
        if self.values not in ("indices", "names"):
            raise ConfigError(f"label values '{self.values}' are unknown: use 'indices' or 'names'")
        object.__setattr__(self, "_index", {name: i for i, name in enumerate(self.classes)})

    # -- reading -------------------------------------------------------------------------------
    @property
    def spec(self) -> str:
        """The rule as ``tldist shards index --label`` writes it: ``cls``, ``json:KEY``, ``txt``, ``none``."""
        return f"json:{self.key}" if self.member == "json" else self.member

    @property
    def labelled(self) -> bool:
        """False for ``none`` (an unlabelled set)."""
        return self.member != "none"

    def raw(self, fields: Mapping[str, bytes]) -> Union[int, str, None]:
        """The label as stored: an int (class index) or a str (class name); None for an unlabelled set.

        Raises :class:`LabelError` when the member or field is missing or malformed.
        """
        if self.member == "cls":
            data = fields.get("cls")
            if data is None:
                raise LabelError("no .cls label member")
            try:
                return int(data.decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                raise LabelError(f"bad label {data[:20]!r} in .cls (expected ASCII digits)") from None
        if self.member == "json":
            data = fields.get("json")
            if data is None:
                raise LabelError("no .json member (the labels are read from its field "
                                 f"'{self.key}')")
            try:
                doc = json.loads(data)
            except ValueError as e:
                raise LabelError(f".json does not parse ({e})") from None
            if not isinstance(doc, dict) or self.key not in doc:
                have = sorted(doc)[:8] if isinstance(doc, dict) else type(doc).__name__
                raise LabelError(f"no field '{self.key}' in .json (it has {have})")
            value = doc[self.key]
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise LabelError(f".json field '{self.key}' is {value!r}, not a class index or name")
            return value
        if self.member == "txt":
            data = fields.get("txt")
            if data is None:
                raise LabelError("no .txt label member")
            try:
                return data.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise LabelError(f".txt label {data[:20]!r} is not UTF-8") from None
        return None

    def label(self, fields: Mapping[str, bytes]) -> int:
        """The class index of a sample (``-1`` for an unlabelled set); not range-checked for ``indices``.

        Raises :class:`LabelError` naming what is missing: the member, the field, or a class name that is
        not in :attr:`classes`.
        """
        value = self.raw(fields)
        if value is None:
            return -1
        if self.values == "names":
            index = self._index.get(str(value))
            if index is None:
                raise LabelError(f"class name {str(value)[:60]!r} is not one of the set's {len(self.classes)} classes")
            return index
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise LabelError(f"label {value[:60]!r} is a name, but this set's labels are class indices") from None
        return value

    def image_member(self, fields: Mapping[str, bytes]) -> tuple[str, bytes]:
        """``(ext, bytes)`` of the sample's image; :class:`LabelError` when it has none."""
        for ext in self.image:
            data = fields.get(ext)
            if data is not None:
                return ext, data
        raise LabelError(f"no image member (looked for {', '.join(self.image)}; found {sorted(fields)})")

    # -- manifests -------------------------------------------------------------------------------
    def to_meta(self) -> dict[str, Any]:
        """``meta.labels`` of a manifest (the class names are the manifest's own ``classes``)."""
        out: dict[str, Any] = {"member": self.member, "values": self.values}
        if self.key:
            out["key"] = self.key
        if self.image != IMAGE_EXTS:
            out["image"] = list(self.image)
        return out

    @classmethod
    def from_meta(cls, meta: Optional[Mapping[str, Any]], classes: Iterable[str]) -> "LabelRule":
        """The rule of a manifest from its ``meta`` and ``classes`` (no ``meta.labels``: tldist's ``cls``)."""
        d = (meta or {}).get("labels") or {}
        if not isinstance(d, Mapping):
            raise ConfigError(f"manifest meta.labels is {d!r}, not an object; re-run 'tldist shards index'")
        return cls(member=str(d.get("member", "cls")), key=str(d.get("key", "")),
                   values=str(d.get("values", "indices")), classes=tuple(classes),
                   image=tuple(d.get("image") or IMAGE_EXTS))

    @classmethod
    def parse(cls, spec: str, **kw: Any) -> "LabelRule":
        """A rule from ``--label``: ``cls``, ``json:KEY``, ``txt`` or ``none`` (``values`` etc. in ``kw``)."""
        member, _, key = str(spec).partition(":")
        if member not in LABEL_MEMBERS or (member == "json") != bool(key):
            raise ConfigError(f"--label '{spec}' is not a label rule: use cls, json:KEY (e.g. json:label), txt or none")
        values = kw.pop("values", "names" if member == "txt" else "indices")
        return cls(member=member, key=key, values=values, **kw)


DEFAULT_RULE = LabelRule()
"""tldist's own shards: the class index in ``.cls``, the image among :data:`IMAGE_EXTS`."""

_SHARD_RULES: dict[str, LabelRule] = {}


def register_shards(urls: Iterable[str], rule: LabelRule) -> None:
    """Remember ``rule`` for records of these shard URLs (see :func:`rule_for_shard`)."""
    for url in urls:
        if rule == DEFAULT_RULE:
            _SHARD_RULES.pop(url, None)
        else:
            _SHARD_RULES[url] = rule


def rule_for_shard(url: str) -> LabelRule:
    """The rule registered for the shard at ``url`` (by :func:`tldist.data.manifest.resolve_shard_urls`, in
    this process or the one that forked it), else :data:`DEFAULT_RULE`."""
    return _SHARD_RULES.get(url, DEFAULT_RULE)
