"""tldist.adapt.pseudo_label.select on 2 spawned gloo ranks: the job-wide selection without moving candidates.

Each rank holds half of the candidates; the union of what the ranks keep must equal the one-process
selection over all candidates (per-class cap by confidence, ties broken by key), for a cap, for balance, and
with many candidates tied exactly at a class's cut-off.
"""

from __future__ import annotations

import os
import random

import pytest

from helpers import spawn_ranks


def candidates(seed: int) -> list[tuple[str, int, float, int]]:
    rng = random.Random(seed)
    levels = [0.5, 0.625, 0.75, 0.875, 0.9375]  # exact float32 values: many ties at every cut-off
    out = []
    for i in range(400):
        k = rng.randrange(6)
        conf = rng.choice(levels) if i % 2 else rng.uniform(0.5, 1.0)
        out.append((f"k{rng.getrandbits(40):010x}", k, float(conf), rng.randrange(6)))
    out.append(("only", 6, 0.99, 6))  # a class with one candidate: sets the balance cap to 1
    return out


def reference(cands, num_classes, *, balance, max_per_class):
    """The selection by sorting everything in one place (the design before: every rank held every candidate)."""
    by_class = [[] for _ in range(num_classes)]
    for c in cands:
        by_class[c[1]].append(c)
    cap = max_per_class or None
    if balance:
        present = [len(v) for v in by_class if v]
        cap = min(present) if cap is None else min(cap, min(present))
    kept = []
    for rows in by_class:
        rows.sort(key=lambda c: (-c[2], c[0]))
        kept.extend(rows if cap is None else rows[:cap])
    return kept, cap


CASES = [dict(balance=False, max_per_class=0), dict(balance=False, max_per_class=7),
         dict(balance=False, max_per_class=1), dict(balance=True, max_per_class=0),
         dict(balance=False, max_per_class=1000)]


def _worker(rank: int, port: int, out) -> None:
    import torch.distributed as dist

    from tldist.adapt.pseudo_label import select

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cands = candidates(0)
    mine = cands[rank::2]
    out[rank] = [select(mine, 8, **case) for case in CASES]
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_keep_what_one_process_keeps():
    from tldist.adapt.pseudo_label import select

    got = spawn_ranks(_worker)
    cands = candidates(0)
    for i, case in enumerate(CASES):
        want, cap = reference(cands, 8, **case)
        assert select(cands, 8, **case) == (sorted(want, key=lambda c: (c[1], -c[2], c[0])), cap)  # one process
        (k0, c0), (k1, c1) = got[0][i], got[1][i]
        assert c0 == c1 == cap, case
        assert not {c[0] for c in k0} & {c[0] for c in k1}  # each rank keeps only its own candidates
        assert sorted(k0 + k1) == sorted(want), case


def test_one_process_cut_with_ties_is_by_confidence_then_key():
    from tldist.adapt.pseudo_label import select

    cands = [("b", 0, 0.75, 0), ("a", 0, 0.75, 0), ("c", 0, 0.75, 0), ("z", 0, 0.9, 0), ("y", 0, 0.5, 0)]
    kept, cap = select(cands, 1, balance=False, max_per_class=3)
    assert cap == 3 and [c[0] for c in kept] == ["z", "a", "b"]
