"""``checkpoint.remote`` (tldist.artifacts.remote): every checkpoint is mirrored to an fsspec URL once it is in
place, the completion marker last; remote checkpoints are pruned with the local ones; ``resume=auto`` takes the
newest complete checkpoint of the two (downloading a remote one) and never a remote one without its marker.
Here the remote is a ``file://`` URL of a second directory, and a bucket of a real local S3-protocol server
(moto_server) through boto3."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import S3_ENV, checkpoint_weights, files_of, moto_s3
from tldist.artifacts.checkpoint import list_checkpoints, resolve_resume
from tldist.artifacts.remote import RemoteStore
from tldist.errors import ConfigError, UserError

from . import ranks

MARKER = "complete.json"


@pytest.fixture()
def run(tmp_path):
    """A model, optimizer and EMA after one step, a local checkpoints dir and a remote one."""
    model, _, opt, ema = ranks.build("plain", seed=0)
    ranks.train(model, opt, ema, 1)
    return model, opt, ema, tmp_path / "local", RemoteStore(f"file://{tmp_path / 'remote'}"), tmp_path / "remote"


def test_a_checkpoint_is_uploaded_once_in_place_with_the_marker_last(run, monkeypatch):
    model, opt, ema, local, store, remote = run
    order = []
    real_put = store.fs.put_file

    def put(src, dst, *a, **k):
        order.append(dst.rsplit("/", 1)[-1])
        assert not dst.rsplit("/", 2)[-2].startswith(".tmp"), dst  # only a checkpoint in place is uploaded
        return real_put(src, dst, *a, **k)

    monkeypatch.setattr(store.fs, "put_file", put)
    path = ranks.manager(local, model, opt, ema, remote=store).save(1, trainer={"world_size": 1})
    assert files_of(remote / path.name) == files_of(path)  # every member, byte for byte
    assert order[-1] == MARKER and order.count(MARKER) == 1
    assert order[:2] == ["__0_0.distcp", "rank0.pt"]  # this rank's own part first, then the shared files
    assert store.complete() == [(1, path.name)]


def test_remote_checkpoints_are_pruned_with_the_local_ones(run):
    model, opt, ema, local, store, remote = run
    mgr = ranks.manager(local, model, opt, ema, remote=store, keep_last=2)
    mgr.save(1, trainer={}, metric=90.0)  # the best: kept on both sides
    for step in (2, 3, 4):
        mgr.save(step, trainer={})
    kept = ["step_00000001", "step_00000003", "step_00000004"]
    assert [p.name for _, p in list_checkpoints(local)] == kept
    assert sorted(p.name for p in remote.iterdir()) == kept


def test_an_interrupted_upload_is_ignored_by_resume_auto(run, tmp_path, monkeypatch):
    """The upload of step 2 stopped before its marker: on a node whose local disk holds nothing, resume=auto
    downloads step 1, the newest remote checkpoint with its marker."""
    model, opt, ema, local, store, remote = run
    mgr = ranks.manager(local, model, opt, ema, remote=store, keep_last=5)
    mgr.save(1, trainer={"world_size": 1})
    ranks.train(model, opt, ema, 1, first=2)
    real_put = store.fs.put_file

    def killed(src, dst, *a, **k):
        if dst.endswith(MARKER):
            raise KeyboardInterrupt  # the job is killed just before the marker goes up
        return real_put(src, dst, *a, **k)

    monkeypatch.setattr(store.fs, "put_file", killed)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(2, trainer={"world_size": 1})
    monkeypatch.setattr(store.fs, "put_file", real_put)
    assert (remote / "step_00000002" / ".metadata").is_file() and not (remote / "step_00000002" / MARKER).exists()
    assert store.complete() == [(1, "step_00000001")]
    fresh = tmp_path / "other_node"
    got = resolve_resume(fresh, "auto", remote=store)
    assert got == fresh / "step_00000001" and files_of(got) == files_of(remote / "step_00000001")


def test_resume_auto_downloads_a_newer_remote_checkpoint(run, tmp_path):
    model, opt, ema, local, store, remote = run
    mgr = ranks.manager(local, model, opt, ema, remote=store, keep_last=5)
    mgr.save(1, trainer={"world_size": 1})
    ranks.train(model, opt, ema, 1, first=2)
    ref = ranks.full_state(model, opt, ema)
    mgr.save(2, trainer={"world_size": 1})
    # a node whose disk holds nothing, and one whose disk holds only the older checkpoint
    fresh, stale = tmp_path / "fresh", tmp_path / "stale"
    stale.mkdir()
    (local / "step_00000001").rename(stale / "step_00000001")
    for root in (fresh, stale):
        got = resolve_resume(root, "auto", remote=store)
        assert got == root / "step_00000002" and not list(root.glob(".tmp-*"))
        m, _, o, e = ranks.build("plain", seed=1)
        assert ranks.manager(root, m, o, e).load(got)["step"] == 2
        assert ranks.differences(ref, ranks.full_state(m, o, e)) == []
    # a local checkpoint as new as the remote one is used as it is (nothing downloaded)
    assert resolve_resume(local, "auto", remote=store) == local / "step_00000002"
    assert not (local / "step_00000001").exists()


def test_a_remote_checkpoint_whose_member_was_cut_is_refused_in_one_line(run, tmp_path):
    model, opt, ema, local, store, remote = run
    path = ranks.manager(local, model, opt, ema, remote=store).save(1, trainer={})
    data = (remote / path.name / "__0_0.distcp").read_bytes()
    (remote / path.name / "__0_0.distcp").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="__0_0.distcp") as e:
        resolve_resume(tmp_path / "fresh", "auto", remote=store)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "fresh" / path.name).exists()  # nothing half-downloaded looks like a checkpoint
    assert json.loads((remote / path.name / MARKER).read_text())["members"]["__0_0.distcp"] == len(data)


def test_s3_remote_on_a_local_s3_server_mirrors_prunes_and_resumes(run, tmp_path, monkeypatch):
    """checkpoint.remote=s3://... against moto_server: uploaded with the marker last, pruned with the local
    checkpoints, and an empty disk resumes from the bucket with the same weights."""
    model, opt, ema, local, _, _ = run
    with moto_s3("ckpts") as (endpoint, client):
        for k, v in {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(k, v)
        import tldist.s3

        monkeypatch.setattr(tldist.s3, "_client", None)  # a fresh client for this endpoint
        store = RemoteStore("s3://ckpts/run1/checkpoints")
        mgr = ranks.manager(local, model, opt, ema, remote=store, keep_last=1)
        first = mgr.save(1, trainer={})
        assert store.complete() == [(1, first.name)]
        keys = {o["Key"] for o in client.list_objects_v2(Bucket="ckpts")["Contents"]}
        assert keys == {f"run1/checkpoints/{first.name}/{n}" for n in files_of(first)}
        second = mgr.save(2, trainer={})
        assert store.complete() == [(2, second.name)]  # step 1 pruned there as here
        assert not any(first.name in o["Key"] for o in client.list_objects_v2(Bucket="ckpts")["Contents"])
        got = resolve_resume(tmp_path / "fresh", "auto", remote=store)
        assert got == tmp_path / "fresh" / second.name
        for w in ("raw", "ema"):
            a, b = checkpoint_weights(second, w), checkpoint_weights(got, w)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="checkpoint.remote") as e:
        RemoteStore("gcs://bucket/run")  # no gcsfs here: one line naming the key
    assert "\n" not in str(e.value)


def test_remote_weights_equal_local_ones(run):
    """What a node reads from a downloaded checkpoint is what was saved: the same full weights and EMA."""
    model, opt, ema, local, store, remote = run
    path = ranks.manager(local, model, opt, ema, remote=store).save(1, trainer={})
    for w in ("raw", "ema"):
        a, b = checkpoint_weights(path, w), checkpoint_weights(remote / path.name, w)
        assert a.keys() == b.keys() and all(torch.equal(a[k], v) for k, v in b.items())
