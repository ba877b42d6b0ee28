"""tldist.data.subset: seeded, stratified k-labels-per-class subsets written as real shard sets."""

from __future__ import annotations

from collections import Counter

import pytest

from helpers import make_shard_set


def _labels(location) -> dict[str, int]:
    from tldist.data.manifest import load_manifest, resolve_shard_urls
    from tldist.data.stream import read_shard

    m = load_manifest(location)
    out = {}
    for url, info in zip(resolve_shard_urls(m), m.shards):
        for rec in read_shard(url, 0, info.num_samples):
            assert rec.ok, rec
            out[rec.key] = int(rec.fields["cls"])
    return out


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """4 classes with 30 samples in 3 shards (labels i % 4: classes 0, 1 hold 8, classes 2, 3 hold 7)."""
    root = tmp_path_factory.mktemp("subset_src")
    make_shard_set(root / "train", split="train", n=30, shards=3)
    return root / "train"


def test_exact_k_per_class_and_deterministic_per_seed(uneven, tmp_path):
    from tldist.data.manifest import load_manifest
    from tldist.data.subset import write_label_subset

    src = _labels(uneven)
    m = write_label_subset(uneven, tmp_path / "a", 5, seed=0)
    got = _labels(tmp_path / "a")
    assert Counter(got.values()) == {0: 5, 1: 5, 2: 5, 3: 5}
    assert m.num_samples == 20 and m.classes == load_manifest(uneven).classes
    assert all(src[key] == label for key, label in got.items())  # keys and labels are the source's
    assert m.meta["subset"]["labels_per_class"] == 5 and m.meta["subset"]["seed"] == 0

    again = write_label_subset(uneven, tmp_path / "b", 5, seed=0)  # same seed, fresh directory
    assert set(_labels(tmp_path / "b")) == set(got) and again.num_samples == 20
    other = _labels(tmp_path / "c") if write_label_subset(uneven, tmp_path / "c", 5, seed=1) else {}
    assert set(other) != set(got) and Counter(other.values()) == {0: 5, 1: 5, 2: 5, 3: 5}
    # for one seed, a smaller k is a prefix of the same per-class permutation
    write_label_subset(uneven, tmp_path / "d", 2, seed=0)
    assert set(_labels(tmp_path / "d")) < set(got)


def test_k_larger_than_a_class_is_refused_naming_it(uneven, tmp_path):
    from tldist.data.subset import write_label_subset
    from tldist.errors import UserError

    with pytest.raises(UserError, match=r"labels per class 8 is more than class 'c2' has \(7 samples; 2 classes "
                                        r"are short\); use k <= 7 or 'all'"):
        write_label_subset(uneven, tmp_path / "x", 8, seed=0)
    assert not (tmp_path / "x" / "manifest.json").exists()
    with pytest.raises(UserError, match="use an integer >= 1"):
        write_label_subset(uneven, tmp_path / "x", 0, seed=0)
    write_label_subset(uneven, tmp_path / "y", 7, seed=0)  # the largest k every class allows
    assert Counter(_labels(tmp_path / "y").values()) == {0: 7, 1: 7, 2: 7, 3: 7}


def test_an_existing_subset_is_reused_and_a_different_one_rewritten(uneven, tmp_path):
    from tldist.data.subset import subset_matches, write_label_subset

    out = tmp_path / "s"
    write_label_subset(uneven, out, 3, seed=0)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    write_label_subset(uneven, out, 3, seed=0)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert subset_matches(out, uneven, 3, 1) is None
    write_label_subset(uneven, out, 3, seed=1)  # same directory, another seed: rewritten
    assert subset_matches(out, uneven, 3, 1) is not None and len(_labels(out)) == 12
