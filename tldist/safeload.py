"""Loading ``torch.save`` files without running code from them.

``torch.load(weights_only=False)`` unpickles arbitrary objects, and an object's ``__reduce__``
can run any command while the file is read (PyTorch's security note on ``torch.load``). Every
``.pt``/``.pth`` file tldist reads goes through :func:`load_pickle_free` instead: torch's
``weights_only`` unpickler, which accepts tensors, primitive containers and the types named in
``allow`` only, and refuses anything else before constructing it.

Refusals are :class:`UnsafeFileError`, a one-line :class:`~tldist.errors.UserError` naming the
file and the global it tried to load.

TorchScript archives (``torch.jit.load``) are programs, not data: tldist loads only the ones it
has just written itself (``tldist compress``), see :func:`tldist.compress.load_script`.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from tldist.errors import UserError

_ANSI = re.compile(r"\x1b\[[0-9;]*m")

TRAINER_GLOBALS: tuple[Any, ...] = (argparse.Namespace,)
"""Types that other trainers' checkpoints hold besides tensors and plain data: torchvision's
reference ``train.py`` and timm's ``train.py`` save their command-line ``args`` as an
``argparse.Namespace`` (a bag of attributes; its values still pass the same checks)."""


class UnsafeFileError(UserError):
    """A file holds objects that would need arbitrary code to load; it was not unpickled."""


def _clean(text: str) -> str:
    """``text`` without ANSI escapes, on one line."""
    return " ".join(_ANSI.sub("", text).split())


def _offending_global(message: str) -> str | None:
    """The global torch's weights_only unpickler refused (``posix.system``...), if that was the reason."""
    text = _ANSI.sub("", message)
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"GLOBAL ([\w.]+)", text)
    return m.group(1) if m else None


def _reason(message: str) -> str:
    """The specific part of torch's (long, multi-paragraph) load error."""
    text = _ANSI.sub("", message)
    m = re.search(r"Unsupported operand (\d+)", text)
    if m:
        return f"pickle opcode {m.group(1)} is not allowed by the safe loader"
    m = re.search(r"WeightsUnpickler error: (.+)", text)
    if m and m.group(1).strip():
        return _clean(m.group(1))[:200]
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return _clean(lines[-1] if lines else type(message).__name__)[:200] or "empty file"


def load_pickle_free(path: str | Path, *, what: str, allow: Sequence[Any] = (), map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with ``allow`` added to torch's safe globals.

    Args:
        path: a file written by ``torch.save`` (zip or legacy format).
        what: how messages name the file's role, e.g. ``"checkpoint member"`` or ``"model.checkpoint"``.
        allow: extra classes/functions the file may reference (e.g. :data:`TRAINER_GLOBALS`). Only
            data-like types belong here: an allowed type is constructed without its ``__init__``.
        map_location: as for ``torch.load``.

    Returns:
        The loaded object: tensors, primitive containers and instances of ``allow`` only.

    Raises:
        UnsafeFileError: the file references a global outside the allow-list (nothing of it ran);
            the one-line message names the file and the global.
        UserError: the file is missing, empty, truncated or not a ``torch.save`` file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} '{path}' does not exist (or is not a file)")
    try:
        with warnings.catch_warnings():
            # "Detected pickle protocol N": noise for files written by plain pickle, refused or not.
            warnings.filterwarnings("ignore", message=".*pickle protocol.*", category=UserWarning)
            with torch.serialization.safe_globals(list(allow)):
                return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        name = _offending_global(str(e))
        if name is not None:
            raise UnsafeFileError(
                f"refusing to load {what} '{path}': it references {name}, which is not on tldist's list of "
                "safe types (loading it could run code); nothing was executed. Use a file of tensors and plain data "
                "only, e.g. torch.save(model.state_dict(), 'clean.pt') from a trusted copy") from None
        raise UserError(f"{what} '{path}' could not be read: it is not a plain torch.save file "
                        f"({_reason(str(e))})") from None
    except EOFError:
        raise UserError(f"{what} '{path}' could not be read: the file is empty or truncated") from None
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, struct.error, KeyError... for junk
        raise UserError(f"{what} '{path}' could not be read ({type(e).__name__}: {_reason(str(e))}); "
                        "the file is truncated or not a torch.save file") from None


def read_json(path: str | Path, *, what: str) -> Any:
    """The JSON document in ``path``; a missing, unreadable or malformed file raises a one-line
    :class:`UserError` naming ``what`` (its role, e.g. ``"checkpoint metadata"``) and the file."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise UserError(f"{what} '{path}' does not exist") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{what} '{path}' is not readable JSON ({type(e).__name__}: {_clean(str(e))[:160]}); "
                        "the file is corrupt or was cut off: restore or delete it") from None


def read_yaml(path: str | Path, *, what: str) -> Any:
    """The YAML document in ``path`` (``yaml.safe_load``: no Python objects); errors as :func:`read_json`."""
    import yaml

    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{what} '{path}' does not exist") from None
    except (OSError, ValueError, yaml.YAMLError) as e:
        first = _clean(str(e)).replace("\n", " ")[:160]
        raise UserError(f"{what} '{path}' is not readable YAML ({type(e).__name__}: {first}); "
                        "the file is corrupt or was cut off: restore or delete it") from None
