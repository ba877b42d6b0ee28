"""build_param_groups: weight-decay exclusions, layer-wise LR decay, head multiplier."""

import pytest
import torch
import torchvision

from tldist.config import ModelConfig, TransferConfig
from tldist.models import apply_transfer, build_model, build_param_groups, no_weight_decay_names


@pytest.fixture(scope="module")
def resnet():
    return build_model(ModelConfig(name="resnet18", pretrained=False), 5)


def _by_name(model, groups):
    ids = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in groups:
        for p in g["params"]:
            assert ids[id(p)] not in out, "a parameter is in two groups"
            out[ids[id(p)]] = (g["weight_decay"], g["lr_scale"])
    return out


def test_decay_sets_and_layer_scales(resnet):
    model, info = resnet
    groups = build_param_groups(model, info, weight_decay=0.05, layer_decay=0.5, head_lr_mult=10.0)
    got = _by_name(model, groups)
    assert set(got) == {n for n, _ in model.named_parameters()}
    assert got["conv1.weight"] == (0.05, 0.5**5)
    assert got["bn1.weight"] == (0.0, 0.5**5) and got["bn1.bias"] == (0.0, 0.5**5)
    assert got["layer1.0.conv1.weight"] == (0.05, 0.5**4)
    assert got["layer4.1.bn2.weight"] == (0.0, 0.5)
    assert got["fc.weight"] == (0.05, 10.0) and got["fc.bias"] == (0.0, 10.0)
    keys = [(g["weight_decay"], g["lr_scale"]) for g in groups]
    assert len(keys) == len(set(keys)) == 12  # 5 stages + head, decay and no-decay each
    assert {"name", "params", "weight_decay", "lr_scale"} <= set(groups[0])
    assert groups[-1]["name"].startswith("head")
    opt = torch.optim.SGD([dict(g, lr=0.1 * g["lr_scale"]) for g in groups], lr=0.1)
    assert len(opt.param_groups) == 12


def test_groups_merge_without_decay(resnet):
    model, info = resnet
    groups = build_param_groups(model, info, weight_decay=1e-4)
    assert sorted(g["name"] for g in groups) == ["stage0-4+head/decay", "stage0-4+head/no_decay"]
    assert all(g["lr_scale"] == 1.0 for g in groups)


def test_only_trainable_params():
    model, info = build_model(ModelConfig(name="resnet18", pretrained=False), 5)
    apply_transfer(model, TransferConfig(strategy="linear_probe"), info)
    groups = build_param_groups(model, info, weight_decay=0.05, layer_decay=0.7, head_lr_mult=3.0)
    assert set(_by_name(model, groups)) == {"fc.weight", "fc.bias"}
    assert all(g["lr_scale"] == 3.0 for g in groups)


def test_vit_tokens_and_norms_get_no_decay():
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
    skip = no_weight_decay_names(vit)
    assert {"class_token", "encoder.pos_embedding", "encoder.ln.weight", "encoder.layers.encoder_layer_0.ln_1.weight"} <= skip
    assert "conv_proj.weight" not in skip and "encoder.layers.encoder_layer_0.mlp.0.weight" not in skip
    assert "conv_proj.bias" in skip


# ---------------------------------------------------------------- LAMB / LARS over these groups


def _optimizer(name, model, info, weight_decay=0.05, **kw):
    from tldist.config import OptimConfig
    from tldist.train.main import build_optimizer

    groups = build_param_groups(model, info, weight_decay=weight_decay, layer_decay=0.5, head_lr_mult=10.0,
                                split_no_decay=name in ("lamb", "lars"))  # as tldist.train.main.build does
    return build_optimizer(OptimConfig(name=name, weight_decay=weight_decay, **kw), groups, lr=0.01)


def _ulps(w: torch.Tensor) -> float:
    """Tolerance of a measured step ``(w + d) - w``: it is rounded to w's float32 spacing, a few ulps
    of the largest |w| (cancellation)."""
    return 4 * torch.finfo(torch.float32).eps * float(w.abs().max())


def _one_step(opt, model, seed=0):
    """Random norm/bias values and gradients, one step; (weights before, grads, deltas). The deltas are
    (w + d) - w in float32, hence the comparisons' tolerance of a few ulps (:func:`_ulps`)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # norms' ones and biases' zeros would hide a trust ratio (|w| = |update| or 0)
        for p in model.parameters():
            if p.ndim <= 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    opt.step()
    return before, grads, {n: p.detach() - before[n] for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_large_batch_optimizers_keep_the_param_groups(resnet, name):
    import timm.optim

    model, info = resnet
    opt = _optimizer(name, model, info)
    assert isinstance(opt, timm.optim.Lamb if name == "lamb" else timm.optim.Lars)
    assert [(g["weight_decay"], g["lr"]) for g in opt.param_groups] == \
        [(g["weight_decay"], 0.01 * g["lr_scale"]) for g in opt.param_groups]
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.05}
    assert all(g["always_adapt"] is g["name"].endswith("/decay") for g in opt.param_groups)
    assert {g["always_adapt"] for g in opt.param_groups} == {True, False}


@pytest.mark.parametrize("wd", [0.05, 0.0])
def test_lars_adapts_the_weights_not_norms_and_biases(wd):
    """timm's LARS (momentum 0): norms and biases take the plain step -lr * g; the other weights take
    -lr * trust * (g + wd * w) with trust = trust_coeff * |w| / (|g| + wd * |w|) (You et al. 2017) — also
    at weight decay 0, MAE's linear-probe setting, where timm's default would skip the trust ratio."""
    model, info = build_model(ModelConfig(name="resnet18", pretrained=False), 5)
    opt = _optimizer("lars", model, info, weight_decay=wd, momentum=0.0)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    before, grads, delta = _one_step(opt, model)
    for n, p in model.named_parameters():
        lr, w, g = lr_of[id(p)], before[n], grads[n]
        if n in no_weight_decay_names(model):
            torch.testing.assert_close(delta[n], -lr * g)
        else:
            trust = 0.001 * w.norm() / (g.norm() + wd * w.norm())
            torch.testing.assert_close(delta[n], -lr * trust * (g + wd * w), rtol=1e-3, atol=_ulps(w))


def test_lamb_adapts_only_weight_decayed_groups():
    """timm's LAMB, first step: the Adam direction is g / (|g| + eps); no-decay groups take -lr times it,
    decayed ones rescale it (plus wd * w) by the trust ratio |w| / |update| (You et al. 2019)."""
    model, info = build_model(ModelConfig(name="resnet18", pretrained=False), 5)
    opt = _optimizer("lamb", model, info)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    before, grads, delta = _one_step(opt, model)
    for n, p in model.named_parameters():
        lr, w, g = lr_of[id(p)], before[n], grads[n]
        update = g / (g.abs() + 1e-6)
        if n in no_weight_decay_names(model):
            torch.testing.assert_close(delta[n], -lr * update)
        else:
            update = update + 0.05 * w
            trust = w.norm() / update.norm() if w.norm() > 0 else 1.0
            torch.testing.assert_close(delta[n], -lr * trust * update, rtol=1e-3, atol=_ulps(w))


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_large_batch_optimizer_state_round_trips_through_checkpoints(tmp_path, name):
    """Saved by CheckpointManager (optimizer.pt, read pickle-free) and loaded into a fresh model and optimizer,
    the next steps are bitwise those of the run that kept going (LAMB's per-group step included)."""
    from tldist.train.checkpoint import CheckpointManager
    from tldist.train.schedule import build_scheduler

    def make():
        torch.manual_seed(0)
        model, info = build_model(ModelConfig(name="mobilenet_v3_small", pretrained=False), 3)
        opt = _optimizer(name, model, info, momentum=0.9)
        return model, opt, build_scheduler(opt, warmup_steps=2, total_steps=10, min_ratio=0.0)

    def steps(model, opt, sched, seeds):
        for s in seeds:
            _one_step(opt, model, seed=s)
            sched.step()
            opt.zero_grad(set_to_none=True)

    model, opt, sched = make()
    steps(model, opt, sched, [0, 1, 2])
    ckpt = CheckpointManager(tmp_path, keep_last=2, is_main=True)
    path = ckpt.save(3, model=model, optimizer=opt, scheduler=sched, trainer_state={}, loader_state={},
                     config_yaml="")
    steps(model, opt, sched, [3, 4])
    model2, opt2, sched2 = make()
    ckpt.load(path, model=model2, optimizer=opt2, scheduler=sched2, rank=0)
    steps(model2, opt2, sched2, [3, 4])
    for (n, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), n
