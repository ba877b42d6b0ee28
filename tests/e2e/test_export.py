"""``tldist export`` / ``predict`` and the one eval preprocessing they share with training and ``tldist eval``.

A model's eval preprocessing is ``resize = floor(size / crop_pct)`` with the weights' interpolation,
then a center crop (:func:`tldist.data.transforms.eval_preprocess`). For resnet50 and
mobilenet_v3_large the weights' crop_pct is 224/232, not 0.875: training eval, ``tldist eval``, ``predict`` and
``model.json`` must all use it.
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import REPO

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
    from helpers import cli, run, samples_of

    from tldist.config import ModelConfig, load_config
    from tldist.evaluate import evaluate_checkpoint
    from tldist.export import export_model, predict
    from tldist.artifacts.resolve import build_configured_model

    out = tmp_path / "run"
    run(cli("train", "configs/test_tiny.yaml", f"data.train=[{tiny_shards}/train]", f"data.val={tiny_shards}/val",
            f"output_dir={out}", f"train.max_steps={STEPS}", *TRAIN))
    result = json.loads((out / "result.json").read_text())
    ckpt = out / "checkpoints" / f"step_{STEPS:08d}"

    # the reference: the checkpoint's resnet50 on images resized to 33 (crop_pct 224/232), by hand
    model, info = build_configured_model(ModelConfig(name="resnet50", pretrained=True, checkpoint=str(ckpt)), 4,
                              image_size=SIZE, require_head=True)[:2]
    assert info.crop_pct == pytest.approx(224 / 232, abs=1e-4)
    val = samples_of(tiny_shards / "val")
    x = reference_inputs([d for _, d, _ in val], 33, info.mean, info.std)
    labels = torch.tensor([int(c[1:]) for _, _, c in val])
    with torch.no_grad():
        logits = model.eval()(x)
    ref_loss = float(torch.nn.functional.cross_entropy(logits, labels))
    with torch.no_grad():  # the same model at 0.875 (resize 36) computes other logits: the check has teeth
        other = model(reference_inputs([d for _, d, _ in val], 36, info.mean, info.std))
    assert (other - logits).abs().max() > 1e-2

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
