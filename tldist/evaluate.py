"""``tldist eval``: score a checkpoint on shards, exact across ranks."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from tldist.config import JobConfig
from tldist.errors import ConfigError, UserError


@torch.no_grad()
def evaluate_checkpoint(cfg: JobConfig, checkpoint: str) -> dict[str, Any]:
    """Top-1/top-5/loss of ``checkpoint`` on ``cfg.data.val`` (call on every rank).

    Each rank keeps a full copy of the model and scores its part of the val split; integer
    counts are summed across ranks, so the result equals a single-process evaluation.
    """
    from tldist.data.manifest import load_manifest
    from tldist.data.pipeline import build_eval_loader
    from tldist.data.transforms import Normalizer
    from tldist.models.factory import build_model
    from tldist.train.distributed import build_accelerator, world_of
    from tldist.train.metrics import EvalAccumulator

    if not cfg.data.val:
        raise ConfigError("config key 'data.val' is empty: name the shard set to evaluate on, e.g. data.val=shards/val")
    if not Path(checkpoint).exists():
        raise UserError(f"checkpoint '{checkpoint}' does not exist")
    accelerator = build_accelerator(dataclasses.replace(cfg.train, fsdp=False))
    classes = load_manifest(cfg.data.val).classes
    num_classes = cfg.model.num_classes or len(classes)
    model_cfg = dataclasses.replace(cfg.model, checkpoint=str(checkpoint), pretrained=True)
    model, info = build_model(model_cfg, num_classes, image_size=cfg.data.image_size, require_head=True)
    model.to(accelerator.device).eval()
    image_size = cfg.data.image_size or info.input_size
    loader = build_eval_loader(cfg.data, world_of(accelerator), image_size=image_size,
                               interpolation=info.interpolation)
    normalize = Normalizer(info.mean, info.std, channels_last=cfg.train.channels_last)
    acc = EvalAccumulator(num_classes, accelerator.device)
    with accelerator.autocast():
        for batch in loader:
            logits = model(normalize(batch["image"].to(accelerator.device)))
            acc.update(logits, batch["label"].to(accelerator.device), batch["mask"].to(accelerator.device))
    result = acc.compute()
    result["is_main"] = accelerator.is_main_process
    return result
