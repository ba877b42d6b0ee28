"""tldist.train.distributed helpers in 2 real gloo processes: the stop vote and BatchNorm averaging."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn

from helpers import spawn_ranks
from tldist.train.distributed import StopVote, average_buffers


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # the stop vote: rank 1 asks at poll 3; both ranks learn it at poll 4, the step after
        vote = StopVote()
        seen = [vote.poll(rank == 1 and i == 3) for i in range(6)]
        # codes: the highest wins on every rank (a data fault on rank 1 beats a preemption on rank 0)
        seen += [vote.poll({0: 1, 1: 2}[rank] if i == 0 else 0) for i in range(2)]
        last = vote.finish()
        # BatchNorm statistics: different on each rank, averaged in place; the counter is left alone
        bn = nn.BatchNorm2d(3)
        with torch.no_grad():
            bn.running_mean.fill_(float(rank + 1))  # 1 and 2 -> 1.5
            bn.running_var.fill_(float(4 * rank + 1))  # 1 and 5 -> 3
        bn.num_batches_tracked.fill_(10 + rank)
        average_buffers(bn)
        out[rank] = (seen, last, bn.running_mean.tolist(), bn.running_var.tolist(), int(bn.num_batches_tracked))
    finally:
        dist.destroy_process_group()


def test_stop_vote_and_buffer_averaging_across_two_processes():
    out = spawn_ranks(_worker)
    for rank in (0, 1):
        seen, last, mean, var, tracked = out[rank]
        assert seen == [0, 0, 0, 0, 1, 0, 0, 2] and last == 0
        assert mean == [1.5] * 3 and var == [3.0] * 3 and tracked == 10 + rank
