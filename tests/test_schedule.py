import torch

from tldist.train.schedule import build_scheduler, lr_factor


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
