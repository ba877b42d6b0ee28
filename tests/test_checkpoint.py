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
    assert sorted(p.name for p in path.iterdir()) == ["complete.json", "config.yaml", "model.safetensors",
                                                      "optimizer.pt", "state.pt", "trainer.json"]
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


# ---- completeness: a kill while writing, re-saving or pruning never leaves a checkpoint resume picks ----

def test_checkpoint_missing_a_member_is_skipped_with_a_warning(tmp_path, caplog):
    """A step directory holding only config.yaml, state.pt and trainer.json (a prune killed half-way)
    is not complete: resume=auto takes the newest complete one and says why."""
    model, opt, sched = make()
    mgr = CheckpointManager(tmp_path, keep_last=5, is_main=True)
    save(mgr, 1, model, opt, sched)
    newest = save(mgr, 2, model, opt, sched)
    for member in ("model.safetensors", "optimizer.pt"):
        (newest / member).unlink()
    with caplog.at_level("WARNING", logger="tldist"):
        assert mgr.resolve_resume("auto").name == "step_00000001"
    assert "incomplete checkpoint" in caplog.text and "step_00000002" in caplog.text
    with pytest.raises(UserError, match="incomplete checkpoint"):
        mgr.resolve_resume(str(newest))


def test_truncated_member_makes_a_checkpoint_incomplete(tmp_path):
    model, opt, sched = make()
    mgr = CheckpointManager(tmp_path, keep_last=5, is_main=True)
    save(mgr, 1, model, opt, sched)
    path = save(mgr, 2, model, opt, sched)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert mgr.latest().name == "step_00000001"


def test_prune_never_leaves_a_partial_step_dir(tmp_path, monkeypatch):
    """Deleting an old checkpoint renames it out of step_* first: killed mid-delete (here: rmtree
    raising after one file), what is left is a .trash-* dir that lookup ignores and the next prune removes."""
    import shutil

    model, opt, sched = make()
    mgr = CheckpointManager(tmp_path, keep_last=1, is_main=True)
    save(mgr, 1, model, opt, sched)
    real_rmtree = shutil.rmtree

    def killed(path, *a, **k):
        from pathlib import Path

        p = Path(path)
        if p.name.endswith("step_00000001") and p.exists():
            (p / "model.safetensors").unlink()  # half deleted...
            raise KeyboardInterrupt  # ...when the kill lands
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        save(mgr, 2, model, opt, sched)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert [s for s, _ in mgr.all_steps()] == [2] and not (tmp_path / "step_00000001").exists()
    save(mgr, 3, model, opt, sched)
    assert not list(tmp_path.glob(".trash-*"))


# ---- no checkpoint member can run code; crafted files get one line naming them ----------------------

class _Payload:
    """Unpickling this runs ``Path(marker).touch()``: a stand-in for any command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize("member", ["state.pt", "optimizer.pt"])
def test_crafted_checkpoint_member_is_refused_without_running(tmp_path, member):
    model, opt, sched = make()
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=2, is_main=True)
    path = save(mgr, 1, model, opt, sched)
    marker = tmp_path / "PWNED"
    original = torch.load(path / member, weights_only=True, map_location="cpu")
    original["extra"] = _Payload(marker)
    torch.save(original, path / member)
    m2, o2, s2 = make(seed=1)
    with pytest.raises(UserError) as e:
        mgr.load(path, model=m2, optimizer=o2, scheduler=s2, rank=0)
    assert not marker.exists(), "unpickling ran the payload"
    msg = str(e.value)
    assert "\n" not in msg and str(path / member) in msg and "\x1b[" not in msg
    # nothing was restored from the checkpoint: the model keeps its own weights
    assert not torch.equal(next(m2.parameters()), next(model.parameters()))


def test_corrupt_safetensors_member_is_one_line(tmp_path):
    model, opt, sched = make()
    mgr = CheckpointManager(tmp_path, keep_last=2, is_main=True)
    path = save(mgr, 1, model, opt, sched)
    (path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    m2, o2, s2 = make(seed=1)
    with pytest.raises(UserError, match="model.safetensors") as e:
        mgr.load(path, model=m2, optimizer=o2, scheduler=s2, rank=0)
    assert "\n" not in str(e.value)


# ---- fp16 loss scale --------------------------------------------------------------------------------

def test_grad_scaler_state_round_trips(tmp_path):
    """The fp16 GradScaler's scale and growth tracker are saved and restored, so resume is exact."""
    model, opt, sched = make()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    for _ in range(4):  # unscaled steps: the scale grows and the tracker counts
        opt.zero_grad()
        scaler.scale(model(torch.randn(16, 4)).square().mean()).backward()
        scaler.step(opt)
        scaler.update()
    mgr = CheckpointManager(tmp_path, keep_last=2, is_main=True)
    path = mgr.save(4, model=model, optimizer=opt, scheduler=sched, trainer_state={}, loader_state={},
                    config_yaml="", scaler=scaler)
    m2, o2, s2 = make(seed=1)
    restored = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=3)
    mgr.load(path, model=m2, optimizer=o2, scheduler=s2, rank=0, scaler=restored)
    assert restored.state_dict() == scaler.state_dict() and scaler.get_scale() != 1.0


# ---- EMA of the weights ---------------------------------------------------------------------------

def test_ema_is_saved_and_restored_bitwise(tmp_path, caplog):
    """ema.safetensors holds the EMA as a full state dict; a resume restores it bitwise, an old
    checkpoint without it starts the EMA from its weights (warning), and with EMA off it is ignored."""
    from safetensors.torch import load_file

    from tldist.train.ema import WeightEma

    model, opt, sched = make()
    ema = WeightEma(model, model, decay=0.9)
    for step in range(1, 4):
        train_steps(model, opt, sched, 1)
        ema.update(step)
    mgr = CheckpointManager(tmp_path, keep_last=5, is_main=True)
    path = mgr.save(3, model=model, optimizer=opt, scheduler=sched, trainer_state={}, loader_state={},
                    config_yaml="", ema=ema)
    assert "ema.safetensors" in json.loads((path / "complete.json").read_text())["members"]
    on_disk = load_file(str(path / "ema.safetensors"))
    assert on_disk.keys() == model.state_dict().keys()  # loadable as a plain model
    m2, o2, s2 = make(seed=1)
    ema2 = WeightEma(m2, m2, decay=0.9)
    mgr.load(path, model=m2, optimizer=o2, scheduler=s2, rank=0, ema=ema2)
    for k, v in ema.state_dict().items():
        assert torch.equal(ema2.state_dict()[k], v), k
    assert not torch.equal(ema2.state_dict()["0.weight"], m2.state_dict()["0.weight"])  # not just the weights
    # one more step: both continue identically
    torch.manual_seed(7)
    train_steps(model, opt, sched, 1)
    ema.update(4)
    torch.manual_seed(7)
    train_steps(m2, o2, s2, 1)
    ema2.update(4)
    assert all(torch.equal(ema2.state_dict()[k], v) for k, v in ema.state_dict().items())

    old = save(mgr, 4, model, opt, sched)  # saved with EMA off
    assert not (old / "ema.safetensors").exists()
    m3, o3, s3 = make(seed=2)
    ema3 = WeightEma(m3, m3, decay=0.9)
    with caplog.at_level("WARNING", logger="tldist"):
        mgr.load(old, model=m3, optimizer=o3, scheduler=s3, rank=0, ema=ema3)
    assert "holds no EMA" in caplog.text
    assert all(torch.equal(ema3.state_dict()[k], v.float() if v.is_floating_point() else v)
               for k, v in model.state_dict().items())
    m4, o4, s4 = make(seed=3)
    mgr.load(path, model=m4, optimizer=o4, scheduler=s4, rank=0)  # EMA off: ema.safetensors is ignored
    assert torch.equal(m4.state_dict()["0.weight"], load_file(str(path / "model.safetensors"))["0.weight"])


def test_ema_of_another_model_is_one_line(tmp_path):
    from tldist.train.ema import WeightEma

    model, opt, sched = make()
    mgr = CheckpointManager(tmp_path, keep_last=5, is_main=True)
    path = mgr.save(1, model=model, optimizer=opt, scheduler=sched, trainer_state={}, loader_state={},
                    config_yaml="", ema=WeightEma(model, model, decay=0.9))
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path / "ema.safetensors"))
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, str(path / "ema.safetensors"))
    m2, o2, s2 = make(seed=1)
    with pytest.raises(UserError, match="ema.safetensors") as e:
        mgr.load(path, model=m2, optimizer=o2, scheduler=s2, rank=0, ema=WeightEma(m2, m2, decay=0.9))
    assert "\n" not in str(e.value)
