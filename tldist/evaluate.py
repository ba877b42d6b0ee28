"""``tldist eval``: score a checkpoint on shards, exact across ranks, exactly like training's own eval.

Labels are matched **by class name** against the class list stored with the checkpoint
(``trainer.json`` ``classes`` of a ``step_*`` dir, ``model.json`` ``classes`` of an export), the same
way training maps its val sets: a val set may hold any subset of the model's classes, in any
order; a class the model does not know is a :class:`~tldist.errors.DataError`. Images get the
model's own eval preprocessing (:func:`tldist.data.transforms.eval_preprocess`: resize
``floor(size / crop_pct)`` with the weights' interpolation, center crop), as in training and export.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from tldist.config import JobConfig
from tldist.errors import ConfigError, UserError

log = logging.getLogger("tldist")


@torch.no_grad()
def evaluate_checkpoint(cfg: JobConfig, checkpoint: str) -> dict[str, Any]:
    """Top-1/top-5/loss of ``checkpoint`` on ``cfg.data.val`` (call on every rank).

    ``checkpoint``: a ``step_*`` dir, a run dir (its best, else latest checkpoint), an export dir or
    a weights file (which records no class list: labels then follow the training class list of
    ``cfg.data.train``, or, without one, the val manifest's order). ``cfg.data.image_size`` (0: the
    size the checkpoint was trained/exported at) sets the eval resolution.

    Each rank keeps a full copy of the model and scores its part of the val split; integer
    counts are summed across ranks, so the result equals a single-process evaluation. Returns
    :meth:`~tldist.train.metrics.EvalAccumulator.compute`'s metrics (``per_class_acc`` in the model's
    class order, NaN for classes absent from the set) plus ``classes``, ``preprocess`` (the eval
    preprocessing used) and ``is_main``. Raises :class:`UserError` for a missing/unusable checkpoint,
    a multi-task checkpoint or a ``model.name`` that is not the checkpoint's, :class:`DataError` for
    val classes the model does not know.
    """
    from tldist.data.device_decode import images_on
    from tldist.data.manifest import load_manifest
    from tldist.data.pipeline import build_eval_loader
    from tldist.data.transforms import Normalizer, eval_preprocess, preprocess_crop_pct
    from tldist.export import describe_checkpoint, refuse_multitask
    from tldist.models.factory import build_model
    from tldist.train.distributed import build_accelerator, world_of
    from tldist.train.metrics import EvalAccumulator

    if not cfg.data.val:
        raise ConfigError("config key 'data.val' is empty: name the shard set to evaluate on, e.g. data.val=shards/val")
    record = describe_checkpoint(checkpoint)
    refuse_multitask(record, f"--checkpoint '{record['path']}'", "tldist eval")
    if record["model"] and record["model"] != cfg.model.name:
        raise UserError(f"--checkpoint '{record['path']}' holds a '{record['model']}' model but config key "
                        f"'model.name' is '{cfg.model.name}': set model.name={record['model']}")
    classes = record["classes"] or _fallback_classes(cfg, str(record["path"]))
    accelerator = build_accelerator(dataclasses.replace(cfg.train, fsdp=False))
    if classes is not None:
        num_classes = len(classes)
    else:  # nothing says which output is which class: the val manifest's order, as the user asked
        num_classes = cfg.model.num_classes or load_manifest(cfg.data.val).num_classes
        if accelerator.is_main_process:
            log.warning("checkpoint '%s' records no class names: val labels are matched to outputs by position "
                        "(the val manifest's class order)", record["path"])
    model_cfg = dataclasses.replace(cfg.model, checkpoint=str(record["path"]), pretrained=True)
    image_size = cfg.data.image_size or record["image_size"]
    model, info = build_model(model_cfg, num_classes, image_size=image_size, require_head=True)
    model.to(accelerator.device).eval()
    pre = eval_preprocess(info, image_size)
    if record["preprocess"]:  # an export: its model.json is the deployed preprocessing
        saved = record["preprocess"]
        pre = {**pre, "crop_pct": preprocess_crop_pct(saved), "interpolation": saved.get("interpolation", "bilinear"),
               "mean": list(saved.get("mean", pre["mean"])), "std": list(saved.get("std", pre["std"]))}
    loader = build_eval_loader(cfg.data, world_of(accelerator), image_size=pre["image_size"],
                               interpolation=pre["interpolation"], crop_pct=pre["crop_pct"], classes=classes)
    transform = loader.dataset.transform
    normalize = Normalizer(pre["mean"], pre["std"], device=accelerator.device,
                           channels_last=cfg.train.channels_last and accelerator.device.type == "cuda")
    acc = EvalAccumulator(num_classes, accelerator.device)
    with accelerator.autocast():
        for batch in loader:
            logits = model(normalize(images_on(batch, accelerator.device)))
            acc.update(logits, batch["label"].to(accelerator.device), batch["mask"].to(accelerator.device))
    result = acc.compute()
    result["classes"] = list(classes or [])
    result["preprocess"] = {"image_size": transform.image_size, "resize": transform.resize_size,
                            "crop_pct": transform.crop_pct, "interpolation": transform.interpolation,
                            "mean": list(pre["mean"]), "std": list(pre["std"])}
    result["is_main"] = accelerator.is_main_process
    return result


def _fallback_classes(cfg: JobConfig, where: str) -> list[str] | None:
    """Class list for a weights file that records none: the training classes of ``cfg.data.train``
    (what training would build), checked against ``model.num_classes``; None without ``data.train``."""
    if not cfg.data.train:
        return None
    from tldist.train.main import check_num_classes, read_classes

    classes = read_classes(cfg.data)
    check_num_classes(cfg.model, classes, f"data.train ({', '.join(map(str, cfg.data.train))}), the class list "
                                          f"used for '{where}' (it records none)")
    return classes
