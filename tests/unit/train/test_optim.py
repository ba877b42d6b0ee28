"""tldist.train.optim: the LR schedule, and LAMB / LARS over tldist's param groups."""

import pytest
import torch

from helpers import large_batch_optimizer as _optimizer
from tldist.config import ModelConfig
from tldist.models import build_model, no_weight_decay_names
from tldist.train.optim import build_scheduler, lr_factor


def test_warmup_then_cosine_to_floor():
    kw = dict(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert lr_factor(0, **kw) == 0.1
    assert lr_factor(9, **kw) == 1.0
    assert abs(lr_factor(60, **kw) - 0.55) < 1e-9  # halfway through the cosine
    assert abs(lr_factor(110, **kw) - 0.1) < 1e-9
    values = [lr_factor(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_scheduler_keeps_group_scales():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p1], "lr": 1.0}, {"params": [p2], "lr": 0.25}], lr=1.0)
    sched = build_scheduler(opt, warmup_steps=0, total_steps=4, min_ratio=0.0)
    for _ in range(2):
        opt.step()
        sched.step()
    lrs = [g["lr"] for g in opt.param_groups]
    assert abs(lrs[0] - 0.5) < 1e-9 and abs(lrs[1] - 0.125) < 1e-9


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
    from helpers import checkpoint_manager
    from tldist.train.optim import build_scheduler

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
    path = checkpoint_manager(tmp_path, model, opt, sched).save(3, trainer={})
    steps(model, opt, sched, [3, 4])
    model2, opt2, sched2 = make()
    checkpoint_manager(tmp_path, model2, opt2, sched2).load(path)
    steps(model2, opt2, sched2, [3, 4])
    for (n, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), n
