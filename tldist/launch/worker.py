"""``tldist train`` with graceful-stop signal handlers: the per-task command of ``slurm/*.sbatch``.

``python -m tldist.launch.worker CONFIG [overrides]`` (or ``launch/train.py`` under
``accelerate launch``) installs :class:`~tldist.launch.signals.StopSignals`, so SIGUSR2/SIGTERM make
every rank save a checkpoint and exit with status 3; the batch script decides about the requeue.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    from tldist.cli import main as tldist_main
    from tldist.launch.signals import StopSignals

    StopSignals().install()  # kept for the life of the process
    return tldist_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
