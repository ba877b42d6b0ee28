"""Running one ``tldist`` subcommand: a user's mistake becomes one line and exit status 2.

:func:`dispatch` is shared by every entry point (``tldist``, ``python -m tldist.cli``, ``launch/*.py``).
Dotted config overrides (``key=value``) are accepted anywhere on the command line, also after the
flags (``tldist eval CFG --checkpoint C data.val=X``), for every command that takes them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

from tldist.errors import UserError
from tldist.world import is_peer_failure


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line, exit status 2, like every other user
    mistake (``tldist: error: unrecognized arguments: x (see 'tldist eval --help')``); the usage text is
    what ``--help`` prints."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"tldist: error: {message} (see '{self.prog} --help')\n")


def report_to_launcher(message: str, *, consequence: bool = False) -> bool:
    """Write ``message`` to this rank's ``TORCHELASTIC_ERROR_FILE`` (set by torch-elastic for each rank).

    The launcher's ``ChildFailedError`` summary then reads ``traceback : <message>`` for this rank
    instead of "To enable traceback see: ...". Its "Root Cause" is the failure with the smallest
    timestamp (whole seconds; a rank without a file gets the time the launcher noticed it), so every rank
    that stops on an error writes one. ``consequence=True`` (a rank stopped because another failed) dates it
    one second later, so that it never ties with, and never displaces, the failure it followed. The
    launcher's own traceback and its exit status 1 cannot be changed from inside a rank. Returns False
    when not under torch-elastic or when the file cannot be written.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return False
    try:
        with open(path, "w") as f:
            json.dump({"message": message, "timestamp": int(time.time()) + int(consequence)}, f)
    except OSError:
        return False
    return True


def parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` words after the flags join the command's config overrides (in
    order). Any other unknown word is argparse's usual error (exit 2), which names it."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        overrides = getattr(args, "overrides", None)
        stray = [e for e in extra if e.startswith("-") or "=" not in e]
        if overrides is None or stray:
            what = stray or extra
            hint = ("" if overrides is None else
                    "; config overrides look like key=value (e.g. optim.lr=3e-4) and may go anywhere")
            parser.error(f"unrecognized arguments: {' '.join(what)}{hint}")
        args.overrides = [*overrides, *extra]
    return args


def dispatch(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; a :class:`UserError` becomes one line, exit 2.

    In a multi-process job an error that every rank raises alike (a config mistake, a data fault
    the ranks agreed on, a locked output directory) is printed by rank 0 only; an error of one
    rank is printed by that rank with its number. A rank whose collective failed because another
    rank died prints one line saying so (exit 1) instead of a backend traceback.
    """
    args = parse(parser, argv)
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        every_rank = getattr(e, "same_on_every_rank", False)
        message = f"tldist: error: {'' if every_rank else prefix}{e}"
        if not (every_rank and prefix):  # an error of every rank is printed once, by rank 0
            print(message, file=sys.stderr, flush=True)
        # every rank names it in accelerate's failure summary: its "Root Cause" is whichever rank exits first
        report_to_launcher(message)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if not is_peer_failure(e):
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        message = (f"tldist: error: [rank {rank or 0}] stopped because another process of this job failed or was "
                   f"lost ({type(e).__name__}: {first}); that process's own error is printed above")
        print(message, file=sys.stderr, flush=True)
        report_to_launcher(message, consequence=True)
        return 1
