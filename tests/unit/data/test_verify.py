"""The shard checker (tldist.data.verify, ``tldist shards verify``) on real shards in tmp_path."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from tldist.data.verify import verify_shards
from tldist.data.sources import Sample
from tldist.data.writer import write_shards
from tldist.errors import ConfigError, DataError

from helpers import noise_jpeg as jpeg, run_shards_cli as run, serve_http, write_jpeg_set as write_set


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


def test_verify_over_http(tmp_path):
    """verify reads shards over http:// as training does (curl through open_shard): a shard the server lacks is
    named with curl's reason, one cut short with the samples it held; the intact one counts in full."""
    m = write_set(tmp_path / "s")
    names = [s.name for s in m.shards]
    (tmp_path / "s" / names[0]).unlink()  # 404
    cut = tmp_path / "s" / names[1]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    with serve_http(tmp_path / "s") as url:
        report = verify_shards(tmp_path / "s", urls=f"{url}/train-{{000000..000002}}.tar")
    msgs = {p.shard: [] for p in report.problems}
    for p in report.problems:
        msgs[p.shard].append(p.message)
    assert report.found == {names[0]: 0, names[1]: report.found[names[1]], names[2]: 3}
    assert 0 < report.found[names[1]] < 3
    assert msgs[names[0]] == ["unreadable after 0 samples (OSError: curl exited with status 22: the server answered "
                              "with an HTTP error such as 404 or 403)", "manifest says 3 samples, shard holds 0"]
    assert len(msgs[names[1]]) == 2 and msgs[names[1]][0].startswith(f"unreadable after {report.found[names[1]]} ")
    assert names[2] not in msgs


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
