"""build_model: heads, ModelInfo, pretrained weights from the hub cache, checkpoints."""

import argparse
import json
import os
import pathlib
import time

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torchvision.models import ResNet18_Weights

from tldist.config import ModelConfig
from tldist.errors import ConfigError, UserError
from tldist.models import build_model
from tldist.safeload import UnsafeFileError


def _cfg(name="resnet18", **kw):
    return ModelConfig(name=name, pretrained=kw.pop("pretrained", False), **kw)


def _out(model, size=32, batch=2):
    model.eval()
    with torch.no_grad():
        return model(torch.randn(batch, 3, size, size))


def test_resnet18_head_and_info():
    model, info = build_model(_cfg(), 5)
    assert model.fc.out_features == 5 and torch.all(model.fc.bias == 0)
    assert info.head == ["fc"]
    assert info.stages == ["conv1", "layer1", "layer2", "layer3", "layer4"]
    assert info.block_class_names == ["BasicBlock"]
    assert (info.input_size, info.interpolation) == (224, "bilinear")
    assert info.mean == pytest.approx((0.485, 0.456, 0.406)) and info.std == pytest.approx((0.229, 0.224, 0.225))
    assert _out(model).shape == (2, 5)


def test_mobilenet_v3_small_head():
    model, info = build_model(_cfg("mobilenet_v3_small"), 3)
    assert info.head == ["classifier.3"] and model.classifier[3].out_features == 3
    assert info.stages == [f"features.{i}" for i in range(13)]
    assert "InvertedResidual" in info.block_class_names
    assert _out(model).shape == (2, 3)


def test_vit_b_16_at_small_image_size():
    model, info = build_model(_cfg("vit_b_16"), 4, image_size=32)
    assert info.head == ["heads.head"] and model.heads.head.out_features == 4
    assert info.stages[0] == "conv_proj" and info.stages[1] == "encoder.layers.encoder_layer_0"
    assert len(info.stages) == 13 and info.block_class_names == ["EncoderBlock"]
    assert info.input_size == 32
    assert _out(model, 32, 1).shape == (1, 4)
    with pytest.raises(ConfigError, match="image_size"):
        build_model(_cfg("vit_b_16"), 4, image_size=30)


def test_timm_models():
    pytest.importorskip("timm")
    model, info = build_model(_cfg("timm:vit_tiny_patch16_224"), 6, image_size=32)
    assert info.head == ["head"] and model.head.out_features == 6
    assert info.stages[0] == "patch_embed" and info.stages[-1] == "blocks.11"
    assert info.interpolation == "bicubic" and info.mean == (0.5, 0.5, 0.5) and info.input_size == 32
    assert _out(model).shape == (2, 6)
    model, info = build_model(_cfg("timm:resnet18"), 2)
    assert info.head == ["fc"] and model.fc.out_features == 2
    assert info.stages == ["conv1", "layer1", "layer2", "layer3", "layer4"]


def test_bad_names_are_config_errors():
    with pytest.raises(ConfigError, match="model.name.*resnet18"):
        build_model(_cfg("resnet19"), 2)
    with pytest.raises(ConfigError, match="model.weights.*IMAGENET1K_V1"):
        build_model(_cfg(weights="IMAGENET1K_V9"), 2)
    with pytest.raises(ConfigError, match="model.num_classes"):
        build_model(_cfg(), 0)


def _hub_file(weights) -> str:
    return os.path.basename(weights.url)


def test_pretrained_from_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ref = torchvision.models.resnet18()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(ref.state_dict(), cache / _hub_file(ResNet18_Weights.DEFAULT))
    model, info = build_model(_cfg(pretrained=True), 3)
    assert torch.equal(model.conv1.weight, ref.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, ref.layer4[1].bn2.running_var)
    assert model.fc.out_features == 3 and info.head == ["fc"]

    (cache / _hub_file(ResNet18_Weights.DEFAULT)).write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="delete it"):
        build_model(_cfg(pretrained=True), 3)


def test_pretrained_densenet_hub_file_with_old_key_names(tmp_path, monkeypatch):
    """torchvision's densenet files keep pre-1.0 key names ('norm.1'); its builder renames them, and so
    does tldist's pickle-free loader."""
    import re

    from torchvision.models import DenseNet121_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ref = torchvision.models.densenet121()
    old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
           for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}  # older than those too
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(old, tmp_path / "hub" / "checkpoints" / _hub_file(DenseNet121_Weights.DEFAULT))
    model, _ = build_model(_cfg("densenet121", pretrained=True), 3)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items() if not k.startswith("classifier."))


def test_pretrained_offline_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    fname = _hub_file(ResNet18_Weights.IMAGENET1K_V1)
    # An address nothing listens on: the download fails at once, as on an offline node.
    monkeypatch.setattr(ResNet18_Weights.IMAGENET1K_V1.value, "url", f"http://127.0.0.1:9/models/{fname}")
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        build_model(_cfg(pretrained=True), 3)
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert fname in msg and str(tmp_path / "hub" / "checkpoints" / fname) in msg
    assert "$TORCH_HOME/hub/checkpoints" in msg and "model.checkpoint=PATH" in msg and "model.pretrained=false" in msg
    assert not (tmp_path / "hub" / "checkpoints" / fname).exists()


# ---------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def trained():
    """A mobilenet_v3_small with a 4-class head, as if fine-tuned: (state dict, a backbone tensor name)."""
    torch.manual_seed(1)
    model, _ = build_model(_cfg("mobilenet_v3_small"), 4)
    return {k: v.clone() for k, v in model.state_dict().items()}, "features.3.block.0.0.weight"


def _load(path, num_classes=4, name="mobilenet_v3_small"):
    model, _ = build_model(_cfg(name, checkpoint=str(path)), num_classes)
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
        build_model(_cfg("mobilenet_v3_small", checkpoint=str(tmp_path / "backbone.pt")), 4, require_head=True)
    torch.save(sd, tmp_path / "ck.pt")
    with pytest.raises(UserError, match=r"does not fit the 3 classes expected here \(classifier.3.weight \(4, 1024\)"):
        build_model(_cfg("mobilenet_v3_small", checkpoint=str(tmp_path / "ck.pt")), 3, require_head=True)
    model, _ = build_model(_cfg("mobilenet_v3_small", checkpoint=str(tmp_path / "ck.pt")), 4, require_head=True)
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
    with pytest.raises(UserError, match="no model.safetensors"):
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


def test_nested_block_classes_are_not_suggested():
    _, info = build_model(_cfg("maxvit_t"), 2)  # MBConv lives inside MaxVitBlock
    assert info.block_class_names == ["MaxVitBlock"]


# ---------------------------------------------------------------- rebuilding what was saved

AUX = ("googlenet", "inception_v3")
SIZES = {"googlenet": 64, "inception_v3": 75}  # small inputs these architectures accept
# What torchvision's googlenet/inception_v3 builders construct when given weights (googlenet.py, inception.py).
TV_WITH_WEIGHTS = {"transform_input": True, "aux_logits": True, "init_weights": False}


def _fake_download(monkeypatch, tmp_path, name, seed=0):
    """A fresh TORCH_HOME whose hub cache holds random weights for ``name``'s DEFAULT weights, in the
    format and architecture of the real file: what a download would have put there."""
    from torchvision.models import get_model, get_model_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    weights = get_model_weights(name).DEFAULT
    torch.manual_seed(seed)
    ref = get_model(name, num_classes=len(weights.meta["categories"]), **(TV_WITH_WEIGHTS if name in AUX else {}))
    _calibrate_bn(ref, SIZES.get(name, 64))
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(ref.state_dict(), cache / _hub_file(weights))
    return weights


def _calibrate_bn(model, size):
    """Set BatchNorm running statistics from a few random batches, as training leaves them: with the
    init statistics (0, 1) a deep random net's output hardly depends on its input."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    aux = {n: getattr(model, n) for n in ("AuxLogits", "aux1", "aux2") if getattr(model, n, None) is not None}
    for n in aux:  # auxiliary heads (dropped after loading anyway) need larger inputs in training mode
        setattr(model, n, None)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, size, size))
    for m in bns:
        m.momentum = 0.1
    for n, m in aux.items():
        setattr(model, n, m)


def _eval(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("name", AUX)
def test_pretrained_googlenet_inception_are_torchvisions(name, tmp_path, monkeypatch):
    """tldist builds the architecture torchvision builds for the weights (transform_input=True) and
    records it; the features equal those of torchvision's own builder reading the same file."""
    weights = _fake_download(monkeypatch, tmp_path, name)
    ours, info = build_model(_cfg(name, pretrained=True), 3)
    theirs = torchvision.models.get_model(name, weights=weights)  # reads the test's own file
    assert ours.transform_input is True and info.model_kwargs == {"transform_input": True}
    assert ours.aux_logits is False and ours.fc.out_features == 3
    ours.fc = theirs.fc = torch.nn.Identity()
    x = torch.randn(2, 3, SIZES[name], SIZES[name])
    assert torch.equal(_eval(ours, x), _eval(theirs, x))


@pytest.mark.parametrize("name", AUX)
def test_pretrained_googlenet_inception_rebuilt_from_checkpoint_compute_the_same(name, tmp_path, monkeypatch):
    """Issue 12 fault 7: rebuilt from its own checkpoint, a pretrained googlenet had transform_input=False
    (features off by 1.2 relative). Every rebuild path now gives the saved model's outputs exactly."""
    from tldist.compress import load_export
    from tldist.config import JobConfig, format_config
    from tldist.export import export_model, load_exported
    from tldist.train.checkpoint import CheckpointManager
    from tldist.train.loop import TrainerState
    from tldist.train.schedule import build_scheduler

    size = SIZES[name]
    _fake_download(monkeypatch, tmp_path, name)
    cfg = JobConfig(model=ModelConfig(name=name, pretrained=True))
    cfg.data.image_size = size
    model, info = build_model(cfg.model, 3, image_size=size)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = build_scheduler(opt, warmup_steps=0, total_steps=2, min_ratio=0.0)
    model.train()(torch.randn(4, 3, size, size)).logsumexp(1).mean().backward()  # one fine-tuning step
    opt.step()
    sched.step()
    state = TrainerState(extra={"classes": ["a", "b", "c"], "image_size": size,  # as tldist/train/main.py fills it
                                "model_kwargs": info.model_kwargs})
    ckpt = CheckpointManager(tmp_path / "run" / "checkpoints", keep_last=1, is_main=True).save(
        1, model=model, optimizer=opt, scheduler=sched, trainer_state=state.state_dict(), loader_state={},
        config_yaml=format_config(cfg))
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    want = _eval(model, x)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))  # rebuilding needs no pretrained weights
    # what the checkpoint recorded wins over model.pretrained (false here, as a user might set it)
    rebuilt, rinfo = build_model(ModelConfig(name=name, pretrained=False, checkpoint=str(ckpt)), 3, image_size=size)
    assert rebuilt.transform_input is True and rinfo.model_kwargs == {"transform_input": True}
    assert torch.equal(_eval(rebuilt, x), want)
    rebuilt.transform_input = False  # the check has teeth: without it the same weights compute something else
    assert not torch.allclose(_eval(rebuilt, x), want, rtol=1e-3, atol=1e-3)
    if name != "googlenet":
        return  # the other entry points and formats, once: they share the code above
    export = export_model(ckpt, tmp_path / "export")
    assert json.loads((export / "model.json").read_text())["model_kwargs"] == {"transform_input": True}
    assert torch.equal(_eval(load_exported(export)[0], x), want)
    assert torch.equal(_eval(load_export(export)[0], x), want)

    # checkpoints and exports written before model_kwargs were recorded: the run's config.yaml tells
    trainer = json.loads((ckpt / "trainer.json").read_text())
    del trainer["model_kwargs"]
    (ckpt / "trainer.json").write_text(json.dumps(trainer))
    meta = json.loads((export / "model.json").read_text())
    del meta["model_kwargs"]
    (export / "model.json").write_text(json.dumps(meta))
    for old in (ckpt, export):
        assert torch.equal(_eval(build_model(ModelConfig(name=name, pretrained=False, checkpoint=str(old)), 3,
                                             image_size=size)[0], x), want)


@pytest.mark.slow
def test_training_records_model_kwargs_in_trainer_json(tiny_shards, tmp_path, monkeypatch):
    """The training entry point saves ModelInfo.model_kwargs with each checkpoint (trainer.json)."""
    from safetensors.torch import load_file
    from test_adapt import cli, run

    _fake_download(monkeypatch, tmp_path, "googlenet")  # TORCH_HOME reaches the training process
    out = tmp_path / "run"
    run(cli("train", "configs/test_tiny.yaml", f"data.train=[{tiny_shards}/train]", f"output_dir={out}",
            "model.name=googlenet", "model.pretrained=true", "data.image_size=64", "data.batch_size=4",
            "train.max_steps=1"))
    ckpt = out / "checkpoints" / "step_00000001"
    assert json.loads((ckpt / "trainer.json").read_text())["model_kwargs"] == {"transform_input": True}
    ref = torchvision.models.googlenet(num_classes=4, aux_logits=False, init_weights=True, transform_input=True)
    ref.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    rebuilt, _ = build_model(ModelConfig(name="googlenet", pretrained=False, checkpoint=str(ckpt)), 4, image_size=64)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(_eval(rebuilt, x), _eval(ref, x))


def test_plain_state_dict_follows_model_pretrained(tmp_path):
    """A bare state dict records nothing: its architecture is the one model.pretrained names (the
    pretrained weights' for true, which the checkpoint replaces), as for any other setting."""
    torch.manual_seed(0)
    ref = torchvision.models.googlenet(num_classes=3, aux_logits=False, init_weights=True, transform_input=True)
    _calibrate_bn(ref, 64)
    torch.save(ref.state_dict(), tmp_path / "g.pt")
    x = torch.randn(2, 3, 64, 64)
    got, info = build_model(_cfg("googlenet", pretrained=True, checkpoint=str(tmp_path / "g.pt")), 3)
    assert got.transform_input is True and info.model_kwargs == {"transform_input": True}
    assert torch.equal(_eval(got, x), _eval(ref, x))
    got, info = build_model(_cfg("googlenet", pretrained=False, checkpoint=str(tmp_path / "g.pt")), 3)
    assert got.transform_input is False and info.model_kwargs == {"transform_input": False}


def _arch(model, head):
    """What decides a model's forward pass besides its tensors: module types and their plain settings
    (transform_input, eps, stride...), plus state-dict names and shapes; the head excluded."""
    from tldist.models.factory import _under

    plain = (bool, int, float, str, type(None))
    mods = {}
    for n, m in model.named_modules():
        if not _under(n, head):
            settings = {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training" and (
                isinstance(v, plain) or isinstance(v, (tuple, list)) and all(isinstance(e, plain) for e in v))}
            settings.update({k: None for k, v in m._modules.items() if v is None})  # model.aux1 = None...
            mods[n] = (type(m).__name__, settings)
    return mods, {k: tuple(v.shape) for k, v in model.state_dict().items() if not _under(k, head)}


@pytest.mark.parametrize("name", torchvision.models.list_models(module=torchvision.models))
def test_recorded_kwargs_rebuild_torchvisions_pretrained_architecture(name, tmp_path, monkeypatch):
    """Every torchvision classification builder: the architecture torchvision builds with weights (its
    ``_ovewrite_named_param`` overrides) equals the one tldist rebuilds from the ``model_kwargs`` it
    records, after their JSON round trip. Parameters live on the meta device (no memory, no init)."""
    from accelerate import init_empty_weights
    from torchvision.models import get_model, get_model_weights

    from tldist.models import factory

    weights = get_model_weights(name).DEFAULT
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    with init_empty_weights():
        # the weights file as tldist's pretrained path builds it; torchvision's builder must accept it
        file_arch = factory._tv_weights_kwargs(name, weights)
        file_model = get_model(name, num_classes=len(weights.meta["categories"]), **file_arch)
        torch.save(file_model.state_dict(), tmp_path / "hub" / "checkpoints" / _hub_file(weights))
        theirs = get_model(name, weights=weights)
        if name == "inception_v3":  # torchvision keeps its (not pretrained) auxiliary head; tldist drops it
            theirs.aux_logits, theirs.AuxLogits = False, None
        recorded = json.loads(json.dumps(factory._tv_arch_kwargs(name, weights, pretrained=True)))
        rebuilt, info = factory._build_torchvision(_cfg(name), 1000, 0, recorded, "test")
    assert info.model_kwargs == recorded
    head = [factory._torchvision_head(theirs)]
    assert _arch(rebuilt, head) == _arch(theirs, head)


def test_timm_pretrained_kwargs_are_recorded_and_rebuilt(tmp_path, monkeypatch):
    """timm's fbnetc_100 entrypoint builds with bn_eps=1e-3 only when pretrained=True: the recorded
    kwargs carry it to the rebuilt model (eval outputs identical)."""
    timm = pytest.importorskip("timm")
    import huggingface_hub.constants as hf

    from tldist.export import write_export

    pcfg = timm.models.get_pretrained_cfg("fbnetc_100")
    snap = tmp_path / "hf" / f"models--{pcfg.hf_hub_id.replace('/', '--')}"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("0" * 40)
    (snap / "snapshots" / ("0" * 40)).mkdir(parents=True)
    torch.manual_seed(0)  # the pretrained file, as timm's hub holds it
    save_file({k: v.contiguous() for k, v in timm.create_model("fbnetc_100", bn_eps=1e-3).state_dict().items()},
              str(snap / "snapshots" / ("0" * 40) / "model.safetensors"))
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    model, info = build_model(_cfg("timm:fbnetc_100", pretrained=True), 3)
    assert info.model_kwargs == {"bn_eps": 1e-3} and model.bn1.eps == 1e-3
    meta = {"model": "timm:fbnetc_100", "num_classes": 3, "model_kwargs": info.model_kwargs}
    export = write_export(model, json.loads(json.dumps(meta)), tmp_path / "export")
    rebuilt, _ = build_model(_cfg("timm:fbnetc_100", checkpoint=str(export)), 3, require_head=True)
    x = torch.randn(2, 3, 64, 64)
    assert rebuilt.bn1.eps == 1e-3 and torch.equal(_eval(rebuilt, x), _eval(model, x))


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
    got, info = build_model(_cfg("googlenet", pretrained=False, checkpoint=str(tmp_path / "model_7.pth")), 1000)
    assert info.model_kwargs == {"transform_input": True}
    assert torch.equal(_eval(got, x), _eval(model, x))  # the "model" weights (not "model_ema")

    ck["args"] = _torchvision_reference_args(model="googlenet", weights=None)  # trained from scratch
    torch.save(ck, tmp_path / "scratch.pth")
    got, info = build_model(_cfg("googlenet", pretrained=True, checkpoint=str(tmp_path / "scratch.pth")), 1000)
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
        got, info = build_model(_cfg("timm:fbnetc_100", pretrained=False,
                                     checkpoint=str(tmp_path / "last.pth.tar.pth")), 3, require_head=True)
    assert info.model_kwargs == {"bn_eps": 1e-3}  # pretrained=True in args: timm's pretrained architecture
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(_eval(got, x), _eval(model, x))
    assert "state_dict_ema" in caplog.text


# ---------------------------------------------------------------- stochastic depth (model.drop_path_rate)


def _stochastic_depth_ps(model):
    from torchvision.ops import StochasticDepth

    return [m.p for m in model.modules() if isinstance(m, StochasticDepth)]


def test_drop_path_families_cover_torchvisions_stochastic_depth_models():
    """Every torchvision classifier whose model class takes ``stochastic_depth_prob`` is in one of the
    handled families, and the builders of the 'fixed' families really refuse a second value."""
    import inspect
    import sys

    from torchvision import models as tvm

    from tldist.models import drop_path

    with_sd = set()
    for name in tvm.list_models(module=tvm):
        module = sys.modules[tvm.get_model_builder(name).__module__]
        classes = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, torch.nn.Module)]
        if any("stochastic_depth_prob" in inspect.signature(c.__init__).parameters for c in classes):
            with_sd.add(name)
    families = drop_path.TV_KWARG_FAMILIES + drop_path.TV_FIXED_FAMILIES
    handled = {n for n in tvm.list_models(module=tvm) if n.startswith(families)}
    assert with_sd == handled and len(handled) > 15
    for name in ("swin_t", "maxvit_t"):  # the TypeError comes before anything is built
        with pytest.raises(TypeError, match="stochastic_depth_prob"):
            tvm.get_model(name, stochastic_depth_prob=0.3)


def test_drop_path_rate_reaches_torchvision_and_timm_models():
    from torchvision.models import SwinTransformer

    model, info = build_model(_cfg("convnext_tiny", drop_path_rate=0.3), 3)
    assert max(_stochastic_depth_ps(model)) == pytest.approx(0.3) and info.model_kwargs == {}
    # swin_t's builder fixes 0.2: rescaled, the probabilities are what SwinTransformer builds for 0.3
    model, _ = build_model(_cfg("swin_t", drop_path_rate=0.3), 3)
    ref = SwinTransformer(patch_size=[4, 4], embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                          window_size=[7, 7], stochastic_depth_prob=0.3)
    assert _stochastic_depth_ps(model) == pytest.approx(_stochastic_depth_ps(ref))
    default, _ = build_model(_cfg("efficientnet_b0"), 3)  # unset: torchvision's own default (0.2)
    assert max(_stochastic_depth_ps(default)) == pytest.approx(0.2 * 15 / 16)
    off, _ = build_model(_cfg("efficientnet_b0", drop_path_rate=0.0), 3)
    assert set(_stochastic_depth_ps(off)) == {0.0}
    pytest.importorskip("timm")
    model, info = build_model(_cfg("timm:resnet18", drop_path_rate=0.2), 3)
    probs = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert max(probs) == pytest.approx(0.2) and info.model_kwargs == {}


def test_drop_path_rate_does_not_change_the_eval_forward():
    """Drop path acts in training mode only, so it is not recorded in model_kwargs: a model rebuilt without
    it (eval, export) computes what the trained one computes."""
    torch.manual_seed(0)
    a, info = build_model(_cfg("efficientnet_b0", drop_path_rate=0.5), 3)
    torch.manual_seed(0)
    b, _ = build_model(_cfg("efficientnet_b0"), 3)
    assert info.model_kwargs == {}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))
        torch.manual_seed(1)
        train_a = a.train()(x)
        torch.manual_seed(1)
        assert not torch.equal(train_a, b.train()(x))  # in training mode the rates do differ


def test_drop_path_rate_on_models_without_stochastic_depth_is_refused():
    with pytest.raises(ConfigError, match=r"'model.drop_path_rate'.*vit_b_16 has no stochastic depth.*"
                                          r"timm:vit_base_patch16_224"):
        build_model(_cfg("vit_b_16", drop_path_rate=0.1), 3, image_size=32)
    with pytest.raises(ConfigError, match=r"'model.drop_path_rate'.*timm:resnet50"):
        build_model(_cfg("resnet50", drop_path_rate=0.1), 3)
    build_model(_cfg("resnet18", drop_path_rate=0.0), 3)  # 0 (or unset) is what it has
    pytest.importorskip("timm")
    with pytest.raises(ConfigError, match=r"'model.drop_path_rate'.*'timm:vgg11' does not take"):
        build_model(_cfg("timm:vgg11", drop_path_rate=0.1), 3)
