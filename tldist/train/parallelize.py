"""One place that puts a model on its device and wraps it for the run: single device, DDP or FSDP2.

:func:`parallelize` is the only code in tldist that moves a training model to a device, makes it
channels_last, shards (FSDP2), compiles (``torch.compile``) or wraps it (DDP); it returns a
:class:`Parallel` with everything the step needs. Mixed precision means the same in every mode:

- parameters, gradients, optimizer state and gradient reductions stay in float32;
- the forward pass runs under ``torch.autocast(device_type, dtype)`` (bf16 or fp16), the same
  op-level casting rules whatever the wrapper (under FSDP2 the all-gathered parameters are fp32 too:
  twice the all-gather bytes of a bf16 ``param_dtype``, in exchange for numerics identical to DDP);
- fp16 scales the loss with a ``torch.amp.GradScaler`` (skipped steps on inf/NaN, state in every
  checkpoint); bf16 needs none.

Accelerate sets up the process group and picks the device (:func:`build_accelerator`); it does not
wrap the model, so DDP and FSDP2 take the same path here.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from tldist.config import TrainConfig
from tldist.world import World

log = logging.getLogger("tldist")

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Parallel:
    """A placed and wrapped model plus the precision machinery of its step."""

    model: nn.Module
    """The model the step calls: DDP-wrapped, FSDP2-sharded (in place) or the plain module."""
    module: nn.Module
    """The model without its DDP wrapper (the same object as ``model`` otherwise)."""
    device: torch.device
    world: World
    mode: str
    """``single``, ``ddp`` or ``fsdp2``."""
    dtype: Optional[torch.dtype] = None
    """Autocast dtype (bf16/fp16), None for full fp32."""
    scaler: Optional[torch.amp.GradScaler] = None
    """fp16 loss scaler, None otherwise."""
    channels_last: bool = False
    """Whether inputs should be channels_last (the model is)."""

    @property
    def is_main(self) -> bool:
        return self.world.rank == 0

    def autocast(self):
        """Context for forward passes (train and eval) with the run's mixed precision."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_sync(self, enabled: bool):
        """Context for a micro-batch's forward/backward: gradients are reduced over ranks only when
        ``enabled`` (the last micro-batch of an accumulated step)."""
        if self.mode == "fsdp2":
            self.model.set_requires_gradient_sync(enabled)
            return contextlib.nullcontext()
        if self.mode == "ddp" and not enabled:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def clip_grad_norm_(self, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
        """Unscale (fp16), clip to ``max_norm`` (inf: measure only) and return the total norm
        before clipping, over every rank's gradients (FSDP2 shards included). No host sync."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``, through the GradScaler under fp16 (which skips inf/NaN steps)."""
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()


def parallelize(model: nn.Module, cfg: TrainConfig, *, device: torch.device, world: World, fsdp: bool,
                fsdp_blocks: list[str]) -> Parallel:
    """Place ``model`` on ``device`` and wrap it for this run (call on every rank, once).

    Args:
        model: the freshly built model (on the CPU, identical on every rank).
        cfg: ``train.*`` (mixed_precision, channels_last, compile, compile_mode).
        device: this rank's device (``accelerator.device``).
        world: this rank's place in the job.
        fsdp: shard with FSDP2 (``fully_shard`` per block of ``fsdp_blocks``, then the root).
        fsdp_blocks: module class names that become their own FSDP2 unit.

    Returns the :class:`Parallel`. Order of operations: channels_last (CUDA only, not under FSDP2,
    which cannot shard channels_last parameters; measured slower on CPU, BENCHMARKS.md "Versus")
    -> to(device) -> FSDP2 -> ``torch.compile`` (in place) -> DDP when world_size > 1.
    """
    from tldist.train.distributed import apply_fsdp2

    channels_last = cfg.channels_last and not fsdp and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device)
    mode = "single"
    compile_mode = None if cfg.compile_mode == "default" else cfg.compile_mode
    if fsdp:
        if cfg.compile:
            # Per block, before sharding (torchtitan's order), with static shapes: compiling the root
            # over FSDP2's hooks, or blocks with dynamic shapes after recompiles, failed in Inductor on
            # CPU with torch 2.14.1 ("Cannot convert expression to float" in the backward).
            for module in model.modules():
                if type(module).__name__ in fsdp_blocks:
                    module.compile(mode=compile_mode, dynamic=False)
        wrapped = apply_fsdp2(model, fsdp_blocks, device_type=device.type)
        log.info("FSDP2: %d sharded blocks (%s...) + root", len(wrapped), ", ".join(wrapped[:3]))
        mode = "fsdp2"
    elif cfg.compile:
        model.compile(mode=compile_mode)
    wrapped_model = model
    if world.world_size > 1 and not fsdp:
        # Frozen stages (linear probe, last_n) leave parameters without gradients. Gradients are
        # views into DDP's all-reduce buckets (no copy in or out of the buckets each step).
        # BatchNorm buffers are not broadcast before every forward: each rank keeps its own running
        # statistics, and the trainer averages them before every evaluation and checkpoint.
        wrapped_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
            gradient_as_bucket_view=True, find_unused_parameters=False)
        mode = "ddp"
    dtype = AUTOCAST_DTYPES.get(cfg.mixed_precision)
    scaler = torch.amp.GradScaler(device.type) if cfg.mixed_precision == "fp16" else None
    return Parallel(model=wrapped_model, module=model, device=device, world=world, mode=mode, dtype=dtype,
                    scaler=scaler, channels_last=channels_last)
