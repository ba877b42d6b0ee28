"""How the ranks of a training job agree while it runs: the stop vote, BatchNorm statistics and a
consistency check of the trained model. Process-group primitives live in :mod:`tldist.world`."""

from __future__ import annotations

import socket
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from tldist.world import distributed, gather_objects, multi_process



def average_buffers(model: nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over ranks, in place
    (call on every rank).

    Like timm's ``distribute_bn(reduce=True)``: under DDP without per-forward buffer broadcasts
    every rank's statistics drift apart; averaging them before an evaluation or a checkpoint
    makes all ranks evaluate the model that is saved. Frozen statistics are identical on all
    ranks and stay so (up to rounding for world sizes that are not powers of two).
    """
    if not multi_process():
        return
    bufs = [b for b in model.buffers() if b.is_floating_point()]
    if not bufs:
        return
    flat = torch.cat([b.detach().reshape(-1).to(torch.float64) for b in bufs])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    with torch.no_grad():
        for b in bufs:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


class StopVote:
    """Ranks agree on stopping one step late, so that the vote never stalls a step.

    ``poll(code)`` starts a non-blocking MAX all-reduce of this rank's code (0 = go on, higher =
    a reason to stop, e.g. :data:`STOP_PREEMPT`, :data:`STOP_DATA_FAULT`) and returns the agreed
    code of the previous poll (0 at the first). The vote travels on the CPU over gloo (the
    default group on CPU, a gloo side group next to NCCL), so reading it never waits for an
    accelerator stream, and by the time it is read a whole step has passed. Without a process
    group ``poll`` returns ``code`` at once. Construct it, and call ``poll`` and ``finish``, on
    every rank at the same points relative to other collectives.
    """

    def __init__(self):
        self._pending: Optional[tuple[Any, torch.Tensor]] = None
        self._active = distributed()
        self._group = None
        if self._active and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")  # a collective: every rank creates it

    def poll(self, code: int) -> int:
        agreed = self.finish()
        if not self._active:
            return int(code)
        t = torch.tensor([int(code)], dtype=torch.int32)
        self._pending = (dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group, async_op=True), t)
        return agreed

    def finish(self) -> int:
        """Wait for the outstanding vote, if any, and return it (0 when none)."""
        if self._pending is None:
            return 0
        work, t = self._pending
        self._pending = None
        work.wait()
        return int(t.item())


STOP_PREEMPT = 1
"""Vote code: a stop was requested (preemption, time limit); every rank checkpoints and returns."""
STOP_DATA_FAULT = 2
"""Vote code: a rank's loader crossed ``data.max_skip_fraction``; every rank raises the DataError."""


def model_consistency(model, world_size: int) -> dict[str, Any]:
    """Facts of a trained ``model`` for the run's result (call on every rank): ``world_size``,
    ``sharded_params`` (FSDP2 DTensors), ``ranks_agree`` (all ranks hold identical parameters and
    floating-point buffers under DDP: a guard against "distributed" runs that are really N single
    runs; None when sharded), ``param_checksum`` (float64 sum of the full model's parameters and
    buffers) and ``rank_hosts`` ([hostname, address] per rank)."""
    params = list(model.parameters())
    sharded = bool(params) and all(isinstance(p, DTensor) for p in params)
    shards = [p.to_local() if isinstance(p, DTensor) else p for p in params]
    buffers = [b for b in model.buffers() if b.is_floating_point()]  # BatchNorm statistics too
    shard_sum = float(sum(p.detach().double().sum() for p in shards))
    buffer_sum = float(sum(b.detach().double().sum() for b in buffers))
    host = socket.gethostname()
    try:  # the address gloo advertises: its device binds to the address the hostname resolves to
        ip = socket.gethostbyname(host)
    except OSError:
        ip = None
    gathered = gather_objects((shard_sum, buffer_sum, host, ip))
    sums = [(a, b) for a, b, _, _ in gathered]
    if sharded:  # each rank holds a disjoint shard: the full model's sum is the sum of the shards'
        checksum = sum(s for s, _ in sums) + sums[0][1]
    else:
        checksum = sums[0][0] + sums[0][1]
    return {"world_size": world_size, "sharded_params": sharded,
            "ranks_agree": None if sharded else all(c == sums[0] for c in sums), "param_checksum": checksum,
            "rank_hosts": [[h, i] for _, _, h, i in gathered]}
