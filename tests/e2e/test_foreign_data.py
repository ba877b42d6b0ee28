"""Training on the data users already have (issue 26), end to end through ``tldist`` subprocesses:

* shards written by webdataset itself (``wds.ShardWriter``: ``.jpg`` + ``.cls``; img2dataset's layout: class
  names under a ``.json`` key) train after ``tldist shards index``, tars unchanged, class names kept;
* Hub-style parquet (an image struct column) becomes shards byte-identically at 1 and 2 workers, and trains;
* a real S3-protocol server (``moto_server``) on localhost serves the shards to training through ``pipe:`` with
  a real S3 client and through ``s3://`` URLs, and a TCP proxy drops one connection mid-shard: the shard is
  re-opened and resumed, 0 samples skipped, the retry counted (also for ``http://`` through curl);
* the other direction: webdataset's ``WebDataset(...).decode("pil").to_tuple("jpg;png", "cls")`` and ``wids`` read
  tldist-written shards back, every sample with its label.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO, S3_ENV, TINY, env, make_shard_set, moto_s3, run, serve_http, tiny_image, tldist_cmd

NAMES = ["cat", "dog", "eel"]
RUN = [*TINY, "data.num_workers=1", "data.partitions=2", "train.max_steps=12", "checkpoint.every_steps=0"]


# ---- sets made by webdataset itself -----------------------------------------------------------------
def shardwriter_set(out: Path, n: int = 90, per_shard: int = 40) -> list[Path]:
    import webdataset as wds

    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with wds.ShardWriter(str(out / "wds-%06d.tar"), maxcount=per_shard, verbose=0) as w:
        for i in range(n):
            w.write({"__key__": f"w{i:05d}", "jpg": tiny_image(i % 3, rng, fmt="JPEG"), "cls": str(i % 3).encode()})
    return sorted(out.glob("*.tar"))


def img2dataset_set(out: Path, shards: int = 2, per_shard: int = 45) -> list[Path]:
    import webdataset as wds

    out.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for s in range(shards):
        with wds.TarWriter(str(out / f"{s:05d}.tar")) as w:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                w.write({"__key__": key, "jpg": tiny_image(i % 3, rng, fmt="JPEG"), "txt": b"a photo",
                         "json": json.dumps({"key": key, "label": NAMES[i % 3], "status": "success"}).encode()})
        (out / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
    return sorted(out.glob("*.tar"))


def hub_parquet(out: Path) -> list[Path]:
    pa = pytest.importorskip("pyarrow", reason="pyarrow (the 'parquet' extra, in 'dev') is not installed")
    import pyarrow.parquet as pq

    out.mkdir(parents=True)
    rng = np.random.default_rng(2)
    meta = {"info": {"features": {"image": {"_type": "Image"}, "label": {"names": NAMES, "_type": "ClassLabel"}}}}
    paths = []
    for f in range(2):
        rows = [{"image": {"bytes": tiny_image(i % 3, rng, fmt="JPEG"), "path": f"{i}.jpg"}, "label": i % 3}
                for i in range(40)]
        table = pa.Table.from_pylist(rows).replace_schema_metadata({b"huggingface": json.dumps(meta).encode()})
        paths.append(out / f"train-{f:05d}-of-00002.parquet")
        pq.write_table(table, paths[-1], row_group_size=16)
    return paths


def digests(paths) -> dict[str, str]:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def result_of(out: Path) -> tuple[dict, list[str]]:
    """``result.json`` of a finished run and the class names its last checkpoint recorded."""
    result = json.loads((out / "result.json").read_text())
    last = sorted((out / "checkpoints").glob("step_*"))[-1]
    return result, json.loads((last / "trainer.json").read_text())["classes"]


def test_foreign_sets_train_after_index_and_parquet(tmp_path):
    wds_tars = shardwriter_set(tmp_path / "wds")
    i2d_tars = img2dataset_set(tmp_path / "i2d")
    before = digests(wds_tars + i2d_tars)
    (tmp_path / "classes.txt").write_text("\n".join(NAMES) + "\n")
    run(tldist_cmd("shards", "index", str(tmp_path / "wds" / "wds-{000000..000002}.tar"), str(tmp_path / "idx_wds"),
                   "--classes", str(tmp_path / "classes.txt"), "--workers", "2"))
    out = run(tldist_cmd("shards", "index", str(tmp_path / "i2d"), str(tmp_path / "idx_i2d"), "--label", "json:label"))
    assert "train: " in out.stdout and "2 shards  90 samples  3 classes  labels: json:label (names)" in out.stdout
    files = [str(p) for p in hub_parquet(tmp_path / "pq")]
    for w in (1, 2):
        run(tldist_cmd("shards", "parquet", *files, str(tmp_path / f"pq{w}"), "--workers", str(w), "--min-shards", "3",
                       "--no-progress"))
    one, two = (digests(sorted((tmp_path / f"pq{w}" / "train").glob("*.tar"))) for w in (1, 2))
    assert len(one) == 3 and list(one.values()) == list(two.values())
    # one run on all three (classes matched by name), scored on the img2dataset set
    job = tmp_path / "run"
    run(tldist_cmd("train", "configs/test_tiny.yaml", f"data.train=[{tmp_path}/idx_wds,{tmp_path}/idx_i2d,"
                   f"{tmp_path}/pq1/train]", f"data.val={tmp_path}/idx_i2d", f"output_dir={job}", *RUN))
    result, classes = result_of(job)
    assert classes == NAMES and result["data_skipped"] == 0 and result["data_read"] >= 12 * 16
    assert result["best_top1"] >= 0  # the val set (labels from .json) was scored
    assert digests(wds_tars + i2d_tars) == before  # the indexed tars are untouched


# ---- object stores and retries ------------------------------------------------------------------------
class DropProxy:
    """A TCP proxy on loopback that cuts ``drops`` connections after ``after`` bytes of the server's answer
    (only answers longer than that: a shard, not a HEAD or an error)."""

    def __init__(self, upstream: tuple[str, int], after: int, drops: int = 1):
        self.upstream, self.after, self.left = upstream, after, drops
        self.dropped, self.connections = 0, 0
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        server = socket.create_connection(self.upstream)
        threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
        sent = 0
        try:
            while True:
                data = server.recv(65536)
                if not data:
                    break
                if sent + len(data) > self.after:
                    with self.lock:
                        cut = self.left > 0
                        self.left -= cut
                        self.dropped += cut
                    if cut:  # send up to the limit, then end the connection mid-answer
                        client.sendall(data[:self.after - sent])
                        break
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:  # shutdown() also wakes the pump blocked in recv() on these sockets
            for sock in (client, server):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """The local S3-protocol server (``helpers.moto_s3``) with a bucket ``shards``."""
    with moto_s3("shards") as server:
        yield server


def test_training_from_s3_survives_a_dropped_connection(tiny_shards, s3_server, tmp_path):
    endpoint, client = s3_server
    manifest = json.loads((tiny_shards / "train" / "manifest.json").read_text())
    for s in manifest["shards"]:
        client.upload_file(str(tiny_shards / "train" / s["name"]), "shards", f"train/{s['name']}")
    host, port = endpoint.rsplit(":", 1)
    shard_size = (tiny_shards / "train" / manifest["shards"][0]["name"]).stat().st_size
    pattern = "train-{000000..000004}.tar"
    for how, urls in (("pipe", f"pipe:{sys.executable} -m tldist.s3 s3://shards/train/{pattern}"),
                      ("native", f"s3://shards/train/{pattern}")):
        proxy = DropProxy(("127.0.0.1", int(port)), after=shard_size // 3)
        job = tmp_path / how
        proc = subprocess.run(
            tldist_cmd("train", "configs/test_tiny.yaml", f"data.train=[{tiny_shards}/train]", f"data.train_urls=['{urls}']",
                       f"output_dir={job}", *RUN, "data.max_skip_fraction=0"),
            capture_output=True, text=True, timeout=300, cwd=REPO,
            env={**env(), **S3_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"})
        proxy.close()
        assert proc.returncode == 0, proc.stderr[-3000:]
        result, classes = result_of(job)
        assert proxy.dropped == 1, how  # one shard was cut mid-transfer...
        log = proc.stdout + proc.stderr
        assert "broke off after" in log and "retry 1 of 3" in log, log[-3000:]
        assert result["data_skipped"] == 0 and result["step"] == 12  # ...and re-opened: nothing skipped
        assert classes == ["c0", "c1", "c2", "c3"]


def test_http_shard_cut_mid_read_is_resumed_and_counted(tiny_shards):
    """read_shard over http:// (curl) through the proxy: the cut shard is re-opened, resumed at the next
    unread member, every record intact and in order; with retries off the rest of it would be failed records."""
    from tldist.data.manifest import load_manifest
    from tldist.data.retry import RetryPolicy, retry_count
    from tldist.data.stream import read_shard

    m = load_manifest(tiny_shards / "train")
    local = [r.fields for r in read_shard(m.shard_urls()[1], 0, m.shards[1].num_samples)]
    size = Path(m.shard_urls()[1]).stat().st_size
    with serve_http(tiny_shards / "train") as url:
        host, port = url.rsplit(":", 1)
        for policy, dropped_ok in ((RetryPolicy(retries=2, backoff_s=0.05), True), (RetryPolicy(retries=0), False)):
            proxy = DropProxy(("127.0.0.1", int(port)), after=size // 2)
            before = retry_count()
            recs = list(read_shard(f"http://127.0.0.1:{proxy.port}/{m.shards[1].name}", 5, 50, policy=policy))
            proxy.close()
            assert proxy.dropped == 1 and len(recs) == 50
            if dropped_ok:
                assert retry_count() == before + 1 and all(r.ok for r in recs)
                assert [r.fields for r in recs] == local[5:55]
            else:
                failed = [r for r in recs if not r.ok]
                assert retry_count() == before and failed and "broke off after" in failed[0].error


def test_pipe_retry_resumes_at_the_next_unread_member(tiny_shards, tmp_path):
    """A pipe: command that dies mid-member the first time it runs: the sample being assembled keeps the
    members it had, the rest come from the re-opened stream."""
    from tldist.data.manifest import load_manifest
    from tldist.data.retry import RetryPolicy
    from tldist.data.stream import read_shard

    m = load_manifest(tiny_shards / "val")
    path = m.shard_urls()[0]
    cut = (Path(path).stat().st_size // 2) // 512 * 512 + 700  # inside a member
    marker = tmp_path / "died-once"
    cmd = (f"pipe:{sys.executable} -c \"import sys,os; d=open('{path}','rb').read(); m='{marker}'; "
           f"first=not os.path.exists(m); open(m,'w').close(); sys.stdout.buffer.write(d[:{cut}] if first else d); "
           f"sys.exit(3 if first else 0)\"")
    recs = list(read_shard(cmd, 0, m.shards[0].num_samples, policy=RetryPolicy(retries=1, backoff_s=0)))
    local = list(read_shard(path, 0, m.shards[0].num_samples))
    assert marker.exists() and all(r.ok for r in recs)
    assert [(r.key, r.fields) for r in recs] == [(r.key, r.fields) for r in local]


# ---- the other direction ----------------------------------------------------------------------------------
def test_webdataset_and_wids_read_tldist_shards(tmp_path):
    import webdataset as wds

    wids = pytest.importorskip("wids", reason="wids (webdataset's indexed reader, in 'dev') is not installed")
    png = make_shard_set(tmp_path / "png", split="train", n=70, shards=3)
    jpg = make_shard_set(tmp_path / "jpg", split="val", n=30, shards=2, fmt="JPEG", prefix="j")
    for m, n in ((png, 70), (jpg, 30)):
        urls = m.shard_urls()
        got = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg;png", "cls", "__key__"))
        assert len(got) == n
        assert all(img.size == (16, 16) for img, _, _ in got)
        assert [int(label) for _, label, _ in got] == [int(k[-5:]) % 4 for _, _, k in got]  # label i % 4 of key i
        ds = wids.ShardListDataset([{"url": u, "nsamples": s.num_samples} for u, s in zip(urls, m.shards)],
                                   transformations=[])
        assert len(ds) == n
        samples = [ds[i] for i in range(n)]
        assert [s["__key__"] for s in samples] == [k for _, _, k in got]
        assert [int(s[".cls"].read()) for s in samples] == [int(label) for _, label, _ in got]  # raw streams
