import json

import pytest
import torch

from tldist.errors import UserError
from tldist.train.checkpoint import CheckpointManager
from tldist.train.schedule import build_scheduler


def make(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = build_scheduler(opt, warmup_steps=2, total_steps=10, min_ratio=0.0)
    return model, opt, sched


def train_steps(model, opt, sched, n):
    for _ in range(n):
        loss = model(torch.randn(16, 4)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def save(mgr, step, model, opt, sched, metric=None):
    return mgr.save(step, model=model, optimizer=opt, scheduler=sched, trainer_state={"world_size": 1},
                    loader_state={"batches": step}, config_yaml="a: 1\n", metric=metric)


def test_save_load_roundtrip_restores_everything(tmp_path):
    model, opt, sched = make()
    train_steps(model, opt, sched, 3)
    mgr = CheckpointManager(tmp_path, keep_last=2, is_main=True)
    path = save(mgr, 3, model, opt, sched)
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "model.safetensors", "optimizer.pt",
                                                      "state.pt", "trainer.json"]
    expected_next = torch.rand(3)  # RNG continues after the save
    m2, o2, s2 = make(seed=1)
    restored = mgr.load(path, model=m2, optimizer=o2, scheduler=s2, rank=0)
    assert restored["loader"] == {"batches": 3} and restored["trainer"]["step"] == 3
    for a, b in zip(model.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert s2.get_last_lr() == sched.get_last_lr()
    assert torch.equal(torch.rand(3), expected_next)
    # optimizer momentum restored: one more identical step gives identical weights
    torch.manual_seed(7)
    train_steps(model, opt, sched, 1)
    torch.manual_seed(7)
    train_steps(m2, o2, s2, 1)
    for a, b in zip(model.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_keep_last_plus_best_and_latest(tmp_path):
    model, opt, sched = make()
    mgr = CheckpointManager(tmp_path, keep_last=2, is_main=True)
    save(mgr, 1, model, opt, sched)
    save(mgr, 2, model, opt, sched, metric=90.0)  # best
    for s in (3, 4, 5):
        save(mgr, s, model, opt, sched)
    assert [s for s, _ in mgr.all_steps()] == [2, 4, 5]
    assert mgr.latest().name == "step_00000005"
    assert mgr.best().name == "step_00000002"
    assert json.loads((tmp_path / "best.json").read_text())["metric"] == 90.0


def test_incomplete_checkpoint_is_ignored(tmp_path):
    model, opt, sched = make()
    mgr = CheckpointManager(tmp_path, keep_last=3, is_main=True)
    save(mgr, 1, model, opt, sched)
    (tmp_path / ".tmp-step_00000002").mkdir()  # a crash mid-write leaves only a temp dir
    (tmp_path / "step_00000003").mkdir()  # or a dir without trainer.json
    assert mgr.resolve_resume("auto").name == "step_00000001"
    assert mgr.resolve_resume("none") is None


def test_resume_from_bad_path_is_clear(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=1, is_main=True)
    with pytest.raises(UserError, match="not a checkpoint directory"):
        mgr.resolve_resume(str(tmp_path / "nope"))
