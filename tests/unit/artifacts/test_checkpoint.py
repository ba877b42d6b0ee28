import json

import pytest
import torch

from helpers import checkpoint_weights
from tldist.artifacts import dcp as safe_dcp
from tldist.artifacts.checkpoint import (CheckpointManager, ModelState, OptimizerState, RngState, best_checkpoint,
                                         latest_checkpoint, list_checkpoints, resolve_resume)
from tldist.errors import UserError
from tldist.train.optim import build_scheduler


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


class Loader:
    """A per-rank state like the train loader's."""

    per_rank = True

    def __init__(self, batches=0):
        self.batches = batches

    def state_dict(self):
        return {"batches": self.batches}

    def load_state_dict(self, sd):
        self.batches = sd["batches"]


def manager(root, model, opt, sched, keep_last=2, loader=None, **extra):
    states = {"model": ModelState(model), "optimizer": OptimizerState(model, opt), "scheduler": sched,
              "loader": loader if loader is not None else Loader(), "rng": RngState(), **extra}
    return CheckpointManager(root, states=states, keep_last=keep_last, is_main=True, config_yaml="a: 1\n")


def save(mgr, step, model=None, opt=None, sched=None, metric=None):
    mgr.states["loader"].batches = step
    return mgr.save(step, trainer={"world_size": 1}, metric=metric)


def test_save_load_roundtrip_restores_everything(tmp_path):
    model, opt, sched = make()
    train_steps(model, opt, sched, 3)
    mgr = manager(tmp_path, model, opt, sched)
    path = save(mgr, 3, model, opt, sched)
    assert sorted(p.name for p in path.iterdir()) == [".metadata", "__0_0.distcp", "complete.json", "config.yaml",
                                                      "rank0.pt", "state.pt", "trainer.json"]
    assert all(torch.equal(checkpoint_weights(path)[k], v) for k, v in model.state_dict().items())
    expected_next = torch.rand(3)  # RNG continues after the save
    m2, o2, s2 = make(seed=1)
    loader = Loader()
    trainer = manager(tmp_path, m2, o2, s2, loader=loader).load(path)
    assert loader.batches == 3 and trainer["step"] == 3
    for a, b in zip(model.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    saved_opt, loaded_opt = opt.state_dict(), o2.state_dict()
    assert saved_opt["param_groups"] == loaded_opt["param_groups"]
    for i, st in saved_opt["state"].items():  # momentum buffers, bitwise
        assert all(torch.equal(v, loaded_opt["state"][i][k]) for k, v in st.items())
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
    mgr = manager(tmp_path, model, opt, sched)
    save(mgr, 1, model, opt, sched)
    save(mgr, 2, model, opt, sched, metric=90.0)  # best
    for s in (3, 4, 5):
        save(mgr, s, model, opt, sched)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4, 5]
    assert latest_checkpoint(tmp_path).name == "step_00000005"
    assert best_checkpoint(tmp_path).name == "step_00000002"
    assert json.loads((tmp_path / "best.json").read_text())["metric"] == 90.0


def test_incomplete_checkpoint_is_ignored(tmp_path):
    model, opt, sched = make()
    mgr = manager(tmp_path, model, opt, sched, keep_last=3)
    save(mgr, 1, model, opt, sched)
    (tmp_path / ".tmp-step_00000002").mkdir()  # a crash mid-write leaves only a temp dir
    (tmp_path / "step_00000003").mkdir()  # or a dir without trainer.json
    assert resolve_resume(tmp_path, "auto").name == "step_00000001"
    assert resolve_resume(tmp_path, "none") is None


def test_resume_from_bad_path_is_clear(tmp_path):
    with pytest.raises(UserError, match="not a checkpoint directory"):
        resolve_resume(tmp_path, str(tmp_path / "nope"))


# ---- completeness: a kill while writing, re-saving or pruning never leaves a checkpoint resume picks ----

@pytest.mark.parametrize("member", [".metadata", "__0_0.distcp", "rank0.pt", "state.pt"])
def test_checkpoint_missing_a_member_is_skipped_with_a_warning(tmp_path, caplog, member):
    """A step directory lacking one of its members (a prune killed half-way) is not complete:
    resume=auto takes the newest complete one and says why."""
    model, opt, sched = make()
    mgr = manager(tmp_path, model, opt, sched, keep_last=5)
    save(mgr, 1, model, opt, sched)
    newest = save(mgr, 2, model, opt, sched)
    (newest / member).unlink()
    with caplog.at_level("WARNING", logger="tldist"):
        assert resolve_resume(tmp_path, "auto").name == "step_00000001"
    assert "incomplete checkpoint" in caplog.text and "step_00000002" in caplog.text
    with pytest.raises(UserError, match="incomplete checkpoint"):
        resolve_resume(tmp_path, str(newest))


@pytest.mark.parametrize("member", [".metadata", "__0_0.distcp"])
def test_truncated_member_makes_a_checkpoint_incomplete(tmp_path, member):
    model, opt, sched = make()
    mgr = manager(tmp_path, model, opt, sched, keep_last=5)
    save(mgr, 1, model, opt, sched)
    path = save(mgr, 2, model, opt, sched)
    data = (path / member).read_bytes()
    (path / member).write_bytes(data[: len(data) // 2])
    assert latest_checkpoint(tmp_path).name == "step_00000001"


def test_prune_never_leaves_a_partial_step_dir(tmp_path, monkeypatch):
    """Deleting an old checkpoint renames it out of step_* first: killed mid-delete (here: rmtree
    raising after one file), what is left is a .trash-* dir that lookup ignores and the next prune removes."""
    import shutil

    model, opt, sched = make()
    mgr = manager(tmp_path, model, opt, sched, keep_last=1)
    save(mgr, 1, model, opt, sched)
    real_rmtree = shutil.rmtree

    def killed(path, *a, **k):
        from pathlib import Path

        p = Path(path)
        if p.name.endswith("step_00000001") and p.exists():
            (p / "__0_0.distcp").unlink()  # half deleted...
            raise KeyboardInterrupt  # ...when the kill lands
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        save(mgr, 2, model, opt, sched)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2] and not (tmp_path / "step_00000001").exists()
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


@pytest.mark.parametrize("member", ["state.pt", "rank0.pt"])
def test_crafted_checkpoint_member_is_refused_without_running(tmp_path, member):
    model, opt, sched = make()
    mgr = manager(tmp_path / "ckpt", model, opt, sched)
    path = save(mgr, 1, model, opt, sched)
    marker = tmp_path / "PWNED"
    original = torch.load(path / member, weights_only=True, map_location="cpu")
    original["extra"] = _Payload(marker)
    torch.save(original, path / member)
    m2, o2, s2 = make(seed=1)
    with pytest.raises(UserError) as e:
        manager(tmp_path / "ckpt", m2, o2, s2).load(path)
    assert not marker.exists(), "unpickling ran the payload"
    msg = str(e.value)
    assert "\n" not in msg and str(path / member) in msg and "\x1b[" not in msg
    # nothing was restored from the checkpoint: the model keeps its own weights
    assert not torch.equal(next(m2.parameters()), next(model.parameters()))


@pytest.mark.parametrize("member", ["__0_0.distcp", ".metadata", "state.pt", "rank0.pt"])
def test_corrupt_member_is_one_line(tmp_path, member):
    """A member overwritten with garbage of the same size (complete.json still agrees): resume and the
    resolver (export, eval, model.checkpoint=) both say which file in one line."""
    model, opt, sched = make()
    mgr = manager(tmp_path, model, opt, sched)
    path = save(mgr, 1, model, opt, sched)
    size = (path / member).stat().st_size
    (path / member).write_bytes((b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage" * size)[:size])
    assert latest_checkpoint(tmp_path) == path  # the sizes agree: only reading it finds out
    m2, o2, s2 = make(seed=1)
    with pytest.raises(UserError) as e:
        manager(tmp_path, m2, o2, s2).load(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path / member) in msg, msg
    if member in ("__0_0.distcp", ".metadata"):  # what export, eval and model.checkpoint= read
        with pytest.raises(UserError) as e:
            checkpoint_weights(path)
        assert "\n" not in str(e.value) and str(path / member) in str(e.value), str(e.value)


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
    path = manager(tmp_path, model, opt, sched, scaler=scaler).save(4, trainer={})
    m2, o2, s2 = make(seed=1)
    restored = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=3)
    manager(tmp_path, m2, o2, s2, scaler=restored).load(path)
    assert restored.state_dict() == scaler.state_dict() and scaler.get_scale() != 1.0


# ---- EMA of the weights ---------------------------------------------------------------------------

def test_ema_is_saved_and_restored_bitwise(tmp_path, caplog):
    """The checkpoint holds the EMA as the sharded 'ema' state (the model's keys); a resume restores it
    bitwise, a checkpoint without it starts the EMA from its weights (warning), and with EMA off it is ignored."""
    from tldist.train.ema import WeightEma

    model, opt, sched = make()
    ema = WeightEma(model, model, decay=0.9)
    for step in range(1, 4):
        train_steps(model, opt, sched, 1)
        ema.update(step)
    path = manager(tmp_path, model, opt, sched, keep_last=5, ema=ema).save(3, trainer={})
    assert set(safe_dcp.saved_keys(path, "ema")) == {f"ema.{k}" for k in model.state_dict()}
    on_disk = checkpoint_weights(path, "ema")
    assert on_disk.keys() == model.state_dict().keys()  # loadable as a plain model
    assert all(torch.equal(on_disk[k], v) for k, v in ema.state_dict().items())
    assert not torch.equal(on_disk["0.weight"], checkpoint_weights(path)["0.weight"])
    m2, o2, s2 = make(seed=1)
    ema2 = WeightEma(m2, m2, decay=0.9)
    manager(tmp_path, m2, o2, s2, ema=ema2).load(path)
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

    old = save(manager(tmp_path, model, opt, sched, keep_last=5), 4)  # saved with EMA off
    assert not safe_dcp.saved_keys(old, "ema")
    m3, o3, s3 = make(seed=2)
    ema3 = WeightEma(m3, m3, decay=0.9)
    with caplog.at_level("WARNING", logger="tldist"):
        manager(tmp_path, m3, o3, s3, ema=ema3).load(old)
    assert "holds no EMA" in caplog.text
    assert all(torch.equal(ema3.state_dict()[k], v.float() if v.is_floating_point() else v)
               for k, v in model.state_dict().items())
    m4, o4, s4 = make(seed=3)
    manager(tmp_path, m4, o4, s4).load(path)  # EMA off: the checkpoint's EMA is ignored
    assert all(torch.equal(m4.state_dict()[k], v) for k, v in checkpoint_weights(path).items())
    assert not all(torch.equal(m4.state_dict()[k], v) for k, v in checkpoint_weights(path, "ema").items())


def _other(kind):
    """A model that differs from make()'s: one more layer, one layer fewer, or other widths."""
    layers = {"larger": [torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3), torch.nn.Linear(3, 3)],
              "smaller": [torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8)],
              "wider": [torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 3)]}[kind]
    return torch.nn.Sequential(*layers)


@pytest.mark.parametrize("kind", ["larger", "smaller", "wider"])
def test_ema_of_another_model_is_one_line(tmp_path, kind):
    """A checkpoint whose EMA is of another model is refused in one line before anything is restored,
    whether it has more keys (DCP would read only the keys asked for), fewer, or other shapes."""
    from tldist.train.ema import WeightEma

    model, opt, sched = make()
    other = _other(kind)
    path = manager(tmp_path, model, opt, sched, keep_last=5, ema=WeightEma(other, other, decay=0.9)).save(1, trainer={})
    m2, o2, s2 = make(seed=1)
    with pytest.raises(UserError, match="'ema' state of another model|does not fit") as e:
        manager(tmp_path, m2, o2, s2, ema=WeightEma(m2, m2, decay=0.9)).load(path)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value), str(e.value)
    assert str(path) in str(e.value)


def test_a_checkpoint_in_the_format_before_sharding_is_refused_in_one_line(tmp_path):
    """A step dir of the full-state format (model.safetensors + optimizer.pt + state.pt): resuming it is one
    line that says how to go on from its weights, before anything is loaded."""
    from safetensors.torch import save_file

    model, opt, sched = make()
    old = tmp_path / "checkpoints" / "step_00000004"
    old.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(old / "model.safetensors"))
    torch.save(opt.state_dict(), old / "optimizer.pt")
    torch.save({"step": 4}, old / "state.pt")
    (old / "config.yaml").write_text("a: 1\n")
    (old / "trainer.json").write_text('{"step": 4, "world_size": 2}')
    mgr = manager(tmp_path / "checkpoints", model, opt, sched)
    with pytest.raises(UserError) as e:
        mgr.load(old)
    msg = str(e.value)
    assert "format before sharded checkpoints" in msg and f"model.checkpoint={old}" in msg and "\n" not in msg
