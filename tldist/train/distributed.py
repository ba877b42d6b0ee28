"""Process group, device and model wrapping (DDP through Accelerate, or FSDP2).

Launch facts this module encodes (measured on CPU machines, see the README):

- ``accelerate launch --cpu --num_processes 2`` starts ONE process. tldist's CPU recipe is an
  ordinary multi-process launch (``configs/accelerate/cpu.yaml``) plus ``Accelerator(cpu=True)``,
  which we pass whenever no GPU is present: the state becomes MULTI_CPU over gloo.
- Accelerate silently ignores an FSDP config on CPU. tldist therefore applies FSDP2 itself with
  ``torch.distributed.fsdp.fully_shard`` (on CPU/gloo and GPU/NCCL alike) whenever FSDP is asked
  for by the accelerate config (``ACCELERATE_USE_FSDP``) or by ``train.fsdp=true``.
- No model goes through ``accelerator.prepare``: :mod:`tldist.train.parallelize` places and wraps
  it (single device, DDP, FSDP2) in one place; Accelerate sets up the process group and device.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.nn as nn

from tldist.config import TrainConfig
from tldist.errors import ConfigError
from tldist.world import World


def build_accelerator(cfg: TrainConfig):
    """The Accelerator for this process (call on every rank, once).

    Collectives time out after ``train.collective_timeout_s`` (torch's defaults: 30 min for
    gloo, 10 min for NCCL): a rank whose peer vanished without closing its connections (a lost
    node, a hung GPU) raises instead of waiting for the scheduler's time limit.
    """
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    use_fsdp = fsdp_requested(cfg)
    if use_fsdp and cfg.mixed_precision == "fp16":
        raise ConfigError("train.mixed_precision=fp16 is not supported with FSDP in tldist; use bf16")
    cpu = not torch.cuda.is_available()
    pg_kwargs = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout_s))
    # mixed_precision here only serves accelerator.autocast() of the eval/adapt/compress entry
    # points; training takes its autocast and GradScaler from tldist.train.parallelize.
    return Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision, kwargs_handlers=[pg_kwargs],
                       step_scheduler_with_optimizer=False)


def fsdp_requested(cfg: TrainConfig) -> bool:
    """FSDP is chosen by ``train.fsdp`` or by launching with an accelerate FSDP config."""
    return cfg.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def world_of(accelerator) -> World:
    return World(rank=accelerator.process_index, world_size=accelerator.num_processes,
                 local_rank=accelerator.local_process_index)


def apply_fsdp2(model: nn.Module, block_names: list[str], *, device_type: str) -> list[str]:
    """Shard ``model`` in place with FSDP2: each listed block class, then the root (call on every rank).

    Parameters stay float32 and gradients are reduced in float32; mixed precision is autocast, as
    in every other mode (see :mod:`tldist.train.parallelize`). Returns the names of the modules
    that became their own FSDP unit.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    wrapped = []
    for name, module in model.named_modules():
        if name and type(module).__name__ in block_names and _has_trainable(module):
            fully_shard(module, mesh=mesh)
            wrapped.append(name)
    fully_shard(model, mesh=mesh)
    return wrapped


def _has_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def fsdp_block_names(cfg: TrainConfig, model: nn.Module, suggested: list[str]) -> list[str]:
    """Block classes to wrap, each a class present in ``model``.

    ``train.fsdp_block`` wins and must name classes of this model (else :class:`ConfigError`
    listing the candidates). The accelerate config's ``fsdp_transformer_layer_cls_to_wrap``
    is a list shared by every model launched with that file: its names present in ``model``
    are used, and when none is, the backbone's own suggestion is (with a warning).
    """
    import logging

    present = {type(m).__name__ for m in model.modules()}
    explicit = [n.strip() for n in cfg.fsdp_block.split(",") if n.strip()]
    if explicit:
        missing = [n for n in explicit if n not in present]
        if missing:
            candidates = sorted(n for n in present if any(k in n for k in ("Block", "Layer", "Bottleneck", "Stage")))
            raise ConfigError(f"config key 'train.fsdp_block' names {missing}, not module classes of this model; "
                              f"choose among {candidates or sorted(present)[:12]}")
        return explicit
    from_env = [n.strip() for n in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if n.strip()]
    if from_env:
        usable = [n for n in from_env if n in present]
        if usable:
            return usable
        logging.getLogger("tldist").warning(
            "FSDP2: the accelerate config's fsdp_transformer_layer_cls_to_wrap (%s) names no module class of this "
            "model; sharding the backbone's own blocks (%s) instead (set train.fsdp_block to choose)",
            ",".join(from_env), ",".join(suggested) or "none: root only")
    return list(suggested)


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because another rank died or timed out (gloo's
    "Connection closed/reset by peer", NCCL/gloo timeouts, ``torch.distributed.DistError``)."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(k in text for k in (
        "Connection closed by peer", "Connection reset by peer", "gloo", "NCCL", "Timed out", "timed out",
        "Broken pipe"))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over ranks, returned on the CPU (call on every rank). The reduction runs on
    the default group's device (CUDA for NCCL); without a process group ``t`` comes back as is."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    x = t.to(device)
    dist.all_reduce(x)
    return x.cpu()


def average_buffers(model: nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over ranks, in place
    (call on every rank).

    Like timm's ``distribute_bn(reduce=True)``: under DDP without per-forward buffer broadcasts
    every rank's statistics drift apart; averaging them before an evaluation or a checkpoint
    makes all ranks evaluate the model that is saved. Frozen statistics are identical on all
    ranks and stay so (up to rounding for world sizes that are not powers of two).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
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
        import torch.distributed as dist

        self._pending: Optional[tuple[Any, torch.Tensor]] = None
        self._active = dist.is_available() and dist.is_initialized()
        self._group = None
        if self._active and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")  # a collective: every rank creates it

    def poll(self, code: int) -> int:
        import torch.distributed as dist

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
    from torch.distributed.tensor import DTensor

    from tldist.train.checkpoint import gather_objects

    params = list(model.parameters())
    sharded = bool(params) and all(isinstance(p, DTensor) for p in params)
    shards = [p.to_local() if isinstance(p, DTensor) else p for p in params]
    buffers = [b for b in model.buffers() if b.is_floating_point()]  # BatchNorm statistics too
    shard_sum = float(sum(p.detach().double().sum() for p in shards))
    buffer_sum = float(sum(b.detach().double().sum() for b in buffers))
    import socket

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
