"""``tldist train`` with graceful-stop signal handlers: the per-task command of ``slurm/*.sbatch``.

``python -m tldist.launch.worker CONFIG [overrides]`` (or ``launch/train.py`` under
``accelerate launch``) installs :class:`~tldist.launch.signals.StopSignals`, so SIGUSR2/SIGTERM make
every rank save a checkpoint and exit with status 3; the batch script decides about the requeue.

:func:`report_to_launcher` hands a rank's one-line error to torch-elastic (``accelerate launch``,
``torchrun``), whose failure summary then shows it instead of a link to its documentation.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional, Sequence


def report_to_launcher(message: str) -> bool:
    """Write ``message`` to this rank's ``TORCHELASTIC_ERROR_FILE`` (set by torch-elastic for each rank).

    The launcher's ``ChildFailedError`` summary then reads ``traceback : <message>`` for this rank
    (also under "Root Cause") instead of "To enable traceback see: ...". The launcher's own traceback
    and its exit status 1 cannot be changed from inside a rank. Returns False when not under
    torch-elastic or when the file cannot be written.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return False
    try:
        with open(path, "w") as f:
            json.dump({"message": message, "timestamp": int(time.time())}, f)
    except OSError:
        return False
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    from tldist.cli import main as tldist_main
    from tldist.launch.signals import StopSignals

    StopSignals().install()  # kept for the life of the process
    return tldist_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
