"""tldist.train.ema: the EMA of the weights on one process (sharded by FSDP2: e2e/test_ema.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tldist.train.ema import WeightEma

torch.set_num_threads(1)


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def sgd_steps(model, opt, n, ema=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    snapshots = []
    for step in range(1, n + 1):
        loss = model(torch.randn(16, 4, generator=gen)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update(step)
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return snapshots


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_equals_the_manual_formula(warmup):
    decay, power = 0.8, 0.75
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = WeightEma(model, model, decay=decay, warmup=warmup, warmup_power=power)
    snapshots = sgd_steps(model, opt, 5, ema)

    # by hand: timm's schedule (the first update copies; warm-up: min(decay, 1 - (1 + n) ** -power), n = step - 1)
    expected = None
    for step, weights in enumerate(snapshots, 1):
        n = step - 1
        d = 0.0 if n == 0 else (min(decay, 1 - (1 + n) ** -power) if warmup else decay)
        assert ema.get_decay(step) == pytest.approx(d)
        if expected is None:
            expected = {k: v.float().clone() if v.is_floating_point() else v.clone() for k, v in weights.items()}
        else:
            expected = {k: d * expected[k] + (1 - d) * v if v.is_floating_point() else v.clone()
                        for k, v in weights.items()}
    got = ema.state_dict()
    assert set(got) == set(expected)  # parameters and buffers (BatchNorm statistics)
    for k in expected:
        assert got[k].dtype == (torch.float32 if expected[k].is_floating_point() else expected[k].dtype)
        assert torch.allclose(got[k], expected[k], rtol=1e-6, atol=1e-7), k
    assert int(got["1.num_batches_tracked"]) == 5  # integer buffers are copied, not averaged
    # the EMA lags: it is not the last weights
    assert not torch.allclose(got["0.weight"], snapshots[-1]["0.weight"])


def test_applied_swaps_the_ema_in_and_gives_the_weights_back():
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = WeightEma(model, model, decay=0.5)
    sgd_steps(model, opt, 3, ema)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    ema_sd = {k: v.clone() for k, v in ema.state_dict().items()}
    with ema.applied():
        for k, v in model.state_dict().items():
            assert torch.equal(v, ema_sd[k]), k
        model.train()(torch.randn(8, 4))  # BatchNorm statistics move while the EMA is in: the EMA keeps them
        moved = model[1].running_mean.clone()
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw[k]), k  # bitwise the weights from before
    assert torch.equal(ema.state_dict()["1.running_mean"], moved)
    with pytest.raises(RuntimeError, match="boom"):  # an error inside still gives the weights back
        with ema.applied():
            raise RuntimeError("boom")
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())


def test_state_dict_round_trip_and_reset():
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = WeightEma(model, model, decay=0.9)
    sgd_steps(model, opt, 3, ema)
    saved = {k: v.clone() for k, v in ema.state_dict().items()}
    other = WeightEma(model, model, decay=0.9)
    other.load_state_dict(saved)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in saved.items())
    other.reset()
    assert all(torch.equal(other.state_dict()[k], v.float() if v.is_floating_point() else v)
               for k, v in model.state_dict().items())
