"""Checks of the paths a user gives for tldist to write to.

A directory can only be created where every existing part of its path is a directory: an output path
under an existing *file* (``tldist study --out results.csv/x``) fails deep inside ``mkdir`` with
``NotADirectoryError``. Every place that creates a user-named output directory goes through
:func:`make_output_dir`, and commands check their outputs before any work with
:func:`check_output_dir`; both raise a one-line :class:`~tldist.errors.UserError` naming the option,
the path and the part of it that is a file.
"""

from __future__ import annotations

import os
from pathlib import Path

from tldist.errors import UserError


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """Raise :class:`UserError` unless directory ``path`` exists or can be created: it must not be an
    existing file, nor lie under one. ``what`` names the option (``--out``, ``output_dir``...). Returns the path."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"{what} '{path}' is an existing file, not a directory: choose another path")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{what} '{path}' cannot be created: '{parent}' is a file, not a directory; "
                                "choose another path")
            break
    return p


def make_output_dir(path: str | os.PathLike, what: str) -> Path:
    """Create directory ``path`` (and its parents) after :func:`check_output_dir`; an ``OSError`` such as a
    permission or read-only file system becomes a one-line :class:`UserError` naming ``what`` and the path."""
    p = check_output_dir(path, what)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{what} '{path}' cannot be created: {e.strerror or e}; choose another path") from None
    return p
