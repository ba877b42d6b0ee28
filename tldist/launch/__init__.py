"""Launching tldist training on SLURM: submitit submission, in-job rendezvous, preemption requeue.

- :mod:`tldist.launch.slurm`   submit / sweep / status / cancel (the library side; the commands are
  :mod:`tldist.cli.launch`);
- :mod:`tldist.launch.job`     :class:`TrainJob`, the callable submitit pickles and runs on every task;
- :mod:`tldist.launch.signals` SIGUSR2/SIGTERM -> checkpoint-and-stop of the training loop
  (``tldist train --stop-on-signal`` for ``slurm/*.sbatch``).
"""

from tldist.launch.job import TrainJob
from tldist.launch.signals import StopSignals

__all__ = ["StopSignals", "TrainJob"]
