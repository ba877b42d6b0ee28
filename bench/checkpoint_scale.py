"""Checkpoint save and load at scale: tldist's sharded checkpoints (DCP, every rank writes and reads its own
part; sync and async) against the full-state design tldist had before (model and optimizer gathered onto
rank 0, written by it alone; every rank reading the full files back), side by side in the same processes.

2 gloo ranks on the CPU, a stack of ``Linear(1024, 1024)`` layers (1.05M parameters each) under FSDP2 or
DDP, AdamW with its moments. For each size: the time training is blocked by a save, the peak host memory
above the start of the call on each rank (sampled every 5 ms, after ``malloc_trim``), and the same for the
load into a fresh model and optimizer. Run:

    python bench/checkpoint_scale.py --mode fsdp --layers 10 50 200 --repeats 2
    python bench/checkpoint_scale.py --mode ddp --layers 10 50 200 --repeats 2

Prints one JSON line per (mode, size) and a markdown table; per-rank figures are ``[rank0, rank1]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
from pathlib import Path

from common import DEFAULT_ROOT, Peak, free_port, machine_line, table



def full_state_save(root: Path, model, opt, rank: int) -> None:
    """The design before sharded checkpoints: full state dicts gathered onto rank 0 (cpu_offload), written by it."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=full)
    osd = get_optimizer_state_dict(model, opt, options=full)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in msd.items()}, str(root / "model.safetensors"))
        torch.save(osd, root / "optimizer.pt")
        for name in ("model.safetensors", "optimizer.pt"):  # fsync'ed, as that design did (and DCP's writer does)
            fd = os.open(root / name, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    dist.barrier()


def full_state_load(root: Path, model, opt) -> None:
    """Every rank reads the full files and keeps its part (set_*_state_dict with full_state_dict)."""
    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    set_model_state_dict(model, load_file(str(root / "model.safetensors")), options=full)
    set_optimizer_state_dict(model, opt, torch.load(root / "optimizer.pt", weights_only=True), options=full)


def build(mode: str, layers: int):
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(layers)])
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for m in model:
            fully_shard(m)
        fully_shard(model)
        wrapped = model
    else:
        wrapped = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-4)
    wrapped(torch.randn(4, 1024)).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return wrapped, opt, sum(p.numel() for p in model.parameters())


def worker(rank: int, world: int, port: int, out: str, mode: str, layers_list: list[int], repeats: int) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from tldist.artifacts.checkpoint import CheckpointManager, ModelState, OptimizerState

    rows: list[dict] = []
    for layers in layers_list:
        wrapped, opt, nparams = build(mode, layers)
        root = Path(out) / f"{mode}_{layers}"
        if rank == 0:
            shutil.rmtree(root, ignore_errors=True)
        dist.barrier()
        figures: dict[str, list[float]] = {}

        def note(key: str, p: Peak) -> None:
            figures.setdefault(f"{key}_s", []).append(p.dt)
            figures.setdefault(f"{key}_extra_mb", []).append(p.peak - p.base)

        states = {"model": ModelState(wrapped), "optimizer": OptimizerState(wrapped, opt)}
        sync = CheckpointManager(root / "sharded", states=states, keep_last=1, is_main=rank == 0)
        asyn = CheckpointManager(root / "async", states=states, keep_last=1, is_main=rank == 0, async_save=True)
        for r in range(repeats):  # interleaved: before, sharded, async
            dist.barrier()
            with Peak() as p:
                full_state_save(root / "full", wrapped, opt, rank)
            note("full_save", p)
            dist.barrier()
            with Peak() as p:
                sync.save(r + 1, trainer={"world_size": world})
            note("sharded_save", p)
            dist.barrier()
            with Peak() as p:  # blocked: until the state is copied to host memory and the write is started
                asyn.save(r + 1, trainer={"world_size": world})
            note("async_save_blocked", p)
            with Peak() as p:
                asyn.wait()
            note("async_save_rest", p)
            dist.barrier()
            fresh, fopt, _ = build(mode, layers)
            with Peak() as p:
                full_state_load(root / "full", fresh, fopt)
            note("full_load", p)
            del fresh, fopt
            dist.barrier()
            fresh, fopt, _ = build(mode, layers)
            loader = CheckpointManager(root / "sharded", states={"model": ModelState(fresh),
                                                                  "optimizer": OptimizerState(fresh, fopt)},
                                       keep_last=1, is_main=rank == 0)
            with Peak() as p:
                loader.load(root / "sharded" / f"step_{r + 1:08d}")
            note("sharded_load", p)
            del fresh, fopt, loader
            gc.collect()
        asyn.close()
        row = {k: sorted(v)[len(v) // 2] for k, v in figures.items()}  # median over repeats
        gathered = [None] * world
        dist.all_gather_object(gathered, row)
        if rank == 0:
            merged = {"mode": mode, "params_M": round(nparams / 1e6, 1), "world": world,
                      **{k: [round(g[k], 2) for g in gathered] for k in row}}
            sharded = root / "sharded" / f"step_{repeats:08d}"
            merged["files_per_save"] = {"full": len(list((root / "full").iterdir())),
                                        "sharded": len([f for f in sharded.iterdir() if f.suffix == ".distcp"])}
            print(json.dumps(merged), flush=True)
            rows.append(merged)
            shutil.rmtree(root, ignore_errors=True)
        del wrapped, opt
        gc.collect()
        dist.barrier()
    if rank == 0:
        f = lambda r, k: f"{r[k][0]:.2f} / {r[k][1]:.2f}"  # noqa: E731  rank 0 / rank 1
        m = lambda r, k: f"{r[k][0]:.0f} / {r[k][1]:.0f}"  # noqa: E731
        print(table(["params (M)", "save blocked s: full / sharded / async", "save peak extra MB r0/r1: full",
                     "sharded", "async", "load s: full", "sharded", "load peak extra MB r0/r1: full", "sharded"],
                    [[r["params_M"], f"{r['full_save_s'][0]:.2f} / {r['sharded_save_s'][0]:.2f} / "
                      f"{r['async_save_blocked_s'][0]:.2f}", m(r, "full_save_extra_mb"), m(r, "sharded_save_extra_mb"),
                      m(r, "async_save_blocked_extra_mb"), f(r, "full_load_s"), f(r, "sharded_load_s"),
                      m(r, "full_load_extra_mb"), m(r, "sharded_load_extra_mb")] for r in rows]))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("fsdp", "ddp"), default="fsdp")
    ap.add_argument("--layers", type=int, nargs="+", default=[10, 50, 200], help="Linear(1024,1024) layers (~1.05M params each)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(DEFAULT_ROOT / "checkpoint_scale"))
    a = ap.parse_args()
    import torch.multiprocessing as mp

    print(machine_line())
    print(f"# python bench/checkpoint_scale.py --mode {a.mode} --layers {' '.join(map(str, a.layers))} "
          f"--repeats {a.repeats}", flush=True)
    mp.spawn(worker, args=(2, free_port(), a.out, a.mode, a.layers, a.repeats), nprocs=2)


if __name__ == "__main__":
    sys.exit(main())
