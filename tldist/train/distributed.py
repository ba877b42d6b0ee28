"""Process group, device and model wrapping (DDP through Accelerate, or FSDP2).

Launch facts this module encodes (measured on CPU machines, see the README):

- ``accelerate launch --cpu --num_processes 2`` starts ONE process. tldist's CPU recipe is an
  ordinary multi-process launch (``configs/accelerate/cpu.yaml``) plus ``Accelerator(cpu=True)``,
  which we pass whenever no GPU is present: the state becomes MULTI_CPU over gloo.
- Accelerate silently ignores an FSDP config on CPU. tldist therefore applies FSDP2 itself with
  ``torch.distributed.fsdp.fully_shard`` (on CPU/gloo and GPU/NCCL alike) whenever FSDP is asked
  for by the accelerate config (``ACCELERATE_USE_FSDP``) or by ``train.fsdp=true``, and never hands
  the model to ``accelerator.prepare`` in that mode.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn

from tldist.config import TrainConfig
from tldist.errors import ConfigError
from tldist.world import World


def build_accelerator(cfg: TrainConfig):
    """The Accelerator for this process (call on every rank, once)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    use_fsdp = fsdp_requested(cfg)
    if use_fsdp and cfg.mixed_precision == "fp16":
        raise ConfigError("train.mixed_precision=fp16 is not supported with FSDP in tldist; use bf16")
    cpu = not torch.cuda.is_available()
    # Frozen stages (linear probe, last_n) leave parameters without gradients.
    ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=False, broadcast_buffers=False)
    return Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision, kwargs_handlers=[ddp_kwargs],
                       step_scheduler_with_optimizer=False)


def fsdp_requested(cfg: TrainConfig) -> bool:
    """FSDP is chosen by ``train.fsdp`` or by launching with an accelerate FSDP config."""
    return cfg.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def world_of(accelerator) -> World:
    return World(rank=accelerator.process_index, world_size=accelerator.num_processes,
                 local_rank=accelerator.local_process_index)


def apply_fsdp2(model: nn.Module, block_names: list[str], *, mixed_precision: str,
                device_type: str) -> list[str]:
    """Shard ``model`` in place with FSDP2: each listed block class, then the root (call on every rank).

    Returns the names of the modules that became their own FSDP unit.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    wrapped = []
    for name, module in model.named_modules():
        if name and type(module).__name__ in block_names and _has_trainable(module):
            fully_shard(module, mesh=mesh, mp_policy=mp)
            wrapped.append(name)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return wrapped


def _has_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def fsdp_block_names(cfg: TrainConfig, suggested: list[str]) -> list[str]:
    """Block classes to wrap: ``train.fsdp_block``, else the accelerate config's
    ``fsdp_transformer_layer_cls_to_wrap``, else the backbone's own suggestion."""
    names = cfg.fsdp_block or os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    if names:
        return [n.strip() for n in names.split(",") if n.strip()]
    return list(suggested)


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DDP wrapper (FSDP2 modules are not wrapped)."""
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_flag(flag: bool, device: Optional[torch.device] = None) -> bool:
    """True if ``flag`` is set on any rank (call on every rank)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
