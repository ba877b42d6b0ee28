"""build_model: heads, ModelInfo, pretrained weights from the hub cache, rebuilding what was saved."""

import json
import time

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torchvision.models import ResNet18_Weights

from tldist.config import ModelConfig
from tldist.errors import ConfigError, UserError
from tldist.artifacts.resolve import build_configured_model
from tldist.models import build_model

from helpers import (
    AUX,
    SIZES,
    calibrate_bn as _calibrate_bn,
    eval_forward as _eval,
    fake_download as _fake_download,
    hub_file as _hub_file,
    model_cfg as _cfg,
)


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


def test_nested_block_classes_are_not_suggested():
    _, info = build_model(_cfg("maxvit_t"), 2)  # MBConv lives inside MaxVitBlock
    assert info.block_class_names == ["MaxVitBlock"]


# ---------------------------------------------------------------- rebuilding what was saved

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
    from helpers import checkpoint_manager, exported as load_exported
    from tldist.config import JobConfig, format_config
    from tldist.export import export_model
    from tldist.train.loop import TrainerState
    from tldist.train.optim import build_scheduler

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
    ckpt = checkpoint_manager(tmp_path / "run" / "checkpoints", model, opt, sched, keep_last=1,
                              config_yaml=format_config(cfg)).save(1, trainer=state.state_dict())
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    want = _eval(model, x)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))  # rebuilding needs no pretrained weights
    # what the checkpoint recorded wins over model.pretrained (false here, as a user might set it)
    rebuilt, rinfo = build_configured_model(ModelConfig(name=name, pretrained=False, checkpoint=str(ckpt)), 3, image_size=size)[:2]
    assert rebuilt.transform_input is True and rinfo.model_kwargs == {"transform_input": True}
    assert torch.equal(_eval(rebuilt, x), want)
    rebuilt.transform_input = False  # the check has teeth: without it the same weights compute something else
    assert not torch.allclose(_eval(rebuilt, x), want, rtol=1e-3, atol=1e-3)
    if name != "googlenet":
        return  # the other entry points and formats, once: they share the code above
    export = export_model(ckpt, tmp_path / "export")
    assert json.loads((export / "model.json").read_text())["model_kwargs"] == {"transform_input": True}
    assert torch.equal(_eval(load_exported(export)[0], x), want)

    # checkpoints and exports written before model_kwargs were recorded: the run's config.yaml tells
    trainer = json.loads((ckpt / "trainer.json").read_text())
    del trainer["model_kwargs"]
    (ckpt / "trainer.json").write_text(json.dumps(trainer))
    meta = json.loads((export / "model.json").read_text())
    del meta["model_kwargs"]
    (export / "model.json").write_text(json.dumps(meta))
    for old in (ckpt, export):
        assert torch.equal(_eval(build_configured_model(ModelConfig(name=name, pretrained=False, checkpoint=str(old)), 3,
                                             image_size=size)[:2][0], x), want)


def test_plain_state_dict_follows_model_pretrained(tmp_path):
    """A bare state dict records nothing: its architecture is the one model.pretrained names (the
    pretrained weights' for true, which the checkpoint replaces), as for any other setting."""
    torch.manual_seed(0)
    ref = torchvision.models.googlenet(num_classes=3, aux_logits=False, init_weights=True, transform_input=True)
    _calibrate_bn(ref, 64)
    torch.save(ref.state_dict(), tmp_path / "g.pt")
    x = torch.randn(2, 3, 64, 64)
    got, info = build_configured_model(_cfg("googlenet", pretrained=True, checkpoint=str(tmp_path / "g.pt")), 3)[:2]
    assert got.transform_input is True and info.model_kwargs == {"transform_input": True}
    assert torch.equal(_eval(got, x), _eval(ref, x))
    got, info = build_configured_model(_cfg("googlenet", pretrained=False, checkpoint=str(tmp_path / "g.pt")), 3)[:2]
    assert got.transform_input is False and info.model_kwargs == {"transform_input": False}


def _arch(model, head):
    """What decides a model's forward pass besides its tensors: module types and their plain settings
    (transform_input, eps, stride...), plus state-dict names and shapes; the head excluded."""
    from tldist.models.info import under as _under

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

    from tldist.artifacts.export import write_export

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
    rebuilt, _ = build_configured_model(_cfg("timm:fbnetc_100", checkpoint=str(export)), 3, require_head=True)[:2]
    x = torch.randn(2, 3, 64, 64)
    assert rebuilt.bn1.eps == 1e-3 and torch.equal(_eval(rebuilt, x), _eval(model, x))
