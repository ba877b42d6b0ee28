"""`tldist shards` subcommands (tldist.cli.shards), run in-process on real shards in tmp_path."""

from __future__ import annotations

import argparse

import pytest

from tldist.cli.shards import add_parser, parse_size
from tldist.data.verify import verify_shards
from tldist.errors import ConfigError, DataError

from helpers import REPO, noise_jpeg as jpeg, run_shards_cli as run, write_jpeg_set as write_set


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

    readme = REPO / "README.md"
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
