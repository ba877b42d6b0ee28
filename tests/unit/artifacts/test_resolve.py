"""tldist.artifacts.resolve: every command reads the weights ``tldist export`` would write, and every
record (pruned widths, constructor arguments, classes) travels with the model (issue 23)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from helpers import checkpoint_weights
from helpers import ema_checkpoint as _ema_checkpoint
from tldist.artifacts.resolve import build_configured_model, load_model, resolve
from tldist.config import DistillConfig, ModelConfig
from tldist.errors import UserError


@pytest.fixture()
def ema_run(tmp_path):
    """A run whose checkpoint.best_metric is eval_ema/top1: its best checkpoint's EMA differs from its weights."""
    ckpt = _ema_checkpoint(tmp_path / "run" / "checkpoints", "eval_ema/top1")
    return tmp_path / "run", ckpt


def _same_state(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], v) for k, v in b.items())


def _same(model, state) -> bool:
    got = model.state_dict()
    return all(torch.equal(got[k], v) for k, v in state.items())


@pytest.mark.parametrize("path", ["run", "step"])
def test_every_model_path_resolves_the_weights_the_run_judged(ema_run, path):
    run, ckpt = ema_run
    where = run if path == "run" else ckpt
    ema, raw = checkpoint_weights(ckpt, "ema"), checkpoint_weights(ckpt, "raw")
    assert not _same_state(ema, raw)
    art = resolve(where)
    assert art.kind == "checkpoint" and art.weights == "ema" and art.step == 2
    assert art.describe().startswith("weights: ema, step 2")
    # tldist eval / predict / compress / adapt / pseudo-label load through load_model
    assert _same(load_model(where).model, ema) and not _same(load_model(where).model, raw)
    assert _same(load_model(where, weights="raw").model, raw)
    # model.checkpoint= (fine-tuning, study's source) and its model.checkpoint_weights
    cfg = ModelConfig(name="mobilenet_v3_small", pretrained=False, checkpoint=str(where))
    model, _, art = build_configured_model(cfg, 4, image_size=16)
    assert art.weights == "ema" and _same(model, {k: v for k, v in ema.items() if not k.startswith("classifier.3")})
    model, _, art = build_configured_model(cfg, 4, image_size=16, weights="raw")
    assert art.weights == "raw" and _same(model, {k: v for k, v in raw.items() if not k.startswith("classifier.3")})


def test_the_teacher_of_distillation_is_resolved_alike(ema_run):
    from tldist.train.distill import build_distiller

    run, ckpt = ema_run
    ema, raw = checkpoint_weights(ckpt, "ema"), checkpoint_weights(ckpt, "raw")
    assert not _same_state(ema, raw)
    kw = dict(classes=["c0", "c1", "c2", "c3"], device="cpu", mean=[0.5] * 3, std=[0.5] * 3, image_size=16)
    assert _same(build_distiller(DistillConfig(teacher=str(run)), **kw).teacher, ema)
    assert _same(build_distiller(DistillConfig(teacher=str(run), teacher_weights="raw"), **kw).teacher, raw)


def test_an_export_holds_one_set_of_weights(ema_run, tmp_path):
    from tldist.export import export_model

    run, _ = ema_run
    out = export_model(run, tmp_path / "export")
    assert resolve(out).weights == "ema"
    with pytest.raises(UserError, match="export of the ema weights") as e:
        resolve(out, weights="raw")
    assert "\n" not in str(e.value)


def test_old_checkpoint_without_a_record_reads_its_config(ema_run):
    """A checkpoint written before model.json: trainer.json and config.yaml still say which weights and model."""
    _, ckpt = ema_run
    (ckpt / "model.json").unlink()
    members = json.loads((ckpt / "complete.json").read_text())
    members["members"].pop("model.json")
    (ckpt / "complete.json").write_text(json.dumps(members))
    art = resolve(ckpt)
    assert art.legacy and art.weights == "ema" and art.model_name == "mobilenet_v3_small"
    loaded = load_model(ckpt)
    assert loaded.meta["preprocess"]["image_size"] == 16 and loaded.meta["classes"] == ["c0", "c1", "c2", "c3"]


# ---- structurally pruned models: their widths travel with every checkpoint and export ----------------

def _pruned(tmp_path):
    """A resnet18 export pruned to half its channels (torch-pruning), as 'compress prune --structured' writes it."""
    pytest.importorskip("torch_pruning")
    from tldist.artifacts.export import model_record, write_export
    from tldist.compress.structured import apply_channel_pruning, pruning_record
    from tldist.models.factory import build_model

    torch.manual_seed(0)
    model, info = build_model(ModelConfig(name="resnet18", pretrained=False), 4, image_size=32)
    stats = apply_channel_pruning(model.eval(), info.head, torch.randn(1, 3, 32, 32), ratio=0.5, round_to=8)
    record = model_record(info, classes=["c0", "c1", "c2", "c3"], image_size=32,
                          pruned=pruning_record(stats, ratio=0.5, norm=2, round_to=8))
    return write_export(model, record, tmp_path / "pruned"), model


def test_a_model_fine_tuned_from_a_pruned_export_records_its_widths(tmp_path):
    """Issue 23 fault 2, by the library: the checkpoint of a run started from a pruned export records the
    pruned shapes, so export, eval and a teacher rebuild it; without the record the error names the widths."""
    from helpers import checkpoint_manager
    from tldist.artifacts.export import model_record
    from tldist.train.optim import build_scheduler

    export, pruned = _pruned(tmp_path)
    cfg = ModelConfig(name="resnet18", pretrained=False, checkpoint=str(export))
    model, info, origin = build_configured_model(cfg, 4, image_size=32)
    assert origin.pruned and model.layer1[0].conv1.out_channels == pruned.layer1[0].conv1.out_channels < 64
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    record = model_record(info, classes=["c0", "c1", "c2", "c3"], image_size=32, pruned=origin.pruned)
    ckpt = checkpoint_manager(tmp_path / "run" / "checkpoints", model, opt,
                              build_scheduler(opt, warmup_steps=0, total_steps=1, min_ratio=0.0),
                              model_record=record).save(1, trainer={})
    rebuilt = load_model(tmp_path / "run").model  # export, eval, predict, compress, distill.teacher
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(rebuilt(x), model.eval()(x))
    # the same weights without their record: one line that names the widths, not the head
    save_file(checkpoint_weights(ckpt), str(tmp_path / "weights.safetensors"))
    (ckpt / "model.json").unlink()
    with pytest.raises(UserError, match="structurally pruned") as e:
        build_configured_model(ModelConfig(name="resnet18", pretrained=False,
                                           checkpoint=str(tmp_path / "weights.safetensors")), 4, require_head=True)
    assert "\n" not in str(e.value)


def test_int8_directory_is_refused_by_every_loader(tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "model.json").write_text(json.dumps({"model": "resnet18", "format": "torchscript-int8"}))
    with pytest.raises(UserError, match="int8 model") as e:
        load_model(tmp_path / "q")
    assert "\n" not in str(e.value)
