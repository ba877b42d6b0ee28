"""`tldist shards` subcommands and the shard checker, on real shards in tmp_path."""

from __future__ import annotations

import argparse
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from tldist.data.shards_cli import add_parser, parse_size
from tldist.data.verify import verify_shards
from tldist.data.writer import Sample, write_shards
from tldist.errors import ConfigError, DataError


def jpeg(seed: int, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tldist")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def write_set(out, corrupt_key: str | None = None):
    samples = []
    for i in range(9):
        data = jpeg(i)
        if f"s{i}" == corrupt_key:
            data = data[: len(data) // 2]  # header intact, entropy data cut
        samples.append(Sample(f"s{i}", data, "jpg", i % 3))
    return write_shards(samples, out, "train", ["a", "b", "c"], max_count=3, check="none")


def test_verify_clean_set(tmp_path, capsys):
    write_set(tmp_path / "ok")
    report = verify_shards(tmp_path / "ok")
    assert report.ok and report.num_samples == 9 and report.label_counts == {0: 3, 1: 3, 2: 3}
    assert run(["shards", "verify", str(tmp_path / "ok")]) == 0
    assert "9/9 samples" in capsys.readouterr().out


def test_verify_reports_corrupt_member_and_wrong_count(tmp_path, capsys):
    m = write_set(tmp_path / "bad", corrupt_key="s4")
    manifest_path = tmp_path / "bad" / "manifest.json"
    raw = json.loads(manifest_path.read_text())
    raw["shards"][2]["num_samples"] = 5
    manifest_path.write_text(json.dumps(raw))
    shard_of_s4 = next(s.name for s, u in zip(m.shards, m.shard_urls())
                       if "s4.jpg" in tarfile.open(u).getnames())
    report = verify_shards(tmp_path / "bad")
    assert not report.ok
    found = {(p.shard, p.key) for p in report.problems}
    assert (shard_of_s4, "s4") in found
    assert any(p.shard == "train-000002.tar" and "manifest says 5" in p.message for p in report.problems)
    assert len(report.problems) == 2
    assert run(["shards", "verify", str(tmp_path / "bad")]) == 1
    out = capsys.readouterr().out
    assert f"{shard_of_s4}: s4: .jpg does not decode" in out and "train-000002.tar: manifest says 5" in out


def test_verify_missing_and_out_of_range(tmp_path):
    write_shards([Sample("x", jpeg(0), "jpg", 2)], tmp_path / "s", "train", ["a", "b", "c"])
    raw = json.loads((tmp_path / "s" / "manifest.json").read_text())
    raw["classes"] = ["a", "b"]
    raw["shards"].append({"name": "train-000001.tar", "num_samples": 1})
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(raw))
    msgs = [str(p) for p in verify_shards(tmp_path / "s").problems]
    assert any("x: .cls is 2, outside 0..1" in m for m in msgs)
    assert any("train-000001.tar" in m and "missing" in m for m in msgs)
    with pytest.raises(DataError, match="no manifest"):
        verify_shards(tmp_path / "nowhere")


def test_cli_writers(tmp_path, capsys):
    for c in ("x", "y"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(5):
            (tmp_path / "src" / c / f"{i}.jpg").write_bytes(jpeg(i + (10 if c == "y" else 0)))
    assert run(["shards", "imagefolder", str(tmp_path / "src"), str(tmp_path / "out"), "--val-fraction", "0.2",
                "--min-shards", "2", "--max-size", "1MB"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"train: {tmp_path / 'out' / 'train'}  2 shards  8 samples  2 classes"
    assert lines[1].startswith("val: ") and "2 samples" in lines[1]
    assert run(["shards", "verify", str(tmp_path / "out" / "val")]) == 0
    (tmp_path / "list.csv").write_text("src/x/0.jpg,x\nsrc/y/1.jpg,y\n")
    assert run(["shards", "csv", str(tmp_path / "list.csv"), str(tmp_path / "csvout"), "--split", "val"]) == 0
    assert "val: " in capsys.readouterr().out and (tmp_path / "csvout" / "val" / "manifest.json").is_file()
    with pytest.raises(DataError, match="does not exist"):
        run(["shards", "imagefolder", str(tmp_path / "missing"), str(tmp_path / "o")])


def test_parse_size():
    assert parse_size("500MB") == 500_000_000 and parse_size("1.5G") == 1_500_000_000
    assert parse_size("256MiB") == 256 * 1024**2 and parse_size("1234") == 1234
    with pytest.raises(ConfigError, match="--max-size"):
        parse_size("lots")


def test_readme_shards_examples_parse():
    """Every `tldist shards ...` line in the README is accepted by the parser (e.g. csv --val-fraction)."""
    import shlex
    from pathlib import Path

    readme = Path(__file__).resolve().parents[1] / "README.md"
    lines = [ln.split("#")[0] for ln in readme.read_text().splitlines() if ln.startswith("tldist shards ")]
    assert any("--val-fraction" in ln for ln in lines)
    parser = argparse.ArgumentParser(prog="tldist")
    add_parser(parser.add_subparsers(dest="command", required=True))
    for line in lines:
        assert callable(parser.parse_args(shlex.split(line)[1:]).func), line


def test_cli_csv_val_fraction_writes_train_and_val(tmp_path, capsys):
    rows = []
    for i in range(12):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(i))
        rows.append(f"{i}.jpg,{'xyz'[i % 3]}\n")
    (tmp_path / "list.csv").write_text("".join(rows))
    out = tmp_path / "out"
    assert run(["shards", "csv", str(tmp_path / "list.csv"), str(out), "--val-fraction", "0.25",
                "--min-shards", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"train: {out / 'train'}  1 shards  9 samples  3 classes",
                     f"val: {out / 'val'}  1 shards  3 samples  3 classes"]
    train, val = verify_shards(out / "train"), verify_shards(out / "val")
    assert train.ok and val.ok and val.label_counts == {0: 1, 1: 1, 2: 1}


def test_cli_imagefolder_empty_class_folder(tmp_path, capsys):
    for c in ("x", "y"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "src" / c / f"{i}.jpg").write_bytes(jpeg(i))
    (tmp_path / "src" / "z").mkdir()
    (tmp_path / "src" / "z" / ".DS_Store").write_bytes(b"Bud1")
    with pytest.raises(DataError, match=r"no images: \['z'\]"):
        run(["shards", "imagefolder", str(tmp_path / "src"), str(tmp_path / "out")])
    assert run(["shards", "imagefolder", str(tmp_path / "src"), str(tmp_path / "out"), "--keep-empty-classes"]) == 0
    assert "4 samples  3 classes" in capsys.readouterr().out


def test_verify_decodes_as_training_does(tmp_path, capsys):
    """verify runs the training decoders: BMP/TIFF/PPM are fine for both (torchvision falls back to
    PIL); a PNG that only PIL reads is flagged for data.decode=torchvision, and ok for pil alone."""
    from tldist.data.transforms import decode_image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    cut = buf.getvalue()[:-20]
    samples = [Sample("cut", cut, "png", 0)]
    for i, fmt in enumerate(["BMP", "TIFF", "PPM"]):
        b = io.BytesIO()
        Image.open(io.BytesIO(jpeg(i))).save(b, fmt)
        samples.append(Sample(f"f{i}", b.getvalue(), fmt.lower(), 0))
        assert decode_image(b.getvalue(), "torchvision").shape == (3, 32, 32)
    write_shards(samples, tmp_path / "s", "train", ["a"], check="none")
    report = verify_shards(tmp_path / "s")
    assert [(p.key, "data.decode=torchvision" in p.message, "data.decode=pil" in p.message)
            for p in report.problems] == [("cut", True, False)]
    assert verify_shards(tmp_path / "s", decoders=["pil"]).ok
    assert run(["shards", "verify", str(tmp_path / "s"), "--decoder", "pil"]) == 0
    assert run(["shards", "verify", str(tmp_path / "s")]) == 1
    assert "cut: .png does not decode (data.decode=torchvision" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="decoders"):
        verify_shards(tmp_path / "s", decoders=["opencv"])


def test_cli_subset_writes_k_per_class_and_refuses_a_short_class(tmp_path, capsys):
    from tldist.errors import UserError

    write_set(tmp_path / "src")  # 9 samples, 3 per class
    assert run(["shards", "subset", str(tmp_path / "src"), str(tmp_path / "k2"), "--labels-per-class", "2",
                "--seed", "1"]) == 0
    assert capsys.readouterr().out.strip() == f"train: {tmp_path / 'k2'}  1 shards  6 samples  3 classes"
    assert verify_shards(tmp_path / "k2").label_counts == {0: 2, 1: 2, 2: 2}
    with pytest.raises(UserError, match="labels per class 4 is more than class 'a' has \\(3 samples"):
        run(["shards", "subset", str(tmp_path / "src"), str(tmp_path / "k4"), "-k", "4"])
    with pytest.raises(ConfigError, match="--labels-per-class must be >= 1"):
        run(["shards", "subset", str(tmp_path / "src"), str(tmp_path / "k0"), "-k", "0"])
