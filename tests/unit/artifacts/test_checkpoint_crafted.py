"""Nothing a crafted checkpoint directory holds runs code (issue 24 item 3, the crafted-member tests extended
to the sharded format): DCP's ``.metadata`` index, its ``__<rank>_0.distcp`` data files (tensor and non-tensor
items, written by ``torch.save`` or as raw pickle bytes), ``rank<r>.pt`` and ``state.pt``. The crafted
checkpoint is made to look complete (its ``complete.json`` rewritten, as an attacker would), and each reader is
tried: resume (``CheckpointManager.load``), and what export, eval and ``model.checkpoint=`` read
(:func:`tldist.artifacts.resolve.resolve` and ``read_weights``). Each refuses in one line naming the file, and
the payload, which would create a marker file, never runs."""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import pickle

import pytest
import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from helpers import checkpoint_weights
from tldist.artifacts import dcp as safe_dcp
from tldist.artifacts.resolve import resolve
from tldist.errors import UserError

from . import ranks


class _Payload:
    """Unpickling this runs ``Path(marker).touch()``: a stand-in for any command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _payload_bytes(marker, fmt: str) -> bytes:
    if fmt == "torch.save":
        buf = io.BytesIO()
        torch.save({"weight": _Payload(marker)}, buf)
        return buf.getvalue()
    protocol = {"pickle": pickle.DEFAULT_PROTOCOL, "pickle2": 2}[fmt]
    return pickle.dumps(_Payload(marker), protocol=protocol)


def _look_complete(path):
    """Rewrite the marker with the crafted members' sizes: the directory passes every completeness check."""
    members = {p.name: p.stat().st_size for p in path.iterdir() if p.name != "complete.json"}
    (path / "complete.json").write_text(json.dumps({"members": members}))


@pytest.fixture()
def ckpt(tmp_path):
    model, _, opt, ema = ranks.build("plain", seed=0)
    ranks.train(model, opt, ema, 1)
    path = ranks.manager(tmp_path / "ckpt", model, opt, ema).save(1, trainer={"world_size": 1})
    return path, tmp_path / "PWNED"


def _fresh(path):
    model, _, opt, ema = ranks.build("plain", seed=1)
    return model, ranks.manager(path.parent, model, opt, ema)


def _refused(fn, path, member, marker) -> str:
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert not marker.exists(), "unpickling ran the payload"
    assert "\n" not in msg and "\x1b[" not in msg and "Traceback" not in msg, msg
    assert str(path / member) in msg, msg
    return msg


# ---- .metadata: DCP's index, a pickle ----------------------------------------------------------------------

def _metadata_payload(path, marker):
    """A pickle of the payload alone."""
    (path / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))


def _metadata_nested(path, marker):
    """The real index with the payload inside it (where a StorageMeta belongs)."""
    md = safe_dcp.read_index(path)
    md.storage_meta = _Payload(marker)
    (path / ".metadata").write_bytes(pickle.dumps(md))


def _metadata_outside(path, marker):
    """Plain data only, but its data file lies outside the checkpoint directory."""
    md = safe_dcp.read_index(path)
    for index, info in md.storage_data.items():
        md.storage_data[index] = dataclasses.replace(info, relative_path="../../" + info.relative_path)
    (path / ".metadata").write_bytes(pickle.dumps(md))


@pytest.mark.parametrize("craft", [_metadata_payload, _metadata_nested, _metadata_outside])
def test_crafted_metadata_is_refused_without_running(ckpt, craft):
    path, marker = ckpt
    craft(path, marker)
    _look_complete(path)
    model, mgr = _fresh(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _refused(lambda: mgr.load(path), path, ".metadata", marker)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # nothing was restored
    _refused(lambda: checkpoint_weights(path), path, ".metadata", marker)  # export, eval, model.checkpoint=
    _refused(lambda: resolve(path, weights="ema"), path, ".metadata", marker)


# ---- __0_0.distcp: DCP's data file, items read by torch.load -------------------------------------------------

def _craft_distcp(path, marker, items: str, fmt: str):
    """Replace the ``items`` ("tensor" or "bytes") of the data file by payloads, the index pointing at them."""
    md = safe_dcp.read_index(path)
    data = (path / "__0_0.distcp").read_bytes()
    out = bytearray()
    crafted = 0
    for index, info in md.storage_data.items():
        chunk = data[info.offset: info.offset + info.length]
        if isinstance(md.state_dict_metadata[index.fqn], BytesStorageMetadata) == (items == "bytes"):
            chunk = _payload_bytes(marker, fmt)
            crafted += 1
        md.storage_data[index] = dataclasses.replace(info, offset=len(out), length=len(chunk))
        out += chunk
    assert crafted
    (path / "__0_0.distcp").write_bytes(bytes(out))
    (path / ".metadata").write_bytes(pickle.dumps(md))
    _look_complete(path)


@pytest.mark.parametrize("fmt", ["torch.save", "pickle", "pickle2"])
@pytest.mark.parametrize("items", ["tensor", "bytes"])
def test_crafted_distcp_is_refused_without_running(ckpt, items, fmt):
    path, marker = ckpt
    _craft_distcp(path, marker, items, fmt)
    safe_dcp.read_index(path)  # the index itself is plain data
    _, mgr = _fresh(path)
    msg = _refused(lambda: mgr.load(path), path, "__0_0.distcp", marker)
    if fmt != "pickle":  # the safe unpickler got as far as the global: the message names it
        assert "touch" in msg or "getattr" in msg, msg
    if items == "tensor":  # the weights: what export, eval and model.checkpoint= read
        _refused(lambda: checkpoint_weights(path), path, "__0_0.distcp", marker)
        _refused(lambda: checkpoint_weights(path, "ema"), path, "__0_0.distcp", marker)


# ---- rank<r>.pt and state.pt: torch.save files read weights_only -----------------------------------------

@pytest.mark.parametrize("fmt", ["torch.save", "pickle", "pickle2", "inside"])
@pytest.mark.parametrize("member", ["rank0.pt", "state.pt"])
def test_crafted_small_members_are_refused_without_running(ckpt, member, fmt):
    path, marker = ckpt
    if fmt == "inside":  # the real file with the payload next to the states
        sd = torch.load(path / member, weights_only=True)
        sd["extra"] = _Payload(marker)
        torch.save(sd, path / member)
    else:
        (path / member).write_bytes(_payload_bytes(marker, fmt))
    _look_complete(path)
    model, mgr = _fresh(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _refused(lambda: mgr.load(path), path, member, marker)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # read before anything loads


def test_crafted_rank_file_of_another_rank_is_refused_on_a_world_size_change(ckpt):
    """On another world size every saved rank's file is read (load_resharded): rank1.pt of a 2-rank save
    loaded by one process goes through the same safe loader."""
    path, marker = ckpt
    (path / "rank1.pt").write_bytes(_payload_bytes(marker, "torch.save"))
    trainer = json.loads((path / "trainer.json").read_text())
    (path / "trainer.json").write_text(json.dumps({**trainer, "world_size": 2}))
    _look_complete(path)
    _, mgr = _fresh(path)
    _refused(lambda: mgr.load(path), path, "rank1.pt", marker)
