"""Class maps: which model class each class of an eval set is, when their names differ.

ImageNet-V2 stores its images in folders named by class *index* (``0`` ... ``999``), so its shard set's
class names are ``"0"``, ``"1"``... while the model's are WordNet ids or words. A class map says which
model class each set class is (``data.val_sets: [{path: ..., class_map: FILE}]``); labels are then matched
by the mapped name exactly as any other val set (:func:`tldist.data.pipeline.build_eval_loader`).

Two file formats:

- ``.json``: an object ``{"set class": model class}``, the model class given by name or by output index;
- any other suffix (timm's ``--class-map`` text file, ``timm.data.load_class_map``): line ``i`` (0-based,
  stripped) holds the set class name whose model class is output ``i``. For ImageNet-V2 the file is the
  lines ``0`` to ``999``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from tldist.errors import ConfigError, DataError


def read_class_map(path: str | Path, model_classes: list[str], key: str = "class_map") -> dict[str, str]:
    """``{set class name: model class name}`` from class-map file ``path`` (see the module docstring).

    Raises :class:`ConfigError` naming ``key`` and the file for an unreadable file, a line or value that
    names no model class (an index out of ``range(len(model_classes))`` or an unknown name), or a set class
    mapped twice.
    """
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config key '{key}': class map '{path}' cannot be read ({e}): give a UTF-8 .txt or "
                          ".json file") from None
    n = len(model_classes)
    if p.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"config key '{key}': class map '{path}' is not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config key '{key}': class map '{path}' must be a JSON object "
                              "{\"set class\": model class name or index}")
        pairs = list(raw.items())
    else:
        lines = text.splitlines()
        while lines and not lines[-1].strip():  # a trailing newline or blank end
            lines.pop()
        if len(lines) > n:
            raise ConfigError(f"config key '{key}': class map '{path}' has {len(lines)} lines but the model has {n} "
                              "outputs (line i names the set class of output i)")
        pairs = [(line.strip(), i) for i, line in enumerate(lines)]
    index = {c: i for i, c in enumerate(model_classes)}
    out: dict[str, str] = {}
    for set_class, target in pairs:
        model_index = _model_index(target, index, n)
        if model_index is None:
            raise ConfigError(f"config key '{key}': class map '{path}' maps '{set_class}' to {target!r}, which is no "
                              f"class of the model ({n} classes: {', '.join(model_classes[:3])}...)")
        if str(set_class) in out:
            raise ConfigError(f"config key '{key}': class map '{path}' maps set class '{set_class}' twice")
        out[str(set_class)] = model_classes[model_index]
    return out


def _model_index(target: object, index: dict[str, int], n: int) -> Optional[int]:
    if isinstance(target, bool):
        return None
    if isinstance(target, int):
        return target if 0 <= target < n else None
    return index.get(str(target))


def mapped_classes(set_classes: list[str], mapping: dict[str, str], where: str) -> list[str]:
    """The model class name of every set class, in the set's order; :class:`DataError` naming ``where``
    when a set class is missing from the map or two set classes map to one model class."""
    missing = [c for c in set_classes if c not in mapping]
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise DataError(f"{where}: the class map has no entry for set class(es) {missing[:5]}{more}: add them")
    out = [mapping[c] for c in set_classes]
    if len(set(out)) != len(out):
        dup = sorted({c for c in out if out.count(c) > 1})
        raise DataError(f"{where}: the class map sends several set classes to model class(es) {dup[:5]}: map each "
                        "set class to its own model class")
    return out


def loader_classes(model_classes: list[str], set_classes: list[str], mapped: list[str]) -> list[str]:
    """The class list to give the eval loader so that it labels set class ``set_classes[j]`` with the output
    index of model class ``mapped[j]``: the model's class list with each mapped model class renamed to its
    set class and every other entry to a name no set class has (so no set class matches by accident)."""
    at = {m: s for s, m in zip(set_classes, mapped)}
    taken = set(set_classes)
    out = []
    for i, c in enumerate(model_classes):
        if c in at:
            out.append(at[c])
        else:
            name = f"\0unmapped-{i}"
            while name in taken:  # pragma: no cover - a set class with a NUL byte
                name += "\0"
            out.append(name)
    return out
