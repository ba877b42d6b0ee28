"""tldist.data.manifest: a corrupt manifest is one line; eval sets and their names."""

from __future__ import annotations

import pytest

from tldist.config import load_config
from tldist.errors import ConfigError


# Manifests are user input too (data.train/data.val point at them): a corrupt one is one DataError line.
@pytest.mark.parametrize("raw", [b"[1, 2]", b"null", b'"text"', b"\xff\xfe\x00", b'{"shards": [', b"",
                                 b'{"shards": [{"name": "a.tar", "num_samples": 3}], "classes": [], "meta": 3}'])
def test_corrupt_manifest_is_one_line(tmp_path, raw):
    from tldist.data.manifest import load_manifest
    from tldist.errors import DataError

    (tmp_path / "manifest.json").write_bytes(raw)
    with pytest.raises(DataError) as e:
        load_manifest(tmp_path)
    assert f"manifest '{tmp_path}' is malformed" in str(e.value) and "\n" not in str(e.value)


def test_the_check_before_a_run_and_the_load_find_the_same_manifest(tmp_path, monkeypatch):
    """check_data_locations (before any output is written) and load_manifest resolve a location alike, through
    manifest_path: a shard directory, its manifest file, '~' expanded; a missing one is refused by both."""
    from helpers import make_shard_set
    from tldist.config import DataConfig
    from tldist.data.manifest import load_manifest, manifest_path
    from tldist.data.pipeline import check_data_locations
    from tldist.errors import DataError

    make_shard_set(tmp_path / "home" / "s", split="train", n=4, shards=1)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for location in ("~/s", "~/s/manifest.json", str(tmp_path / "home" / "s")):
        assert manifest_path(location) == tmp_path / "home" / "s" / "manifest.json"
        check_data_locations(DataConfig(train=[location]))
        assert load_manifest(location).num_samples == 4
    assert manifest_path("http://host/s") is None
    with pytest.raises(DataError, match=f"^no manifest at '{tmp_path}/home/t': point data.\\* at"):
        load_manifest("~/t")
    with pytest.raises(DataError, match=f"^data.val '~/t': no manifest at '{tmp_path}/home/t': "
                                        "point data.val at"):
        check_data_locations(DataConfig(train=["~/s"], val="~/t"))


# ---- eval set names ----------------------------------------------------------------------------

def test_eval_set_names_are_distinct_tails():
    from tldist.data.manifest import eval_set_names

    assert eval_set_names(["/d/digits/val", "/d/letters/val"]) == ["digits/val", "letters/val"]
    assert eval_set_names(["/x/a/shards/val", "/x/b/shards/val", "/y/other/val"]) == \
        ["a/shards/val", "b/shards/val", "other/val"]
    assert eval_set_names(["http://h/a/val", "/h/a/val/manifest.json"]) == ["http://h/a/val", "/h/a/val/manifest.json"]
    names = eval_set_names(["/val", "/x/val"])
    assert "val" not in names and len(set(names)) == 2  # "val" is data.val's name


@pytest.mark.parametrize("overrides, keys", [
    (["data.val=/x/a/val", "data.val_sets=[/x/a/val/]"], ("'data.val'", "'data.val_sets[0]'")),
    (["data.val_sets=[/x/a/val,/x/b/val,/x/a/val/manifest.json]"], ("'data.val_sets[0]'", "'data.val_sets[2]'")),
])
def test_the_same_eval_set_twice_is_refused(overrides, keys):
    from tldist.data.manifest import eval_sets

    cfg = load_config(None, ["data.train=[t]", *overrides])
    with pytest.raises(ConfigError) as e:
        eval_sets(cfg.data)
    assert all(k in str(e.value) for k in keys) and "/x/a/val" in str(e.value)


def test_eval_sets_keep_data_val_as_val():
    from tldist.data.manifest import eval_sets

    cfg = load_config(None, ["data.train=[t]", "data.val=/s/val", "data.val_sets=[val,/x/shards/val]"])
    sets = eval_sets(cfg.data)
    assert sets[0] == ("val", "/s/val") and [loc for _, loc in sets] == ["/s/val", "val", "/x/shards/val"]
    assert len({n for n, _ in sets}) == 3
