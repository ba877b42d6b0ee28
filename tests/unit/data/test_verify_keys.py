"""tldist.data.verify: duplicate keys over a whole set, found without a dict of every key (KeyLog)."""

from __future__ import annotations

import shutil

from helpers import make_shard_set


def test_a_key_repeated_in_another_shard_is_named_with_both_shards(tmp_path):
    from tldist.data.manifest import load_manifest
    from tldist.data.verify import verify_shards

    a = make_shard_set(tmp_path / "a", split="train", n=40, shards=4)
    assert verify_shards(tmp_path / "a", decode=False).ok
    # a copy of shard 0 under the name of shard 2: its 10 keys now appear twice
    shutil.copy(tmp_path / "a" / a.shards[0].name, tmp_path / "a" / a.shards[2].name)
    report = verify_shards(tmp_path / "a", decode=False)
    dups = [p for p in report.problems if "duplicate key" in p.message]
    m = load_manifest(tmp_path / "a")
    assert len(dups) == 10 and {p.shard for p in dups} == {m.shards[2].name}
    assert all(f"also in {m.shards[0].name}" in p.message for p in dups)
    assert {p.key for p in dups} == {f"strain{i:05d}" for i in range(10)}


def test_keylog_tells_hash_suspects_from_real_duplicates():
    from tldist.data.verify import KeyLog

    log = KeyLog()
    shards = {0: ["a", "b"], 1: ["c", "a"], 2: ["d"]}
    for s, keys in shards.items():
        for k in keys:
            log.add(k, s)
    assert log.duplicates(lambda s: shards[s]) == [("a", [0, 1])]
