"""Shared pieces of the sharded-checkpoint tests that run real processes (2 spawned gloo ranks, or this one):
a tiny model in every layout tldist trains in (one process, DDP, FSDP2), a few training steps, the run's
checkpoint states, and the full (gathered) model, AdamW and EMA state to compare checkpoints by."""

from __future__ import annotations

import os

import torch
import torch.nn as nn

LAYOUTS = ("plain", "ddp", "fsdp2")


class Block(nn.Module):
    def __init__(self, i: int, o: int):
        super().__init__()
        self.fc, self.norm = nn.Linear(i, o), nn.LayerNorm(o)  # 5 and 7 rows: uneven shards over 2 ranks

    def forward(self, x):
        return torch.relu(self.norm(self.fc(x)))


def tiny(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(Block(4, 5), Block(5, 7), nn.Linear(7, 3))


class Loader:
    """A per-rank state like the train loader's: remembers which ranks' states it was given."""

    per_rank = True

    def __init__(self, rank: int = 0, position: int = 0):
        self.rank, self.position = rank, position
        self.loaded_from: list[int] = []

    def state_dict(self):
        return {"rank": self.rank, "position": self.position}

    def load_state_dict(self, sd):
        self.position, self.loaded_from = sd["position"], [sd["rank"]]

    def load_resharded(self, states):
        self.position, self.loaded_from = states[0]["position"], [s["rank"] for s in states]


def init(rank: int, port: int, world_size: int = 2) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def build(layout: str, seed: int):
    """``(model, module, optimizer, ema)`` of :func:`tiny` in ``layout`` (DDP and FSDP2 need the process group)."""
    from tldist.train.ema import WeightEma

    module = tiny(seed)
    model = module
    if layout == "ddp":
        model = nn.parallel.DistributedDataParallel(module)
    elif layout == "fsdp2":
        from tldist.train.parallelize import apply_fsdp2

        apply_fsdp2(module, ["Block"], device_type="cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    return model, module, opt, WeightEma(model, module, decay=0.8)


def train(model, opt, ema, steps: int, rank: int = 0, world_size: int = 1, first: int = 1) -> None:
    """``steps`` optimizer steps on a fixed global batch of 8 (each rank its share), the EMA after each."""
    gen = torch.Generator().manual_seed(100 + first)
    for step in range(first, first + steps):
        x = torch.randn(8, 4, generator=gen).chunk(world_size)[rank]
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        ema.update(step)


def manager(root, model, opt, ema, *, rank: int = 0, loader=None, **kw):
    """The run's checkpoint manager for these states (``kw``: async_save, remote, keep_last...)."""
    from tldist.artifacts.checkpoint import CheckpointManager, ModelState, OptimizerState, RngState

    states = {"model": ModelState(model), "optimizer": OptimizerState(model, opt), "ema": ema, "rng": RngState(),
              "loader": loader if loader is not None else Loader(rank)}
    kw.setdefault("keep_last", 3)
    return CheckpointManager(root, states=states, is_main=rank == 0, config_yaml="a: 1\n", **kw)


def full_state(model, opt, ema) -> dict:
    """The full model, optimizer (keyed by parameter name) and EMA state on the CPU (call on every rank; a
    sharded model gives it to rank 0 only, the others get empty dicts)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from tldist.artifacts.checkpoint import ModelState

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    osd = get_optimizer_state_dict(model, opt, options=opts)
    return {"model": {k: v.clone() for k, v in ModelState(model).full_state_dict().items()},
            "optimizer": {k: {n: t.clone() for n, t in v.items()} for k, v in osd.get("state", {}).items()},
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in osd.get("param_groups", [])],
            "ema": ema.full_state_dict()}


def differences(a: dict, b: dict) -> list[str]:
    """Where two :func:`full_state` results differ (bitwise), by name; [] when equal."""
    out = []
    for part in ("model", "ema"):
        if a[part].keys() != b[part].keys():
            out.append(f"{part}: keys {sorted(a[part])} != {sorted(b[part])}")
        out += [f"{part}.{k}" for k in a[part] if k in b[part] and not torch.equal(a[part][k], b[part][k])]
    if a["optimizer"].keys() != b["optimizer"].keys():
        out.append(f"optimizer: keys {sorted(a['optimizer'])} != {sorted(b['optimizer'])}")
    for k, st in a["optimizer"].items():
        for n, t in st.items():
            if k in b["optimizer"] and not torch.equal(t, b["optimizer"][k].get(n, torch.empty(0))):
                out.append(f"optimizer.{k}.{n}")
    if a["param_groups"] != b["param_groups"]:
        out.append("param_groups")
    return out
