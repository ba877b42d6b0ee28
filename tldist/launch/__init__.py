"""Launching tldist training on SLURM: submitit submission, in-job rendezvous, preemption requeue.

- :mod:`tldist.launch.slurm`   submit / sweep / status / cancel (the library side);
- :mod:`tldist.launch.cli`     their command-line front end (``add_parsers`` for ``tldist.cli``);
- :mod:`tldist.launch.job`     :class:`TrainJob`, the callable submitit pickles and runs on every task;
- :mod:`tldist.launch.signals` SIGUSR2/SIGTERM -> checkpoint-and-stop of the training loop;
- :mod:`tldist.launch.worker`  ``tldist train`` with those signal handlers, for ``slurm/*.sbatch``.

Run the commands on their own with ``python -m tldist.launch submit|sweep|status|cancel ...``.
"""

from tldist.launch.cli import add_parsers
from tldist.launch.job import TrainJob

__all__ = ["TrainJob", "add_parsers"]
