"""``tldist export`` / ``predict`` and the one eval preprocessing they share with training and ``tldist eval``.

A model's eval preprocessing is ``resize = floor(size / crop_pct)`` with the weights' interpolation,
then a center crop (:func:`tldist.data.transforms.eval_preprocess`). For resnet50 and
mobilenet_v3_large the weights' crop_pct is 224/232, not 0.875: training eval, ``tldist eval``, ``predict`` and
``model.json`` must all use it.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import REPO

SIZE = 32  # floor(32 / (224/232)) = 33, while 0.875 would give 36
STEPS = 8
TRAIN = ["model.name=resnet50", "model.pretrained=false", f"data.image_size={SIZE}", "data.batch_size=8",
         "data.num_workers=1", "data.shuffle_buffer=64", "data.hflip=false", "optim.name=adamw", "optim.lr=0.003",
         "optim.lr_ref_batch=8", "train.log_every_steps=4", "tracker.backend=none"]


def reference_inputs(images: list[bytes], resize: int, mean, std) -> torch.Tensor:
    """Square 16 px test images -> PIL bilinear resize to ``resize``, center crop SIZE, normalized [N,3,S,S]."""
    import io

    import numpy as np
    from PIL import Image

    out = []
    for data in images:
        img = Image.open(io.BytesIO(data)).convert("RGB").resize((resize, resize), Image.BILINEAR)
        o = (resize - SIZE) // 2
        arr = np.asarray(img.crop((o, o, o + SIZE, o + SIZE)), dtype=np.float32) / 255.0
        out.append((torch.from_numpy(arr).permute(2, 0, 1) - torch.tensor(mean)[:, None, None])
                   / torch.tensor(std)[:, None, None])
    return torch.stack(out)


@pytest.mark.slow
def test_one_eval_preprocessing_for_training_eval_eval_predict_and_model_json(tiny_shards, tmp_path):
    from test_adapt import cli, run
    from test_evaluate import samples_of

    from tldist.config import ModelConfig, load_config
    from tldist.evaluate import evaluate_checkpoint
    from tldist.export import export_model, predict
    from tldist.models.factory import build_model

    out = tmp_path / "run"
    run(cli("train", "configs/test_tiny.yaml", f"data.train=[{tiny_shards}/train]", f"data.val={tiny_shards}/val",
            f"output_dir={out}", f"train.max_steps={STEPS}", *TRAIN))
    result = json.loads((out / "result.json").read_text())
    ckpt = out / "checkpoints" / f"step_{STEPS:08d}"

    # the reference: the checkpoint's resnet50 on images resized to 33 (crop_pct 224/232), by hand
    model, info = build_model(ModelConfig(name="resnet50", pretrained=True, checkpoint=str(ckpt)), 4,
                              image_size=SIZE, require_head=True)
    assert info.crop_pct == pytest.approx(224 / 232, abs=1e-4)
    val = samples_of(tiny_shards / "val")
    x = reference_inputs([d for _, d, _ in val], 33, info.mean, info.std)
    labels = torch.tensor([int(c[1:]) for _, _, c in val])
    with torch.no_grad():
        logits = model.eval()(x)
    ref_loss = float(torch.nn.functional.cross_entropy(logits, labels))
    with torch.no_grad():  # the same model at 0.875 (resize 36) scores differently: the check has teeth
        other = float(torch.nn.functional.cross_entropy(model(reference_inputs([d for _, d, _ in val], 36, info.mean,
                                                                                  info.std)), labels))
    assert abs(other - ref_loss) > 1e-3

    # training's own eval
    assert result["eval/count"] == 101 and result["eval/loss"] == pytest.approx(ref_loss, rel=1e-4)
    # tldist eval
    cfg = load_config(str(REPO / "configs/test_tiny.yaml"), [f"data.val={tiny_shards}/val", *TRAIN])
    got = evaluate_checkpoint(cfg, str(ckpt))
    assert got["preprocess"]["resize"] == 33 and got["loss"] == pytest.approx(ref_loss, rel=1e-4)
    # model.json
    export = export_model(ckpt, tmp_path / "export")
    pre = json.loads((export / "model.json").read_text())["preprocess"]
    assert pre["image_size"] == SIZE and pre["resize"] == 33 and pre["crop_pct"] == pytest.approx(224 / 232, abs=1e-4)
    assert pre["interpolation"] == "bilinear"
    # predict: the probabilities of the reference
    img = tmp_path / "x.png"
    img.write_bytes(val[0][1])
    top = dict(predict(export, [str(img)], top_k=4)[0]["top"])
    probs = logits[0].softmax(-1)
    for i, p in enumerate(probs.tolist()):
        assert top[f"c{i}"] == pytest.approx(p, rel=1e-4, abs=1e-6)
    # an export evaluated by tldist eval uses its model.json
    assert evaluate_checkpoint(cfg, str(export))["loss"] == pytest.approx(ref_loss, rel=1e-4)


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v3_large", "resnet18", "efficientnet_b1", "vit_b_16"])
def test_eval_preprocess_matches_the_weights_transforms(name):
    """At the weights' own size the resize, crop and interpolation are those of the torchvision weights
    (``weights.transforms()``: resnet50/mobilenet_v3_large 232, efficientnet_b1 255...)."""
    from torchvision.models import get_model_weights

    from tldist.config import ModelConfig
    from tldist.data.transforms import build_eval_transform, eval_preprocess
    from tldist.models.factory import build_model

    t = get_model_weights(name).DEFAULT.transforms()
    _, info = build_model(ModelConfig(name=name, pretrained=False), 3)
    pre = eval_preprocess(info)
    assert (pre["image_size"], pre["resize"], pre["interpolation"]) == \
        (t.crop_size[0], t.resize_size[0], t.interpolation.value)
    assert build_eval_transform(pre["image_size"], pre["interpolation"], info.crop_pct).resize_size == pre["resize"]


def test_old_model_json_keeps_its_recorded_resize():
    """Exports written before ``crop_pct`` was recorded: the recorded ``resize`` is what they get."""
    from tldist.data.transforms import build_eval_transform, eval_resize_size, preprocess_crop_pct

    for size, resize in ((16, 18), (224, 232), (240, 255), (224, 256), (384, 384)):
        crop_pct = preprocess_crop_pct({"image_size": size, "resize": resize})
        assert eval_resize_size(size, crop_pct) == build_eval_transform(size, crop_pct=crop_pct).resize_size == resize
    assert preprocess_crop_pct({"image_size": 224}) == 0.875
    assert math.isclose(preprocess_crop_pct({"image_size": 224, "crop_pct": 0.95}), 0.95)


def _ema_checkpoint(root, best_metric: str):
    """A real checkpoint (mobilenet_v3_small, 4 classes) whose EMA differs from its weights."""
    from tldist.config import JobConfig, format_config
    from tldist.models.factory import build_model
    from tldist.train.checkpoint import CheckpointManager
    from tldist.train.ema import WeightEma
    from tldist.train.schedule import build_scheduler

    cfg = JobConfig()
    cfg.model.name, cfg.model.pretrained, cfg.data.image_size = "mobilenet_v3_small", False, 16
    cfg.train.ema_decay, cfg.checkpoint.best_metric = 0.9, best_metric
    model, info = build_model(cfg.model, 4, image_size=16)
    ema = WeightEma(model, model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    ema.update(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mgr = CheckpointManager(root, keep_last=2, is_main=True)
    return mgr.save(2, model=model, optimizer=opt, scheduler=build_scheduler(opt, warmup_steps=0, total_steps=2, min_ratio=0.0),
                    trainer_state={"classes": ["c0", "c1", "c2", "c3"], "image_size": 16,
                                   "model_kwargs": info.model_kwargs}, loader_state={},
                    config_yaml=format_config(cfg), metric=50.0, ema=ema)


@pytest.mark.parametrize("best_metric, flag, expected", [
    ("eval_ema/top1", None, "ema"), ("eval/top1", None, "raw"), ("eval/top1", "ema", "ema"),
    ("eval_ema/top1", "raw", "raw"),
])
def test_export_writes_the_chosen_weights_and_says_which(tmp_path, best_metric, flag, expected):
    from safetensors.torch import load_file

    from tldist.export import export_model, load_exported

    ckpt = _ema_checkpoint(tmp_path / "run" / "checkpoints", best_metric)
    out = export_model(tmp_path / "run", tmp_path / "export", weights=flag)  # the run dir: its best checkpoint
    meta = json.loads((out / "model.json").read_text())
    assert meta["weights"] == expected
    source = load_file(str(ckpt / ("ema.safetensors" if expected == "ema" else "model.safetensors")))
    other = load_file(str(ckpt / ("model.safetensors" if expected == "ema" else "ema.safetensors")))
    model, _ = load_exported(out)  # what predict and tldist eval of the export run
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in source.items())
    assert not all(torch.equal(got[k], v) for k, v in other.items())


def test_export_of_ema_weights_a_checkpoint_lacks_is_one_line(tmp_path, capsys):
    from tldist.cli import main

    ckpt = _ema_checkpoint(tmp_path / "run" / "checkpoints", "eval/top1")
    (ckpt / "ema.safetensors").unlink()
    assert main(["export", str(ckpt), str(tmp_path / "export"), "--weights", "ema"]) == 2
    err = capsys.readouterr().err
    assert "--weights ema" in err and "ema.safetensors" in err and err.strip().count("\n") == 0
    assert main(["export", str(ckpt), str(tmp_path / "export")]) == 0  # default: the raw weights
    assert json.loads((tmp_path / "export" / "model.json").read_text())["weights"] == "raw"
