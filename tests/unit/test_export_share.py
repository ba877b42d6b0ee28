"""A shareable export (issue 27, item 10): a ``timm:`` export loads with ``timm.create_model("local-dir:...")``
as the same model with the same class names; every export has a model card (data, eval, study, commands);
``--push-to-hub`` builds its commit from the folder and fails in one line without the Hub."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import REPO, checkpoint_manager, env

from tldist.artifacts.export import model_record
from tldist.config import JobConfig, format_config
from tldist.models.factory import build_model

CLASSES = ["cat", "dog", "eel"]


def timm_checkpoint(run_dir, data_root, name="timm:resnet10t", image_size=32):
    """A real tldist checkpoint of a ``timm:`` model inside a run directory with a result.json, its config
    naming the shard sets under ``data_root``; returns (model, checkpoint dir)."""
    cfg = JobConfig()
    cfg.model.name, cfg.model.pretrained, cfg.data.image_size = name, False, image_size
    cfg.data.train, cfg.data.val = [str(data_root / "train")], str(data_root / "val")
    torch.manual_seed(0)
    model, info = build_model(cfg.model, len(CLASSES), image_size=image_size)
    with torch.no_grad():  # a "fine-tuned" head: not what a fresh build gives
        for p in model.get_classifier().parameters():
            p.add_(0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    record = model_record(info, classes=CLASSES, image_size=image_size)
    mgr = checkpoint_manager(run_dir / "checkpoints", model, opt, sched, config_yaml=format_config(cfg),
                             model_record=record)
    ckpt = mgr.save(7, trainer={"classes": CLASSES, "image_size": image_size, "best_metric": 91.5, "best_step": 7,
                                "world_size": 2, "command": "tldist train configs/x.yaml optim.lr=0.1"}, metric=91.5)
    (run_dir / "result.json").write_text(json.dumps({"eval/top1": 91.5, "eval/top5": 100.0, "eval/count": 30,
                                                     "step": 7}))
    return model.eval(), ckpt


@pytest.mark.parametrize("name,size", [("timm:resnet10t", 32), ("timm:vit_tiny_patch16_224", 32)])
def test_timm_export_loads_in_timm_as_the_same_model_with_its_class_names(tiny_shards, tmp_path, name, size):
    import timm

    from tldist.artifacts.resolve import load_model
    from tldist.export import export_model

    model, _ = timm_checkpoint(tmp_path / "run", tiny_shards, name, size)
    out = export_model(tmp_path / "run", tmp_path / "export", command="tldist export run export")
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == name.split(":")[1] and config["num_classes"] == 3
    assert config["label_names"] == CLASSES
    pre = json.loads((out / "model.json").read_text())["preprocess"]
    assert config["pretrained_cfg"]["input_size"] == [3, size, size]
    assert config["pretrained_cfg"]["mean"] == pre["mean"] and config["pretrained_cfg"]["std"] == pre["std"]
    assert config["pretrained_cfg"]["interpolation"] == pre["interpolation"]
    assert config["pretrained_cfg"]["crop_pct"] == pytest.approx(pre["image_size"] / pre["resize"])

    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert loaded.pretrained_cfg["label_names"] == CLASSES
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert torch.equal(loaded(x), load_model(out).model(x))  # and tldist's own reader agrees
    data_cfg = timm.data.resolve_data_config({}, model=loaded)
    assert data_cfg["input_size"] == (3, size, size) and data_cfg["crop_pct"] == pytest.approx(size / pre["resize"])


def test_model_card_names_data_eval_study_and_commands(tiny_shards, tmp_path):
    from tldist.export import export_model

    study = tmp_path / "study"
    run_dir = study / "runs" / "finetune-k5-s0"
    timm_checkpoint(run_dir, tiny_shards)
    (study / "summary.md").write_text("| arm | k | top1 |\n| --- | --- | --- |\n| finetune | 5 | 91.5 |\n")
    out = export_model(run_dir, tmp_path / "export", command="tldist export RUN OUT")
    card = (out / "README.md").read_text()
    assert card.startswith("---\ntags:\n- image-classification\n") and "library_name: timm" in card
    assert f"| train | `{tiny_shards / 'train'}` | 300 | 4 |" in card  # the manifest, read
    assert f"| val | `{tiny_shards / 'val'}` | 101 | 4 |" in card
    assert "| `eval/top1` | 91.5 |" in card and "| best (step 7) | 91.5 |" in card
    assert "## Study results" in card and "| finetune | 5 | 91.5 |" in card
    assert "tldist train configs/x.yaml optim.lr=0.1    # training (world size 2)" in card
    assert "tldist export RUN OUT    # this export" in card
    assert "timm.create_model('local-dir:PATH/TO/THIS/DIR', pretrained=True)" in card


def test_every_export_gets_a_card_and_only_timm_gets_timm_config(tiny_export, tmp_path):
    from tldist.export import export_model

    out = export_model(tiny_export, tmp_path / "again", command="tldist export a b")
    assert not (out / "config.json").exists()
    card = (out / "README.md").read_text()
    assert "library_name: pytorch" in card and "`resnet18`" in card and "tldist export a b    # this export" in card


def test_hub_operations_are_the_export_folder(tiny_export, tmp_path):
    from huggingface_hub import CommitOperationAdd

    from tldist.errors import UserError
    from tldist.export import export_model, hub_operations

    out = export_model(tiny_export, tmp_path / "e", command="x")
    ops = hub_operations(out)
    assert all(isinstance(o, CommitOperationAdd) for o in ops)
    assert sorted(o.path_in_repo for o in ops) == sorted(p.name for p in out.iterdir())
    assert {o.path_in_repo: o.path_or_fileobj for o in ops}["README.md"] == str(out / "README.md")
    with pytest.raises(UserError, match="not an export directory"):
        hub_operations(tmp_path)


def _export_cli(args: list[str], code: str = "") -> subprocess.CompletedProcess:
    script = f"import sys; {code}from tldist.cli.main import main; sys.exit(main({args!r}))"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**env(), "HF_HUB_OFFLINE": "1"})


def test_push_to_hub_without_the_hub_is_one_line_after_a_complete_export(tiny_export, tmp_path):
    out = tmp_path / "pushed"
    proc = _export_cli(["export", str(tiny_export), str(out), "--push-to-hub", "someone/tiny"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tldist: error: --push-to-hub someone/tiny: upload failed")
    assert (out / "README.md").is_file() and (out / "model.safetensors").is_file()
    assert "hf-hub:" not in (out / "README.md").read_text()  # not a timm model: no timm snippet


def test_push_to_hub_without_huggingface_hub_is_one_line_before_any_work(tiny_export, tmp_path):
    out = tmp_path / "never"
    proc = _export_cli(["export", str(tiny_export), str(out), "--push-to-hub", "someone/tiny"],
                       code="sys.modules['huggingface_hub'] = None; ")  # as if not installed: import fails
    assert proc.returncode == 2
    assert proc.stderr.strip() == "tldist: error: --push-to-hub needs huggingface_hub: pip install 'tldist[hub]'"
    assert not out.exists()
