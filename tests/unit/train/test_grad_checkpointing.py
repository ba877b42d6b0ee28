"""train.grad_checkpointing (issue 27, item 7): timm's set_grad_checkpointing for timm models, torch.utils.checkpoint
on the blocks FSDP2 wraps for torchvision models; the step computes what it computed without it (loss, gradients,
BatchNorm statistics updated once), parameter names stay as they were, and it keeps fewer activations."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from tldist.config import TrainConfig
from tldist.errors import ConfigError
from tldist.train.parallelize import apply_activation_checkpointing, parallelize
from tldist.world import World


def tv_resnet() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5)


def tv_mobilenet() -> nn.Module:
    """Its blocks end in a BatchNorm: a recomputation that stops early (non-reentrant checkpointing stops as soon as
    the saved tensors are back) stops inside that BatchNorm."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.mobilenet_v3_small(num_classes=5)


def timm_resnet() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet10t", pretrained=False, num_classes=5)


def timm_vit() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, drop_path_rate=0.0)


def step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("build,blocks", [(tv_resnet, ["BasicBlock"]), (tv_mobilenet, ["InvertedResidual"]),
                                          (timm_resnet, []), (timm_vit, [])])
def test_checkpointed_step_equals_the_plain_one(build, blocks):
    plain = build()
    ckpt = copy.deepcopy(plain)
    names = [n for n, _ in ckpt.named_parameters()]
    how = apply_activation_checkpointing(ckpt, blocks)
    assert ("timm" in how) == (not blocks)
    assert [n for n, _ in ckpt.named_parameters()] == names  # no wrapper in the names: checkpoints load as before
    for seed in (1, 2, 3):  # several steps: a recomputation stopped early must not leave a BatchNorm held
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        plain.zero_grad(set_to_none=True)
        ckpt.zero_grad(set_to_none=True)
        torch.manual_seed(seed)  # the same dropout masks in both
        loss0, grads0 = step(plain, x)
        torch.manual_seed(seed)
        loss1, grads1 = step(ckpt, x)
        assert torch.allclose(loss0, loss1, atol=1e-6)
        for k in grads0:
            assert torch.allclose(grads0[k], grads1[k], rtol=1e-4, atol=1e-6), k
        buffers0, buffers1 = dict(plain.named_buffers()), dict(ckpt.named_buffers())
        for k in buffers0:  # BatchNorm statistics moved once per step, as without checkpointing
            assert torch.allclose(buffers0[k], buffers1[k], rtol=1e-5, atol=1e-7), (seed, k)


def test_torchvision_blocks_keep_fewer_activations():
    """Saved tensors of the autograd graph after the forward (what the backward holds on to): fewer with
    checkpointing. Counted with saved_tensors_hooks, no timing or memory readings."""
    x = torch.randn(2, 3, 64, 64)

    def saved_bytes(model: nn.Module) -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum()
        return total

    plain = tv_resnet().train()
    ckpt = copy.deepcopy(plain)
    apply_activation_checkpointing(ckpt, ["BasicBlock"])
    assert saved_bytes(ckpt) < 0.5 * saved_bytes(plain)


def test_a_model_without_blocks_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="train.grad_checkpointing"):
        apply_activation_checkpointing(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), [])


def test_parallelize_applies_it_from_the_config_and_eval_is_unchanged():
    world = World()
    model = tv_resnet()
    par = parallelize(copy.deepcopy(model), TrainConfig(grad_checkpointing=True), device=torch.device("cpu"),
                      world=world, fsdp=False, fsdp_blocks=["BasicBlock"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(par.model.eval()(x), model.eval()(x))
    assert type(par.module.layer1[0]).__name__ == "BasicBlock"  # the class FSDP2 matches is kept
