"""The ``tldist`` command line: every argparse parser of tldist, and nothing else.

:mod:`~tldist.cli.main` (the parser and ``main``), :mod:`~tldist.cli.dispatch` (one line and exit 2
for a user's mistake), :mod:`~tldist.cli.options` (shared flags) and one module per command family:
:mod:`~tldist.cli.shards`, :mod:`~tldist.cli.export`, :mod:`~tldist.cli.compress`,
:mod:`~tldist.cli.launch`, :mod:`~tldist.cli.study`, :mod:`~tldist.cli.adapt`.
"""

from tldist.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
