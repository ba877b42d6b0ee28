"""No file tldist reads is unpickled with arbitrary globals (issue 11 fault 5, issue 12 fault 9).

Each crafted file carries a real payload: unpickling it with ``weights_only=False`` creates a marker
file (checked once below, so the tests have teeth). tldist must refuse it in one clean line naming the
file and the global, and the marker must not exist afterwards.
"""

import argparse
import json
import os
import pathlib
import pickle

import pytest
import torch
import torchvision

from tldist.config import ModelConfig
from tldist.errors import UserError
from tldist.artifacts.resolve import build_configured_model
from tldist.models import build_model
from tldist.safeload import TRAINER_GLOBALS, UnsafeFileError, load_pickle_free


class Payload:
    """Unpickling it calls ``open(marker, "w")``: creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _one_clean_line(msg: str, *needles: str) -> None:
    assert "\n" not in msg and "\x1b" not in msg, repr(msg)
    for n in needles:
        assert n in msg, (n, msg)


def _state():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=3).state_dict()


def test_payload_is_real(tmp_path):
    """The crafted file does run code when unpickled the unsafe way (what these tests guard against)."""
    marker = tmp_path / "ran"
    torch.save({"w": torch.zeros(1), "x": Payload(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_load_pickle_free_refuses_a_payload(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"w": torch.zeros(1), "x": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeFileError) as err:
        load_pickle_free(tmp_path / "evil.pt", what="test file")
    _one_clean_line(str(err.value), "test file", str(tmp_path / "evil.pt"), "open", "nothing was executed")
    assert not marker.exists()


def test_load_pickle_free_plain_pickle_and_junk_are_one_line(tmp_path):
    marker = tmp_path / "ran"
    for protocol in (2, 4):  # a file written by pickle, not torch.save
        with open(tmp_path / f"p{protocol}.pt", "wb") as f:
            pickle.dump({"x": Payload(marker)}, f, protocol=protocol)
        with pytest.raises(UserError) as err:
            load_pickle_free(tmp_path / f"p{protocol}.pt", what="test file")
        _one_clean_line(str(err.value), f"p{protocol}.pt")
    assert not marker.exists()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "tiny.pt").write_bytes(b"junk")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"a": torch.zeros(100)}, tmp_path / "cut.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "cut.pt").read_bytes()[:300])
    for name in ("junk.pt", "tiny.pt", "empty.pt", "cut.pt", "missing.pt"):
        with pytest.raises(UserError) as err:
            load_pickle_free(tmp_path / name, what="test file")
        assert not isinstance(err.value, UnsafeFileError)
        _one_clean_line(str(err.value), name)


def test_allow_list_is_explicit(tmp_path):
    """argparse.Namespace (other trainers' args) loads only when allowed; its contents are still checked."""
    torch.save({"args": argparse.Namespace(lr=0.1, model="resnet18")}, tmp_path / "ns.pt")
    with pytest.raises(UnsafeFileError) as err:
        load_pickle_free(tmp_path / "ns.pt", what="test file")
    _one_clean_line(str(err.value), "argparse.Namespace", "ns.pt")
    assert load_pickle_free(tmp_path / "ns.pt", what="test file", allow=TRAINER_GLOBALS)["args"].lr == 0.1
    marker = tmp_path / "ran"
    torch.save({"args": argparse.Namespace(lr=0.1, hook=Payload(marker))}, tmp_path / "ns_evil.pt")
    with pytest.raises(UnsafeFileError):
        load_pickle_free(tmp_path / "ns_evil.pt", what="test file", allow=TRAINER_GLOBALS)
    assert not marker.exists()


def test_model_checkpoint_payload_is_refused(tmp_path):
    marker = tmp_path / "ran"
    sd = _state()
    torch.save({**sd, "extra": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeFileError) as err:
        build_configured_model(ModelConfig(name="resnet18", pretrained=False, checkpoint=str(tmp_path / "evil.pt")), 3)[:2]
    _one_clean_line(str(err.value), "model.checkpoint", str(tmp_path / "evil.pt"), "open")
    assert not marker.exists()


def test_model_checkpoint_refusal_is_one_clean_line(tmp_path):
    """Issue 12 fault 9: the refusal used to carry torch's ANSI escapes and a cut-off sentence."""
    torch.save({"model": _state(), "where": pathlib.PurePosixPath("/data")}, tmp_path / "odd.pth")
    with pytest.raises(UnsafeFileError) as err:
        build_configured_model(ModelConfig(name="resnet18", pretrained=False, checkpoint=str(tmp_path / "odd.pth")), 3)[:2]
    _one_clean_line(str(err.value), str(tmp_path / "odd.pth"), "pathlib.PurePosixPath")


@pytest.mark.parametrize("where", ["args", "inside_args", "optimizer"])
def test_foreign_trainer_checkpoint_with_payload_is_refused(tmp_path, where):
    """A torchvision-reference-style .pth whose args (allowed type) or other members hide a payload."""
    marker = tmp_path / "ran"
    model = torchvision.models.resnet18(num_classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    args = argparse.Namespace(model="resnet18", weights=None, lr=0.1, epochs=90)
    ck = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "args": args}
    if where == "args":
        ck["args"] = Payload(marker)
    elif where == "inside_args":
        args.resume = Payload(marker)
    else:
        ck["optimizer"]["param_groups"][0]["hook"] = Payload(marker)
    torch.save(ck, tmp_path / "model_3.pth")
    with pytest.raises(UnsafeFileError) as err:
        build_configured_model(ModelConfig(name="resnet18", pretrained=False, checkpoint=str(tmp_path / "model_3.pth")), 3)[:2]
    _one_clean_line(str(err.value), "model_3.pth", "open")
    assert not marker.exists()


def test_hub_cache_payload_is_refused(tmp_path, monkeypatch):
    """tldist tells offline users to copy weights into $TORCH_HOME/hub/checkpoints; torchvision's builder
    would torch.load that file with weights_only=False. tldist reads it pickle-free."""
    from torchvision.models import ResNet18_Weights

    marker = tmp_path / "ran"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints" / os.path.basename(ResNet18_Weights.DEFAULT.url)
    cache.parent.mkdir(parents=True)
    torch.save({**torchvision.models.resnet18().state_dict(), "x": Payload(marker)}, cache)
    with pytest.raises(UnsafeFileError) as err:
        build_model(ModelConfig(name="resnet18", pretrained=True), 3)
    _one_clean_line(str(err.value), str(cache), "open", "delete it")
    assert not marker.exists()


def test_int8_loader_reads_only_tldist_torchscript(tmp_path):
    """load_int8 is the one loader of user-given TorchScript: a pickle (or foreign TorchScript) named
    model_int8.pt is refused before torch.jit.load parses it; tldist's own output loads."""
    from tldist.artifacts.export import INT8_FILE
    from tldist.compress.measure import script_bytes
    from tldist.compress.quantize import load_int8, write_int8_dir

    marker = tmp_path / "ran"
    bad = tmp_path / "pickle_dir"
    bad.mkdir()
    torch.save({"x": Payload(marker)}, bad / INT8_FILE)
    with pytest.raises(UserError) as err:
        load_int8(bad)
    _one_clean_line(str(err.value), str(bad / INT8_FILE), "tldist compress quantize")
    assert not marker.exists()

    scripted = torch.jit.script(torch.nn.Linear(4, 2).eval())
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / INT8_FILE).write_bytes(script_bytes(scripted))  # TorchScript, but not written by tldist
    with pytest.raises(UserError, match="no TorchScript code with an embedded model.json"):
        load_int8(foreign)

    meta = {"model": "linear", "num_classes": 2, "format": "torchscript-int8", "file": INT8_FILE}
    out = write_int8_dir(tmp_path / "int8", script_bytes(scripted, {"model.json": json.dumps(meta)}), meta, {})
    module, got = load_int8(out)
    assert got == meta
    x = torch.randn(3, 4)
    assert torch.equal(module(x), scripted(x))
