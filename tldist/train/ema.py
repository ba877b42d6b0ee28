"""EMA of the weights (``train.ema_decay``): an fp32 moving average of the model, kept next to it.

The average, its decay and its warm-up are timm's :class:`timm.utils.model_ema.ModelEmaV3`
(decay ``d`` per optimizer step; with ``train.ema_warmup`` the decay at update ``n`` is
``min(d, 1 - (1 + n) ** -power)``, the warm-up of Karras/crowsonkb that timm cites; the first update
copies the weights). ModelEmaV3 itself deep-copies a module, which does not fit every tldist mode
(a DDP wrapper, an FSDP2-sharded module with its hooks and process group, a compiled module), so
:class:`WeightEma` hands it a plain container instead:

- **what is averaged**: every entry of the unwrapped model's state dict, parameters and buffers
  (BatchNorm running statistics are averaged too, as timm does; integer buffers such as
  ``num_batches_tracked`` are copied), as float32 copies whatever the autocast dtype;
- **sharded under FSDP2**: for DTensor parameters only this rank's local shard is kept
  (``to_local()``), so each rank holds 1/world of the EMA parameters; the update is a local
  ``torch._foreach_lerp_`` on each rank: no collective, no host sync (the decay is a Python float
  computed from the step number);
- **evaluation and checkpoints** swap the EMA values into the live model's own tensors in place
  (:meth:`WeightEma.applied`), run the unchanged eval / state-dict code, and swap back, so the EMA
  is evaluated and gathered exactly like the model in every mode (no second wrapped model);
  floating-point EMA buffers are averaged over ranks before each save, like the model's.

Checkpoints hold the EMA as ``ema.safetensors``: a full state dict with the model's keys
(:meth:`WeightEma.full_state_dict`), loadable as a plain model.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.tensor import DTensor

from tldist.config import TrainConfig
from tldist.errors import UserError
from tldist.train.distributed import average_buffers
from tldist.train.feature import TrainFeature

log = logging.getLogger("tldist")

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class _LiveView:
    """What :class:`ModelEmaV3` reads from "the model" on update: ``state_dict()`` values, in order."""

    def __init__(self, values: list[torch.Tensor]):
        self._values = values

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(i): v for i, v in enumerate(self._values)}


class WeightEma(TrainFeature):
    """fp32 EMA of a (possibly DDP-wrapped or FSDP2-sharded) model's state dict.

    Args:
        model: the model the step calls (``Parallel.model``: DDP wrapper, FSDP2 root or plain).
        module: the same model without a DDP wrapper (``Parallel.module``).
        decay: EMA decay per optimizer step, in (0, 1).
        warmup: use timm's decay warm-up (``use_warmup``).
        warmup_power: timm's ``warmup_power`` (2/3 for long runs, 3/4 for shorter ones).

    The EMA starts as a copy of the model's current values. As a :class:`~tldist.train.feature.TrainFeature`
    it is updated after every optimizer step, evaluated after the model (``eval_ema/*``) and saved with
    every checkpoint as ``ema`` (a full-state piece, like the model).
    """

    name = "ema"

    def __init__(self, model: nn.Module, module: nn.Module, *, decay: float, warmup: bool = False,
                 warmup_power: float = 2 / 3):
        from timm.utils.model_ema import ModelEmaV3
        from torch.distributed.fsdp import FSDPModule

        self.model, self.module = model, module
        self._fsdp = [m for m in module.modules() if isinstance(m, FSDPModule)]
        self._keys = list(module.state_dict(keep_vars=True).keys())
        self._slots = []
        for key in self._keys:
            owner, _, name = key.rpartition(".")
            self._slots.append((module.get_submodule(owner) if owner else module, name))
        shadow = nn.ParameterList(
            [nn.Parameter(t.detach().to(torch.float32 if t.is_floating_point() else t.dtype).clone(), requires_grad=False)
             for t in self._live()])
        self.timm = ModelEmaV3(shadow, decay=decay, use_warmup=warmup, warmup_power=warmup_power,
                               foreach=True, stochastic_rounding=False)
        self.values: list[torch.Tensor] = list(self.timm.module.state_dict().values())
        """The EMA tensors (this rank's shards under FSDP2), in state-dict key order."""

    # ---- the average ---------------------------------------------------------------------
    def _live(self) -> list[torch.Tensor]:
        """The live model's state-dict tensors (local shards of DTensors), looked up afresh after a
        reshard: FSDP2's root keeps its unsharded parameters registered after a forward (an eval)."""
        self._reshard()
        out = []
        for owner, name in self._slots:
            t = getattr(owner, name)
            out.append((t.to_local() if isinstance(t, DTensor) else t).detach())
        return out

    def get_decay(self, step: int) -> float:
        """The decay applied at optimizer step ``step`` (1-based): timm's ``ModelEmaV3.get_decay``."""
        return self.timm.get_decay(step)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the EMA toward the current weights after optimizer step ``step`` (1-based; call
        on every rank, no collective): ``ema = decay * ema + (1 - decay) * weights``."""
        self.timm.update(_LiveView(self._live()), step=step)

    @torch.no_grad()
    def reset(self) -> None:
        """Set the EMA to the current weights (a resume from a checkpoint saved without EMA)."""
        for e, t in zip(self.values, self._live()):
            e.copy_(t)

    # ---- swapping into the live model ----------------------------------------------------
    def _reshard(self) -> None:
        """Drop FSDP2's unsharded parameter copies (the root keeps them after a forward), so that the
        next forward all-gathers the values now in the shards."""
        for m in self._fsdp:
            m.reshard()  # a no-op for sharded ones

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the live model holds the EMA values (parameters and buffers); on exit the
        EMA takes back what the model then holds (buffers averaged by an eval, values loaded from a
        checkpoint) and the model gets its own values back. Costs one extra copy of the (local) model."""
        live = self._live()
        with torch.no_grad():
            backup = [t.clone() for t in live]
            for t, e in zip(live, self.values):
                t.copy_(e)
        try:
            yield
        except BaseException:
            with torch.no_grad():  # the model gets its weights back; the EMA is left as it was
                for t, b in zip(live, backup):
                    t.copy_(b)
            raise
        self._reshard()
        with torch.no_grad():
            for t, e, b in zip(live, self.values, backup):
                e.copy_(t)
                t.copy_(b)

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's EMA tensors by state-dict key (local shards under FSDP2)."""
        return dict(zip(self._keys, self.values))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned on this rank (same model, same sharding)."""
        if set(state) != set(self._keys):
            raise UserError(f"EMA state does not fit this model ({len(set(self._keys) - set(state))} missing, "
                            f"{len(set(state) - set(self._keys))} unexpected keys)")
        for k, e in zip(self._keys, self.values):
            e.copy_(state[k])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA as a full (unsharded) CPU state dict with the model's keys (call on every rank:
        gathers FSDP2 shards and averages floating-point buffers over ranks, like the model's)."""
        with self.applied():
            average_buffers(self.model)
            # cloned: without sharding the state dict's tensors are the live ones, which get the weights back
            return {k: v.clone() for k, v in get_model_state_dict(self.model, options=_FULL).items()}

    def sharded_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA for a sharded checkpoint (call on every rank): this rank's shards as DTensors laid out like
        the model's parameters under FSDP2, full tensors otherwise; floating-point buffers averaged over ranks
        first, like the model's."""
        with self.applied():
            average_buffers(self.model)
        out: dict[str, torch.Tensor] = {}
        for key, (owner, name), value in zip(self._keys, self._slots, self.values):
            live = getattr(owner, name)
            out[key] = DTensor.from_local(value, live.device_mesh, live.placements, shape=live.shape,
                                          stride=live.stride(), run_check=False) if isinstance(live, DTensor) else value
        return out

    @torch.no_grad()
    def load_sharded_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`sharded_state_dict` saved, resharded onto this run's layout by the loader."""
        missing = [k for k in self._keys if k not in state]
        if missing:
            raise UserError(f"the checkpoint's EMA does not fit this model ({len(missing)} missing keys, e.g. "
                            f"{missing[0]}); resume with the model it was saved from")
        for key, value in zip(self._keys, self.values):
            saved = state[key]
            value.copy_(saved.to_local() if isinstance(saved, DTensor) else saved)

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a :meth:`full_state_dict` (call on every rank; each keeps its shard)."""
        with self.applied():
            set_model_state_dict(self.model, state, options=_FULL)

    # ---- loop hooks ----------------------------------------------------------------------
    def after_step(self, step: int, keys: list[str]) -> None:
        """The EMA update after optimizer step ``step``: a local foreach lerp, no collective, no host sync."""
        self.update(step)

    def evaluate(self, trainer: Any) -> dict[str, Any]:
        """``eval_ema/*``: the trainer's evaluation with the EMA values swapped into the model (every rank)."""
        with self.applied():
            return trainer.evaluate(base="eval_ema")

    def missing_from_checkpoint(self, path: Path) -> None:
        """A checkpoint saved with EMA off: the EMA starts from its (just loaded) weights."""
        log.warning("checkpoint %s holds no EMA of the weights (saved with train.ema_decay=0): the EMA starts "
                    "from its weights", path)
        self.reset()


def build_ema(cfg: TrainConfig, parallel: Any) -> Optional[WeightEma]:
    """The EMA of ``parallel``'s model for ``train.ema_decay`` > 0 (call on every rank, after
    :func:`~tldist.train.parallelize.parallelize`), else None."""
    if not cfg.ema_decay:
        return None
    return WeightEma(parallel.model, parallel.module, decay=cfg.ema_decay, warmup=cfg.ema_warmup,
                     warmup_power=cfg.ema_warmup_power)
