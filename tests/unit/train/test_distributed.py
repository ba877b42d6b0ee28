"""tldist.train.distributed without a process group (2 real gloo processes: e2e/test_distributed.py)."""

from __future__ import annotations

from tldist.train.distributed import StopVote


def test_without_a_process_group_the_vote_is_immediate():
    vote = StopVote()
    assert [vote.poll(f) for f in (0, 1, 2, 0)] == [0, 1, 2, 0] and vote.finish() == 0
