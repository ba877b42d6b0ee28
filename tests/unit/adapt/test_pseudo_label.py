"""tldist.adapt.pseudo_label: which confident candidates are kept (per-class cap, balance).

``tldist pseudo-label`` and ``tldist adapt`` with real processes: e2e/test_adapt.py."""

from __future__ import annotations


def test_select_caps_and_balances():
    from tldist.adapt.pseudo_label import select

    cands = [("a", 0, 0.99, 0), ("b", 0, 0.95, 1), ("c", 0, 0.97, 0), ("d", 1, 0.91, 1), ("e", 2, 0.93, 2),
             ("f", 2, 0.96, 2)]
    kept, cap = select(cands, 4, balance=False, max_per_class=0)
    assert cap is None and len(kept) == 6
    kept, cap = select(cands, 4, balance=True, max_per_class=0)
    assert cap == 1 and [k[0] for k in kept] == ["a", "d", "f"]  # most confident of each present class
    kept, cap = select(cands, 4, balance=False, max_per_class=2)
    assert cap == 2 and [k[0] for k in kept] == ["a", "c", "d", "f", "e"]
