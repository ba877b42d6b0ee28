"""tldist.data.labels: one rule for reading a sample's label and image, as its manifest says."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from helpers import tiny_image


def test_rules_read_cls_json_txt_and_none():
    from tldist.data.labels import LabelError, LabelRule

    cls = LabelRule()
    assert cls.label({"cls": b" 3\n", "jpg": b"x"}) == 3
    with pytest.raises(LabelError, match=r"no \.cls label member"):
        cls.label({"jpg": b"x"})
    with pytest.raises(LabelError, match="expected ASCII digits"):
        cls.label({"cls": b"dog"})

    by_index = LabelRule.parse("json:label")
    assert (by_index.member, by_index.key, by_index.values) == ("json", "label", "indices")
    assert by_index.label({"json": json.dumps({"label": 2}).encode()}) == 2
    names = LabelRule.parse("json:label", values="names", classes=("cat", "dog"))
    assert names.label({"json": b'{"label": "dog", "caption": "a dog"}'}) == 1
    with pytest.raises(LabelError, match="no field 'label' in .json"):
        names.label({"json": b'{"caption": "a dog"}'})
    with pytest.raises(LabelError, match="class name 'eel' is not one of the set's 2 classes"):
        names.label({"json": b'{"label": "eel"}'})
    with pytest.raises(LabelError, match="does not parse"):
        names.label({"json": b"{not json"})
    with pytest.raises(LabelError, match="no .json member"):
        names.label({"jpg": b""})

    txt = LabelRule.parse("txt", classes=("cat", "dog"))
    assert txt.values == "names" and txt.label({"txt": "dog \n".encode()}) == 1
    none = LabelRule.parse("none")
    assert not none.labelled and none.label({}) == -1


def test_image_member_follows_the_rule_order():
    from tldist.data.labels import IMAGE_EXTS, LabelError, LabelRule

    fields = {"seg.png": b"mask", "png": b"p", "jpeg": b"j", "cls": b"0"}
    assert LabelRule().image_member(fields) == ("jpeg", b"j")  # jpg, jpeg, png... in IMAGE_EXTS order
    assert LabelRule(image=("png",)).image_member(fields) == ("png", b"p")
    with pytest.raises(LabelError, match="no image member"):
        LabelRule().image_member({"seg.png": b"mask", "cls": b"0"})  # a multi-part extension is not the image
    assert {"jpg", "jpeg", "png", "webp", "ppm", "pgm", "tiff"} <= set(IMAGE_EXTS)


def test_meta_round_trip_and_parse_errors():
    from tldist.data.labels import DEFAULT_RULE, LabelRule
    from tldist.errors import ConfigError

    rule = LabelRule(member="json", key="cls_name", values="names", classes=("a", "b"), image=("webp", "jpg"))
    meta = {"labels": rule.to_meta()}
    assert meta["labels"] == {"member": "json", "values": "names", "key": "cls_name", "image": ["webp", "jpg"]}
    assert LabelRule.from_meta(meta, ["a", "b"]) == rule
    assert LabelRule.from_meta({}, ["a"]) == LabelRule(classes=("a",))  # a manifest without meta.labels: .cls
    assert DEFAULT_RULE.to_meta() == {"member": "cls", "values": "indices"}
    for bad in ("json", "cls:x", "label", "json:"):
        with pytest.raises(ConfigError, match="--label"):
            LabelRule.parse(bad)


def test_loader_workers_find_the_rule_by_shard_url(tmp_path):
    """resolve_shard_urls registers a manifest's rule for its shard URLs; decode_record then reads a json
    label the way that manifest says, and a sample without it is a SampleError naming what is missing."""
    from tldist.data.labels import DEFAULT_RULE, rule_for_shard
    from tldist.data.manifest import Manifest, ShardInfo, resolve_shard_urls
    from tldist.data.stream import Record
    from tldist.data.transforms import build_eval_transform
    from tldist.data.worker import SampleError, decode_record

    shard = tmp_path / "x-000000.tar"
    shard.write_bytes(b"")
    m = Manifest("train", ["cat", "dog"], [ShardInfo(str(shard), 2)],
                 meta={"labels": {"member": "json", "key": "label", "values": "names"}}, base=str(tmp_path))
    url = resolve_shard_urls(m)[0]
    assert rule_for_shard(url).member == "json" and rule_for_shard("/elsewhere.tar") == DEFAULT_RULE
    image = tiny_image(1, np.random.default_rng(0))
    transform = build_eval_transform(16, "bilinear", 1.0)
    rec = Record("k1", url, {"png": image, "json": b'{"label": "dog"}'})
    out, label = decode_record(rec, "pil", transform, random.Random(0), 2, None)
    assert label == 1 and tuple(out.shape) == (3, 16, 16)
    _, mapped = decode_record(rec, "pil", transform, None, 2, [5, 7])  # label maps apply after the rule
    assert mapped == 7
    with pytest.raises(SampleError, match="no field 'label' in .json"):
        decode_record(Record("k2", url, {"png": image, "json": b"{}"}), "pil", transform, None, 2, None)
    # an unlabelled set (--label none) gives -1, never range-checked nor mapped
    m.meta["labels"] = {"member": "none"}
    resolve_shard_urls(m)
    assert decode_record(Record("k3", url, {"png": image}), "pil", transform, None, 0, None)[1] == -1
