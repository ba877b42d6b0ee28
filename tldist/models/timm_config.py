"""timm's own export format for a tldist model with a ``timm:`` backbone: ``config.json`` beside ``model.safetensors``.

``timm.create_model("local-dir:DIR", pretrained=True)`` (and ``"hf-hub:ORG/NAME"`` once the directory is on the
Hugging Face Hub) reads ``DIR/config.json`` (timm ``models/_hub.py:load_model_config_from_path``): the
architecture, ``num_classes``, ``label_names``, the constructor arguments (``model_args``) and the
``pretrained_cfg`` (mean, std, input size, crop_pct, interpolation); then it loads ``DIR/model.safetensors``,
the file name timm looks for first (``_PREFERRED_FILES``). The JSON is written by timm's own
``save_config_for_hf`` (what ``timm.models.push_to_hf_hub`` writes), with the preprocessing overwritten by the
one tldist recorded for the fine-tuned model, so that timm's ``resolve_data_config`` and tldist's eval agree.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch.nn as nn

from tldist.data.transforms import preprocess_crop_pct

TIMM_PREFIX = "timm:"
"""``model.name`` prefix of timm backbones."""


def timm_hub_config(model: nn.Module, *, classes: list[str], preprocess: dict[str, Any]) -> dict[str, Any]:
    """timm's ``config.json`` (a dict) of ``model``, a timm model as tldist built it (``timm.create_model`` +
    ``reset_classifier``), whose outputs are ``classes`` (names in output order) and whose eval preprocessing is
    ``preprocess`` (a model record's ``"preprocess"``: ``image_size`` px, ``crop_pct``, ``interpolation``,
    ``mean``, ``std``). Keys: ``architecture``, ``num_classes``, ``num_features``, ``label_names``,
    ``model_args`` (when the model was built with any), ``pretrained_cfg``."""
    from timm.models._hub import save_config_for_hf  # what timm.models.push_to_hf_hub writes

    size = int(preprocess["image_size"])
    pretrained = {"input_size": (3, size, size), "crop_pct": float(preprocess_crop_pct(preprocess)),
                  "interpolation": str(preprocess.get("interpolation", "bilinear")),
                  "mean": tuple(float(v) for v in preprocess["mean"]), "std": tuple(float(v) for v in preprocess["std"]),
                  "crop_mode": "center"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        save_config_for_hf(model, str(path), model_config={"label_names": list(classes)})
        config = json.loads(path.read_text())
    config["pretrained_cfg"].update({k: list(v) if isinstance(v, tuple) else v for k, v in pretrained.items()})
    config["pretrained_cfg"].pop("test_input_size", None)  # scored at the recorded size only
    if tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, size, size)))[1:] != (size, size):
        config["pretrained_cfg"]["pool_size"] = None  # the weights' feature-map size no longer holds (timm's rule)
    config["pretrained_cfg"].pop("test_crop_pct", None)
    config["label_names"] = list(classes)
    return config
