"""Weights given as ``model.checkpoint`` (tldist.models.checkpoint_io): state dicts, wrapped and prefixed
ones, safetensors files and export dirs, heads that do not fit, other trainers' checkpoints."""

import argparse
import json
import pathlib

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from tldist.errors import UserError
from tldist.artifacts.resolve import build_configured_model
from tldist.models import build_model
from tldist.safeload import UnsafeFileError

from helpers import calibrate_bn as _calibrate_bn, eval_forward as _eval, model_cfg as _cfg

# ---------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def trained():
    """A mobilenet_v3_small with a 4-class head, as if fine-tuned: (state dict, a backbone tensor name)."""
    torch.manual_seed(1)
    model, _ = build_model(_cfg("mobilenet_v3_small"), 4)
    return {k: v.clone() for k, v in model.state_dict().items()}, "features.3.block.0.0.weight"


def _load(path, num_classes=4, name="mobilenet_v3_small"):
    model, _ = build_configured_model(_cfg(name, checkpoint=str(path)), num_classes)[:2]
    return model.state_dict()


def test_checkpoint_state_dict_pt_keeps_matching_head(tmp_path, trained):
    sd, key = trained
    torch.save(sd, tmp_path / "ck.pt")
    got = _load(tmp_path / "ck.pt")
    assert all(torch.equal(got[k], v) for k, v in sd.items())


def test_require_head_refuses_missing_or_mismatched_heads(tmp_path, trained):
    """Scoring/exporting (require_head) a checkpoint must not silently get a fresh head."""
    sd, key = trained
    torch.save({k: v for k, v in sd.items() if not k.startswith("classifier.3.")}, tmp_path / "backbone.pt")
    assert torch.equal(_load(tmp_path / "backbone.pt")[key], sd[key])  # fine for fine-tuning: a new head
    with pytest.raises(UserError, match="holds no classification head"):
        build_configured_model(_cfg("mobilenet_v3_small", checkpoint=str(tmp_path / "backbone.pt")), 4, require_head=True)[:2]
    torch.save(sd, tmp_path / "ck.pt")
    with pytest.raises(UserError, match=r"does not fit the 3 classes expected here \(classifier.3.weight \(4, 1024\)"):
        build_configured_model(_cfg("mobilenet_v3_small", checkpoint=str(tmp_path / "ck.pt")), 3, require_head=True)[:2]
    model, _ = build_configured_model(_cfg("mobilenet_v3_small", checkpoint=str(tmp_path / "ck.pt")), 4, require_head=True)[:2]
    assert torch.equal(model.state_dict()["classifier.3.weight"], sd["classifier.3.weight"])


def test_checkpoint_wrapped_and_prefixed(tmp_path, trained):
    sd, key = trained
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "a.pth")
    assert torch.equal(_load(tmp_path / "a.pth")[key], sd[key])
    torch.save({"state_dict": {f"_orig_mod.{k}": v for k, v in sd.items()}}, tmp_path / "b.pth")
    assert torch.equal(_load(tmp_path / "b.pth")[key], sd[key])


def test_checkpoint_safetensors_and_dir(tmp_path, trained):
    sd, key = trained
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    assert torch.equal(_load(tmp_path / "w.safetensors")[key], sd[key])
    export = tmp_path / "export"
    export.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(export / "model.safetensors"))
    (export / "model.json").write_text(json.dumps({"model": "mobilenet_v3_small", "num_classes": 4, "classes": list("abcd")}))
    assert torch.equal(_load(export)["classifier.3.weight"], sd["classifier.3.weight"])
    (export / "model.json").write_text(json.dumps({"model": "resnet18", "num_classes": 4}))
    with pytest.raises(UserError, match="model.name=resnet18"):
        _load(export)
    with pytest.raises(UserError, match="neither a tldist export"):
        _load(tmp_path)


def test_checkpoint_head_mismatch_is_dropped(tmp_path, trained):
    sd, key = trained
    torch.save(sd, tmp_path / "ck.pt")
    got = _load(tmp_path / "ck.pt", num_classes=7)
    assert torch.equal(got[key], sd[key])
    assert got["classifier.3.weight"].shape == (7, 1024)
    assert torch.equal(got["classifier.0.weight"], sd["classifier.0.weight"])  # not the head: kept


def test_checkpoint_errors(tmp_path, trained):
    sd, _ = trained
    torch.save(sd, tmp_path / "ck.pt")
    with pytest.raises(UserError, match=r"ck\.pt' does not fit model 'resnet18'.*missing keys"):
        _load(tmp_path / "ck.pt", name="resnet18")
    with pytest.raises(UserError, match="does not exist"):
        _load(tmp_path / "nope.pt")
    (tmp_path / "ck.txt").write_text("x")
    with pytest.raises(UserError, match="unknown file type"):
        _load(tmp_path / "ck.txt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(UserError, match="not a state dict"):
        _load(tmp_path / "list.pt")
    torch.save({"model": sd, "args": argparse.Namespace(lr=1)}, tmp_path / "trainer.pt")  # other trainers' args: fine
    assert torch.equal(_load(tmp_path / "trainer.pt")["classifier.3.weight"], sd["classifier.3.weight"])
    torch.save({"model": sd, "path": pathlib.PurePosixPath("/x")}, tmp_path / "pickled.pt")  # any other class: not
    with pytest.raises(UnsafeFileError, match=r"pickled\.pt'.*references pathlib\.PurePosixPath"):
        _load(tmp_path / "pickled.pt")
    bad = dict(sd)
    bad["features.0.0.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "shape.pt")
    with pytest.raises(UserError, match="shape mismatches"):
        _load(tmp_path / "shape.pt")


# ---------------------------------------------------------------- other trainers' checkpoints


def _torchvision_reference_args(**kw):
    """``args`` as torchvision's references/classification/train.py parses them (defaults, a subset)."""
    return argparse.Namespace(**{
        "data_path": "/datasets01/imagenet_full_size/061417/", "model": "resnet18", "device": "cuda",
        "batch_size": 32, "epochs": 90, "workers": 16, "opt": "sgd", "lr": 0.1, "momentum": 0.9,
        "weight_decay": 1e-4, "norm_weight_decay": None, "label_smoothing": 0.0, "mixup_alpha": 0.0,
        "cutmix_alpha": 0.0, "lr_scheduler": "steplr", "lr_warmup_epochs": 0, "lr_step_size": 30, "lr_gamma": 0.1,
        "output_dir": ".", "resume": "", "start_epoch": 0, "auto_augment": None, "random_erase": 0.0, "amp": False,
        "world_size": 1, "dist_url": "env://", "model_ema": True, "model_ema_decay": 0.99998,
        "interpolation": "bilinear", "val_resize_size": 256, "val_crop_size": 224, "train_crop_size": 224,
        "clip_grad_norm": None, "weights": None, "backend": "pil", "use_v2": False, "distributed": False,
        "rank": 0, "gpu": 0, **kw})


def _torchvision_reference_checkpoint(model, args):
    """What references/classification/train.py saves (model_<epoch>.pth / checkpoint.pth)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model.train()(torch.randn(2, 3, 64, 64)).logsumexp(1).mean().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.1)
    ema = torch.optim.swa_utils.AveragedModel(model)
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
            "epoch": 7, "args": args, "model_ema": ema.state_dict(),
            "scaler": torch.amp.GradScaler("cpu").state_dict()}


def test_torchvision_reference_checkpoint_loads(tmp_path):
    """Issue 12 fault 9: a .pth of torchvision's reference train.py (args: argparse.Namespace) loads
    pickle-free; its args.weights says whether the model had the pretrained architecture."""
    torch.manual_seed(0)
    model = torchvision.models.googlenet(aux_logits=False, init_weights=True, transform_input=True)  # --weights ...
    _calibrate_bn(model, 64)
    ck = _torchvision_reference_checkpoint(model, _torchvision_reference_args(
        model="googlenet", weights="GoogLeNet_Weights.IMAGENET1K_V1"))
    torch.save(ck, tmp_path / "model_7.pth")
    x = torch.randn(2, 3, 64, 64)
    got, info = build_configured_model(_cfg("googlenet", pretrained=False, checkpoint=str(tmp_path / "model_7.pth")), 1000)[:2]
    assert info.model_kwargs == {"transform_input": True}
    assert torch.equal(_eval(got, x), _eval(model, x))  # the "model" weights (not "model_ema")

    ck["args"] = _torchvision_reference_args(model="googlenet", weights=None)  # trained from scratch
    torch.save(ck, tmp_path / "scratch.pth")
    got, info = build_configured_model(_cfg("googlenet", pretrained=True, checkpoint=str(tmp_path / "scratch.pth")), 1000)[:2]
    assert got.transform_input is False and info.model_kwargs == {"transform_input": False}


def test_timm_train_checkpoint_loads_state_dict_not_ema(tmp_path, caplog):
    """timm's train.py checkpoint: 'state_dict' is loaded (as timm's validate.py without --use-ema), the
    EMA copy is named in the log; args.pretrained/bn_eps shape the architecture."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("fbnetc_100", num_classes=3, bn_eps=1e-3)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters())
    args = argparse.Namespace(model="fbnetc_100", pretrained=True, num_classes=3, bn_eps=None, gp=None,
                              model_kwargs={}, drop=0.0, drop_path=None, lr=None, epochs=300, amp=False,
                              model_ema=True, model_ema_decay=0.9998, device="cuda:0", world_size=1, rank=0,
                              distributed=False, input_size=None, mean=None, std=None)
    torch.save({"epoch": 11, "arch": "fbnetc_100", "state_dict": model.state_dict(), "optimizer": opt.state_dict(),
                "version": 2, "args": args, "state_dict_ema": ema, "metric": 71.25}, tmp_path / "last.pth.tar.pth")
    with caplog.at_level("INFO", logger="tldist.models.factory"):
        got, info = build_configured_model(_cfg("timm:fbnetc_100", pretrained=False,
                                     checkpoint=str(tmp_path / "last.pth.tar.pth")), 3, require_head=True)[:2]
    assert info.model_kwargs == {"bn_eps": 1e-3}  # pretrained=True in args: timm's pretrained architecture
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(_eval(got, x), _eval(model, x))
    assert "state_dict_ema" in caplog.text
