"""One place that puts a model on its device and wraps it for the run: single device, DDP or FSDP2.

FSDP2 is applied here with ``torch.distributed.fsdp.fully_shard`` (on CPU/gloo and GPU/NCCL alike)
whenever it is asked for by ``train.fsdp=true`` or an accelerate FSDP config (``ACCELERATE_USE_FSDP``;
Accelerate itself silently ignores an FSDP config on CPU), one unit per block class
(:func:`fsdp_block_names`), then the root.

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
import os
import types
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from tldist.config import TrainConfig
from tldist.errors import ConfigError
from tldist.world import World, distributed

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
        fsdp_blocks: module class names that become their own FSDP2 unit, and the blocks activation
            checkpointing recomputes (``train.grad_checkpointing``) in a model that is not timm's.

    Returns the :class:`Parallel`. Order of operations: channels_last (CUDA only, not under FSDP2,
    which cannot shard channels_last parameters; measured slower on CPU, BENCHMARKS.md "Versus")
    -> to(device) -> activation checkpointing (:func:`apply_activation_checkpointing`) -> FSDP2 ->
    ``torch.compile`` (in place) -> DDP when world_size > 1 (torchtitan's order: AC, compile, FSDP).
    """
    if fsdp and not distributed():
        raise ConfigError("train.fsdp=true needs a process group (even for one process): launch with "
                          "'accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes N -m tldist.cli "
                          "train ...' or torchrun")
    channels_last = cfg.channels_last and not fsdp and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device)
    if cfg.grad_checkpointing:
        log.info("activation checkpointing (train.grad_checkpointing): %s",
                 apply_activation_checkpointing(model, fsdp_blocks))
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
        wrapped = apply_fsdp2(model, fsdp_blocks, device_type=device.type,
                              reshard_after_forward=cfg.fsdp_reshard_after_forward is not False)
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


def check_parallel_config(cfg: TrainConfig) -> None:
    """Refuse ``train.*`` combinations the placement cannot honour (:class:`ConfigError` naming the key):
    fp16 under FSDP2 (its GradScaler would need sharded gradients' inf checks; use bf16)."""
    if fsdp_requested(cfg) and cfg.mixed_precision == "fp16":
        raise ConfigError("train.mixed_precision=fp16 is not supported with FSDP in tldist; use bf16")


def fsdp_requested(cfg: TrainConfig) -> bool:
    """FSDP is chosen by ``train.fsdp`` or by launching with an accelerate FSDP config."""
    return cfg.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def apply_fsdp2(model: nn.Module, block_names: list[str], *, device_type: str,
                reshard_after_forward: bool = True) -> list[str]:
    """Shard ``model`` in place with FSDP2: each listed block class, then the root (call on every rank).

    Parameters stay float32 and gradients are reduced in float32; mixed precision is autocast, as
    in every other mode (see :mod:`tldist.train.parallelize`). ``reshard_after_forward``
    (``train.fsdp_reshard_after_forward``): free each block's gathered parameters after its forward
    (ZeRO-3, True) or keep them for the backward (ZeRO-2). Returns the names of the modules that became
    their own FSDP unit.
    """
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    wrapped = []
    for name, module in model.named_modules():
        if name and type(module).__name__ in block_names and _has_trainable(module):
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
            wrapped.append(name)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return wrapped


def apply_activation_checkpointing(model: nn.Module, block_names: list[str]) -> str:
    """Recompute blocks in the backward instead of keeping their activations (in place; before sharding
    and compiling). Returns what was done, for the log.

    A timm model (it has ``set_grad_checkpointing``) uses its own: ``set_grad_checkpointing(True)``, timm's
    ``checkpoint_seq`` over its blocks/stages (non-reentrant unless ``TIMM_REENTRANT_CKPT``). Any other model
    gets every module whose class is in ``block_names`` (the blocks FSDP2 wraps, :func:`fsdp_block_names`)
    run through ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` in training mode; the module's
    forward is replaced on the instance, so names, state-dict keys and the class FSDP2 matches stay as they
    were (``checkpoint_wrapper`` would insert ``_checkpoint_wrapped_module.`` into parameter names). Raises
    :class:`ConfigError` when there is no block to checkpoint.

    BatchNorm: the recomputation in the backward runs each BatchNorm forward a second time, which in eager
    mode would update its running statistics twice per step (measured: ``num_batches_tracked`` 2 after one
    step). Every BatchNorm therefore gets hooks (:func:`_hold_bn_statistics`) that leave the statistics as they
    were during a forward run inside the backward pass, so they move once per step as without checkpointing.
    Under ``torch.compile`` the recomputation is part of the compiled backward and does not repeat the update.
    For the hooks to close what they open, a recomputation runs its block to the end: the model's forward
    turns off non-reentrant checkpointing's early stop (``set_checkpoint_early_stop(False)``), which would
    otherwise stop inside a block's last BatchNorm (measured: mobilenet_v3_small's blocks).
    """
    _hold_bn_statistics(model)
    model.forward = types.MethodType(_forward_without_early_stop, model)
    if hasattr(model, "set_grad_checkpointing"):
        try:
            model.set_grad_checkpointing(True)
            return f"timm {type(model).__name__}.set_grad_checkpointing(True)"
        except (AssertionError, NotImplementedError) as e:  # a timm model without support: its blocks below
            log.warning("timm %s has no gradient checkpointing of its own (%s); checkpointing its blocks",
                        type(model).__name__, e)
    targets = [m for m in model.modules() if type(m).__name__ in block_names]
    if not targets:
        raise ConfigError("config key 'train.grad_checkpointing' is true but this model has no known block class to "
                          "checkpoint: name one with train.fsdp_block (e.g. Bottleneck, EncoderBlock)")
    for m in targets:
        m.forward = types.MethodType(_checkpointed_forward, m)
    return f"{len(targets)} blocks ({', '.join(sorted({type(m).__name__ for m in targets}))}) through " \
           "torch.utils.checkpoint"


def _hold_bn_statistics(model: nn.Module) -> None:
    """Hooks on every BatchNorm that tracks running statistics: a forward that runs inside the autograd
    engine (an activation-checkpointing recomputation) uses momentum 0 and keeps ``num_batches_tracked``,
    so the statistics are not updated a second time."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            m.register_forward_pre_hook(_bn_hold_pre)
            m.register_forward_hook(_bn_hold_post)


def _bn_hold_pre(module: nn.Module, args) -> None:
    if torch.compiler.is_compiling():
        return
    _bn_hold_post(module, args, None)  # a hold left by a recomputation that did not finish: undo it first
    if not module.training or torch._C._current_graph_task_id() == -1:
        return  # eval, or an ordinary forward (not inside a backward pass)
    module._tldist_held = (module.momentum, module.num_batches_tracked.clone())
    module.momentum = 0.0  # running = (1 - 0) * running + 0 * batch


def _bn_hold_post(module: nn.Module, args, output) -> None:
    held = module.__dict__.pop("_tldist_held", None)
    if held is not None:
        module.momentum = held[0]
        module.num_batches_tracked.copy_(held[1])


def _forward_without_early_stop(self: nn.Module, *args, **kwargs):
    """The model's own forward; while training with grads (eager), with checkpointing's early stop off, so every
    recomputation in the following backward runs its whole block (see :func:`apply_activation_checkpointing`)."""
    forward = type(self).forward
    if torch.compiler.is_compiling() or not (self.training and torch.is_grad_enabled()):
        return forward(self, *args, **kwargs)
    with set_checkpoint_early_stop(False):
        return forward(self, *args, **kwargs)


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    """The class's own forward under non-reentrant activation checkpointing while training with grads;
    as is otherwise (eval, ``no_grad``). Bound per instance: a deep copy gets a copy bound to itself."""
    forward = type(self).forward
    if self.training and torch.is_grad_enabled():
        return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
    return forward(self, *args, **kwargs)


def _has_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def fsdp_block_names(cfg: TrainConfig, model: nn.Module, suggested: list[str]) -> list[str]:
    """Block classes to wrap, each a class present in ``model``.

    ``train.fsdp_block`` wins and must name classes of this model (else :class:`ConfigError`
    listing the candidates). The accelerate config's ``fsdp_transformer_layer_cls_to_wrap``
    is a list shared by every model launched with that file: its names present in ``model``
    are used, and when none is, the backbone's own suggestion is (with a warning).
    """
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
        log.warning(
            "FSDP2: the accelerate config's fsdp_transformer_layer_cls_to_wrap (%s) names no module class of this "
            "model; sharding the backbone's own blocks (%s) instead (set train.fsdp_block to choose)",
            ",".join(from_env), ",".join(suggested) or "none: root only")
    return list(suggested)
