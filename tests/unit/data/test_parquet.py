"""tldist.data.parquet (``tldist shards parquet``): the Hub's parquet image datasets as shard sets."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import read_tar_samples, tiny_image, tldist_main

pa = pytest.importorskip("pyarrow", reason="pyarrow (the 'parquet' extra, in 'dev') is not installed")
import pyarrow.parquet as pq  # noqa: E402

NAMES = ["ant", "bee", "cow", "doe"]


def hub_parquet(out: Path, files: int = 2, rows: int = 45, row_group: int = 16, struct: bool = True,
                labels=lambda i: i % 4, names=NAMES) -> list[Path]:
    """Parquet files as the Hub serves them: an ``image`` struct {bytes, path} (JPEG and PNG), an int
    ``label`` whose ClassLabel names are in the ``huggingface`` schema metadata, small row groups."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    meta = {"info": {"features": {"image": {"_type": "Image"},
                                  "label": {"names": names, "_type": "ClassLabel"}}}} if names else None
    paths = []
    for f in range(files):
        table_rows = []
        for i in range(rows):
            data = tiny_image(i % 4, rng, fmt="JPEG" if i % 2 else "PNG")
            table_rows.append({"image": {"bytes": data, "path": f"img{i}.jpg"} if struct else data,
                               "label": labels(f * rows + i), "extra": "x"})
        table = pa.Table.from_pylist(table_rows)
        if meta:
            table = table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()})
        path = out / f"train-{f:05d}-of-{files:05d}.parquet"
        pq.write_table(table, path, row_group_size=row_group)
        paths.append(path)
    return paths


def shard_digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.tar"))}


def test_struct_image_column_byte_identical_at_1_and_2_workers(tmp_path, capsys):
    files = [str(p) for p in hub_parquet(tmp_path / "pq")]
    for w in (1, 2):
        code, err = tldist_main(capsys, "shards", "parquet", *files, str(tmp_path / f"out{w}"), "--workers", str(w),
                                "--min-shards", "3", "--no-progress")
        assert code == 0, err
    one, two = shard_digests(tmp_path / "out1" / "train"), shard_digests(tmp_path / "out2" / "train")
    assert len(one) == 3 and one == two
    m = json.loads((tmp_path / "out1" / "train" / "manifest.json").read_text())
    assert m["classes"] == NAMES and m["num_samples"] == 90 and m["meta"]["class_counts"] == [23, 23, 22, 22]
    assert m["meta"]["source"]["type"] == "parquet" and all(s["offsets"][0] == [0, 0] for s in m["shards"])
    samples = {}
    for tar in sorted((tmp_path / "out1" / "train").glob("*.tar")):
        samples.update(read_tar_samples(tar))
    first = pq.read_table(files[0]).to_pylist()
    assert samples["000000000"]["png"] == first[0]["image"]["bytes"]  # bytes as stored, format from the magic
    assert samples["000000001"]["jpg"] == first[1]["image"]["bytes"]
    assert int(samples["000000046"]["cls"]) == 46 % 4  # row 1 of the second file


def test_plain_binary_column_and_string_labels(tmp_path):
    from tldist.data.ingest import write_planned
    from tldist.data.parquet import parquet_source

    files = hub_parquet(tmp_path / "pq", files=1, rows=20, struct=False, labels=lambda i: ["b", "a"][i % 2], names=None)
    classes, source = parquet_source([str(f) for f in files])
    assert classes == ["a", "b"] and len(source) == 20
    s = source.get(3)
    assert (s.key, s.label, s.ext) == ("000000003", 0, "jpg") and s.origin.endswith(".parquet:3")
    m = write_planned(source, tmp_path / "out", "train", classes, max_count=8, max_size=None, check="decode")
    assert m.num_samples == 20 and m.meta["class_counts"] == [10, 10]


def test_null_rows_are_skipped_and_counted(tmp_path):
    from tldist.data.ingest import write_planned
    from tldist.data.parquet import parquet_source

    files = hub_parquet(tmp_path / "pq", files=1, rows=12, labels=lambda i: None if i == 5 else i % 4)
    classes, source = parquet_source([str(files[0])])
    m = write_planned(source, tmp_path / "out", "train", classes, max_count=100, max_size=None, check="header")
    assert m.num_samples == 11 and m.meta["skipped"] == 1
    assert "column 'label' is null" in m.meta["skipped_examples"][0]


def test_bad_input_names_the_column_or_file(tmp_path, capsys, monkeypatch):
    files = [str(p) for p in hub_parquet(tmp_path / "pq", files=1, rows=4)]
    code, err = tldist_main(capsys, "shards", "parquet", *files, str(tmp_path / "o"), "--image-column", "img")
    assert code == 2 and err.count("\n") == 0
    assert "has no column 'img' (it has image, label, extra); name the right one with --image-column" in err
    code, err = tldist_main(capsys, "shards", "parquet", *files, str(tmp_path / "o"), "--label-column", "image")
    assert code == 2 and err == ("tldist: error: column 'image' holds dict values; labels must be class indices (int) "
                                 "or class names (string)")
    code, err = tldist_main(capsys, "shards", "parquet", str(tmp_path / "nope.parquet"), str(tmp_path / "o"))
    assert code == 2 and "nope.parquet' does not exist" in err
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if the extra were not installed
    code, err = tldist_main(capsys, "shards", "parquet", *files, str(tmp_path / "o"))
    assert code == 2 and err == "tldist: error: reading parquet needs pyarrow: pip install 'tldist[parquet]'"
