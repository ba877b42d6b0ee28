"""``model.drop_path_rate`` (tldist.models.drop_path) for torchvision and timm models."""

import pytest
import torch

from tldist.errors import ConfigError
from tldist.models import build_model

from helpers import model_cfg as _cfg

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
