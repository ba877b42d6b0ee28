"""Scoring models on shards: one evaluation loop for training's eval, ``tldist eval``, compress and AdaBN.

:func:`score` runs a model over an eval loader (:func:`tldist.data.pipeline.build_eval_loader`: every
sample once across ranks x workers, padding batches masked out) and accumulates integer counts in an
:class:`EvalAccumulator`, which sums them across ranks: the result equals a one-process evaluation,
whatever the number of ranks, workers or batches.

``tldist eval`` (:func:`evaluate_checkpoint`) scores any model path exactly like training's own eval.
Labels are matched **by class name** against the class list in the model's record (:mod:`tldist.artifacts.resolve`),
the same way training maps its val sets: a val set may hold any subset of the model's classes, in any
order; a class the model does not know is a :class:`~tldist.errors.DataError`. Images get the model's
own eval preprocessing (:func:`tldist.data.transforms.eval_preprocess`: resize ``floor(size / crop_pct)``
with the weights' interpolation, center crop), as in training and export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Callable, Optional, Sequence

import torch

from tldist.artifacts.resolve import build_configured_model, resolve
from tldist.artifacts.export import refuse_multitask
from tldist.config import DataConfig, EvalConfig, JobConfig, ValSet, val_set_entries
from tldist.data.class_map import loader_classes as class_map_loader_classes
from tldist.data.class_map import mapped_classes, read_class_map
from tldist.data.device_decode import images_on
from tldist.data.manifest import check_num_classes, eval_sets, load_manifest, read_classes
from tldist.data.pipeline import EvalLoader, build_eval_loader
from tldist.data.transforms import Normalizer, eval_preprocess, preprocess_crop_pct
from tldist.errors import ConfigError, DataError, UserError
from tldist.world import World, all_reduce_, gather_to_main, start_world, world_of

log = logging.getLogger("tldist")


class EvalAccumulator:
    """Running counts of one eval pass, in O(classes) memory per rank.

    Per true class: samples, top-1 hits and top-5 hits (int64, all-reduced by :meth:`compute`), the summed
    cross-entropy (float64) and, sparsely, the top-1 mistakes as ``(true, predicted)`` pairs with counts,
    kept on this rank and gathered to rank 0 only. Rank 0 builds the dense confusion matrix from them when
    ``num_classes <= confusion_max_classes`` (:class:`tldist.config.EvalConfig`) and reports the
    ``top_confused`` most frequent pairs. Nothing of size classes^2 exists on any other rank, or on rank 0
    above the threshold: at 21,841 classes the all-reduce is 3 x 21,841 int64 (0.5 MB), where a dense float64
    matrix was 3.8 GB per rank.
    """

    _COMPACT_EVERY = 1 << 20
    """Pairs buffered on the device before they are folded into (unique pair, count) form (8 MB of int64)."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", *, confusion_max_classes: int = 1000,
                 top_confused: int = 20):
        self.num_classes = num_classes
        self.confusion_max_classes = confusion_max_classes
        self.top_confused = top_confused
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.counts = torch.zeros(3, num_classes, dtype=torch.int64, device=device)
        """``[samples, top-1 hits, top-5 hits]`` per true class."""
        self._pairs: list[torch.Tensor] = []  # per batch: true * C + predicted (hits included; dropped on compaction)
        self._buffered = 0
        self._codes = torch.zeros(0, dtype=torch.int64, device=device)  # unique mistake codes ...
        self._code_counts = torch.zeros(0, dtype=torch.int64, device=device)  # ... and how often each occurred

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add a batch: ``logits`` ``[B, C]``, ``labels`` ``[B]`` (int64 class indices); rows where ``mask``
        (``[B]`` bool) is False (padding, undecodable samples) are ignored. No host-device synchronisation
        beyond what the mask's indexing needs."""
        if mask is not None:
            logits, labels = logits[mask], labels[mask]
        if labels.numel() == 0:
            return
        logits = logits.float()
        self.loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double()
        topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = topk == labels[:, None]
        for row, values in ((0, torch.ones_like(labels)), (1, hit[:, 0].long()), (2, hit.any(1).long())):
            self.counts[row].index_add_(0, labels, values)
        self._pairs.append(labels * self.num_classes + topk[:, 0])
        self._buffered += labels.numel()
        if self._buffered >= self._COMPACT_EVERY:
            self._compact()

    def _compact(self) -> None:
        """Fold the buffered pairs into the unique mistake codes and their counts (hits dropped)."""
        if not self._pairs:
            return
        raw = torch.cat(self._pairs)
        self._pairs, self._buffered = [], 0
        raw = raw[raw // self.num_classes != raw % self.num_classes]  # top-1 hits are counted per class already
        codes = torch.cat([self._codes, raw])
        weights = torch.cat([self._code_counts, torch.ones_like(raw)])
        self._codes, inverse = torch.unique(codes, return_inverse=True)
        self._code_counts = torch.zeros_like(self._codes).index_add_(0, inverse, weights)

    def compute(self) -> dict[str, Any]:
        """Sum over ranks (call on every rank; the accumulator is left as it was) and return the metrics of the
        whole eval set:

        - ``loss``: mean cross-entropy (nats); ``top1``, ``top5``: accuracy in %; ``count``: samples scored;
        - ``balanced_acc``: mean per-class top-1 accuracy in %, over the classes that have samples (balanced
          accuracy: the mean of per-class recall, sklearn's ``balanced_accuracy_score``; what long-tailed sets
          report); 0 for an empty set;
        - ``per_class_acc``: ``num_classes`` top-1 fractions in [0, 1], ``nan`` for a class with no sample in
          the set (not measured, which is not 0); ``per_class_count``: samples per class;
        - rank 0 only (None elsewhere): ``confusion``, the ``[true][predicted]`` integer counts as lists, when
          ``num_classes <= confusion_max_classes`` (else None), and ``top_confused``, the ``top_confused`` most
          frequent mistakes as ``[true, predicted, count]`` (count descending, then true, predicted ascending).
        """
        counts = all_reduce_(self.counts.clone())
        loss_sum = float(all_reduce_(self.loss_sum.clone()))
        self._compact()
        mine = (self._codes.cpu().numpy(), self._code_counts.cpu().numpy())
        gathered = gather_to_main(mine)  # rank 0 alone receives the mistake pairs
        samples, hits1, hits5 = counts.cpu().double()
        n = int(samples.sum())
        present = samples > 0
        per_class = torch.where(present, hits1 / samples.clamp(min=1), torch.full_like(hits1, float("nan")))
        balanced = float(per_class[present].mean()) * 100 if bool(present.any()) else 0.0
        n_safe = max(n, 1)
        result: dict[str, Any] = {
            "loss": loss_sum / n_safe, "top1": 100.0 * float(hits1.sum()) / n_safe,
            "top5": 100.0 * float(hits5.sum()) / n_safe, "balanced_acc": balanced, "count": n,
            "per_class_acc": per_class.tolist(), "per_class_count": samples.long().tolist(),
            "confusion": None, "top_confused": None}
        if gathered is not None:
            codes, pair_counts = _merge_pairs(gathered)
            result["top_confused"] = _top_pairs(codes, pair_counts, self.num_classes, self.top_confused)
            if self.num_classes <= self.confusion_max_classes:
                result["confusion"] = _dense_confusion(codes, pair_counts, hits1.long(), self.num_classes)
        return result


def _merge_pairs(parts: list[tuple[Any, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique codes, counts) of every rank's mistake pairs, summed."""
    codes = torch.cat([torch.as_tensor(c, dtype=torch.int64) for c, _ in parts])
    counts = torch.cat([torch.as_tensor(k, dtype=torch.int64) for _, k in parts])
    unique, inverse = torch.unique(codes, return_inverse=True)
    return unique, torch.zeros_like(unique).index_add_(0, inverse, counts)


def _top_pairs(codes: torch.Tensor, counts: torch.Tensor, num_classes: int, k: int) -> list[list[int]]:
    """The ``k`` most frequent ``[true, predicted, count]``; ties by (true, predicted): codes are sorted and
    the sort is stable."""
    order = torch.sort(counts, descending=True, stable=True).indices[:k]
    return [[int(c) // num_classes, int(c) % num_classes, int(n)] for c, n in zip(codes[order], counts[order])]


def _dense_confusion(codes: torch.Tensor, counts: torch.Tensor, hits: torch.Tensor,
                     num_classes: int) -> list[list[int]]:
    """``[true][predicted]`` counts: the mistakes off the diagonal, the top-1 hits on it."""
    flat = torch.zeros(num_classes * num_classes, dtype=torch.int64)
    flat.index_add_(0, codes, counts)
    matrix = flat.view(num_classes, num_classes)
    matrix.diagonal().add_(hits)
    return matrix.tolist()


@torch.no_grad()
def score(model: Callable[[torch.Tensor], torch.Tensor], loader: Any, *, normalize: Callable[[torch.Tensor], torch.Tensor],
          num_classes: int, device: torch.device | str, span: tuple[int, int] | None = None,
          restrict: Optional[Sequence[int]] = None, model_device: torch.device | str | None = None,
          autocast: Callable[[], Any] = contextlib.nullcontext,
          on_batch: Optional[Callable[[dict, torch.Tensor], None]] = None,
          eval_cfg: Optional[EvalConfig] = None) -> dict[str, Any]:
    """Score ``model`` on every batch of an eval ``loader`` (call on every rank); the metrics of
    :meth:`EvalAccumulator.compute`, exact across ranks.

    Args:
        model: maps normalized images ``[B, 3, H, W]`` to logits ``[B, C]`` (eval mode is the caller's).
        loader: yields batches with uint8 ``image``, int64 ``label`` and bool ``mask`` (padding False).
        normalize: uint8 images on ``model_device`` -> the model's input (:class:`~tldist.data.transforms.Normalizer`).
        num_classes: classes scored (``span`` width when given).
        device: where counts accumulate (the process group's device for the all-reduce).
        span: output columns ``[lo, hi)`` to score (a multi-task head), else all.
        restrict: the only columns (within ``span``) a prediction may take: the others are set to -inf before
            top-k and the loss (``data.val_sets`` ``restrict_classes``, the ImageNet-R/-A protocol). None: all.
        model_device: where the model runs, when not ``device`` (int8 models: CPU).
        autocast: context for the forward passes (the run's mixed precision).
        on_batch: called with ``(batch, logits)`` after each forward (sample predictions for the tracker).
        eval_cfg: ``eval.confusion_max_classes`` and ``eval.top_confused`` (defaults when None).
    """
    model_device = torch.device(model_device or device)
    eval_cfg = eval_cfg or EvalConfig()
    acc = EvalAccumulator(num_classes, device, confusion_max_classes=eval_cfg.confusion_max_classes,
                          top_confused=eval_cfg.top_confused)
    masked_out = None
    if restrict is not None:
        masked_out = torch.ones(num_classes, dtype=torch.bool, device=device)
        masked_out[torch.as_tensor(list(restrict), dtype=torch.long, device=device)] = False
    for batch in loader:
        images = normalize(images_on(batch, model_device))  # data.decode=nvjpeg decodes here
        with autocast():
            logits = model(images)
        if span is not None:
            logits = logits[:, span[0]:span[1]]
        logits = logits.to(device)
        if masked_out is not None:
            logits = logits.float().masked_fill(masked_out, float("-inf"))
        acc.update(logits, batch["label"].to(device, non_blocking=True), batch["mask"].to(device))
        if on_batch is not None:
            on_batch(batch, logits)
    return acc.compute()


def eval_set_loader(data_cfg: DataConfig, world: World, location: str, classes: Optional[list[str]], *,
                    image_size: int, interpolation: str, crop_pct: float,
                    entry: Optional[ValSet] = None) -> tuple[EvalLoader, Optional[list[int]]]:
    """The eval loader of shard set ``location`` for a model whose outputs are ``classes`` (None: unnamed, labels
    by position), and the output columns its predictions are restricted to (None: all).

    ``entry`` (a ``data.val_sets`` entry, :class:`~tldist.config.ValSet`) may carry a ``class_map`` (the set's
    class names -> the model's, :mod:`tldist.data.class_map`) and ``restrict_classes`` (score only the set's
    own classes: the columns returned). Raises :class:`ConfigError` for an unreadable class map,
    :class:`DataError` for set classes the model (or the map) does not know.
    """
    loader_classes = classes
    set_classes: Optional[list[str]] = None
    if entry is not None and (entry.class_map or entry.restrict_classes):
        if classes is None:
            raise DataError(f"{entry.key} ('{location}'): the model records no class names, so its classes cannot "
                            "be matched for class_map / restrict_classes: evaluate a tldist checkpoint or export")
        set_classes = list(load_manifest(location).classes)
        if entry.class_map:
            mapping = read_class_map(entry.class_map, classes, key=f"{entry.key}.class_map")
            mapped = mapped_classes(set_classes, mapping, f"{entry.key} ('{location}')")
            loader_classes = class_map_loader_classes(classes, set_classes, mapped)
            set_classes = mapped
    loader = build_eval_loader(data_cfg, world, image_size=image_size, interpolation=interpolation,
                               crop_pct=crop_pct, location=location, classes=loader_classes)
    restrict = None
    if entry is not None and entry.restrict_classes and set_classes is not None and classes is not None:
        index = {c: i for i, c in enumerate(classes)}
        restrict = sorted(index[c] for c in set_classes)  # every one is known: the loader checked
    return loader, restrict


def shard_loader(location: str, meta: dict[str, Any], world: World, *, batch_size: int, num_workers: int,
                 pin_memory: bool = False) -> EvalLoader:
    """Eval loader of shard set ``location`` with the preprocessing of model record ``meta`` (labels
    remapped by class name onto the record's classes, when it has them)."""
    pre = meta["preprocess"]
    cfg = DataConfig(val=location, batch_size=batch_size, eval_batch_size=batch_size, num_workers=num_workers,
                     pin_memory=pin_memory)
    return build_eval_loader(cfg, world, image_size=int(pre["image_size"]),
                             interpolation=pre.get("interpolation", "bilinear"), crop_pct=preprocess_crop_pct(pre),
                             classes=meta.get("classes") or None)


def record_normalizer(meta: dict[str, Any], device: torch.device | str) -> Normalizer:
    """The :class:`~tldist.data.transforms.Normalizer` of model record ``meta``, producing batches on ``device``."""
    pre = meta["preprocess"]
    return Normalizer(pre["mean"], pre["std"], device=device)


def evaluate_shards(model: Callable[[torch.Tensor], torch.Tensor], meta: dict[str, Any], val: str, world: World, *,
                    device: torch.device | str = "cpu", model_device: torch.device | str | None = None,
                    batch_size: int = 64, num_workers: int = 1) -> dict[str, Any]:
    """Top-1/top-5/loss/count of ``model`` (record ``meta``) on shard set ``val``, rounded for reports (call
    on every rank; equals a 1-process evaluation). ``model_device`` is where the model runs (int8: CPU)."""
    loader = shard_loader(val, meta, world, batch_size=batch_size, num_workers=num_workers)
    m = score(model, loader, normalize=record_normalizer(meta, model_device or device), num_classes=int(meta["num_classes"]),
              device=device, model_device=model_device)
    return {"top1": round(m["top1"], 4), "top5": round(m["top5"], 4), "balanced_acc": round(m["balanced_acc"], 4),
            "loss": round(m["loss"], 6), "count": m["count"]}


def evaluate_checkpoint(cfg: JobConfig, checkpoint: str, *, weights: Optional[str] = None) -> dict[str, Any]:
    """Top-1/top-5/balanced accuracy/loss of the model at ``checkpoint`` on ``cfg.data.val`` and every
    ``cfg.data.val_sets`` entry (call on every rank).

    ``checkpoint``: a ``step_*`` dir, a run dir (its best, else latest checkpoint), an export dir or
    a weights file (which records no class list: labels then follow the training class list of
    ``cfg.data.train``, or, without one, the val manifest's order). ``weights``: ``raw`` or ``ema``
    (default: what the run judged best; see :func:`tldist.artifacts.resolve.resolve`), logged as
    ``weights: ema, step 30``. ``cfg.data.image_size`` (0: the size the model was trained or exported at)
    sets the eval resolution.

    Each rank keeps a full copy of the model and scores its part of the val split; integer
    counts are summed across ranks, so the result equals a single-process evaluation. Returns
    :meth:`EvalAccumulator.compute`'s metrics of the first set (``data.val``, else ``data.val_sets[0]``;
    ``per_class_acc`` in the model's class order, NaN for classes absent from the set; ``confusion`` and
    ``top_confused`` on rank 0, sized by ``cfg.eval``) plus ``sets`` (set name -> its ``top1``, ``top5``,
    ``balanced_acc``, ``loss``, ``count``; ``val`` for ``data.val``), ``classes``, ``preprocess`` (the eval
    preprocessing used), ``weights`` (:meth:`~tldist.artifacts.resolve.Artifact.describe`) and ``is_main``.
    A ``data.val_sets`` entry's ``restrict_classes`` and ``class_map`` apply as in training
    (:func:`eval_set_loader`). Raises :class:`UserError` for a missing/unusable checkpoint, a multi-task
    checkpoint or a ``model.name`` that is not the checkpoint's, :class:`DataError` for val classes the model
    does not know.
    """
    if not cfg.data.val and not cfg.data.val_sets:
        raise ConfigError("config key 'data.val' is empty: name the shard set to evaluate on, e.g. data.val=shards/val")
    sets = eval_sets(cfg.data)  # names; a set listed twice is a ConfigError before any work
    entries = {e.path: e for e in val_set_entries(cfg.data.val_sets)}
    art = resolve(checkpoint, weights=weights, flag="--checkpoint")
    refuse_multitask(art.record, f"--checkpoint '{art.path}'", "tldist eval")
    if art.model_name and art.model_name != cfg.model.name:
        raise UserError(f"--checkpoint '{art.path}' holds a '{art.model_name}' model but config key "
                        f"'model.name' is '{cfg.model.name}': set model.name={art.model_name}")
    classes = art.classes or _fallback_classes(cfg, str(art.path))
    accelerator = start_world(mixed_precision=cfg.train.mixed_precision, timeout_s=cfg.train.collective_timeout_s)
    if classes is not None:
        num_classes = len(classes)
    else:  # nothing says which output is which class: the val manifest's order, as the user asked
        num_classes = cfg.model.num_classes or load_manifest(sets[0][1]).num_classes
        if accelerator.is_main_process:
            log.warning("checkpoint '%s' records no class names: val labels are matched to outputs by position "
                        "(the val manifest's class order)", art.path)
    image_size = cfg.data.image_size or art.image_size
    model_cfg = dataclasses.replace(cfg.model, checkpoint=str(checkpoint), pretrained=True)
    model, info, _ = build_configured_model(model_cfg, num_classes, image_size=image_size, require_head=True,
                                            weights=weights)
    model.to(accelerator.device).eval()
    if accelerator.is_main_process:
        log.info("tldist eval: %s", art.describe())
    pre = eval_preprocess(info, image_size)
    if art.kind == "export" and art.preprocess:  # an export: its model.json is the deployed preprocessing
        saved = art.preprocess
        pre = {**pre, "crop_pct": preprocess_crop_pct(saved), "interpolation": saved.get("interpolation", "bilinear"),
               "mean": list(saved.get("mean", pre["mean"])), "std": list(saved.get("std", pre["std"]))}
    normalize = Normalizer(pre["mean"], pre["std"], device=accelerator.device,
                           channels_last=cfg.train.channels_last and accelerator.device.type == "cuda")
    result: dict[str, Any] = {}
    summaries: dict[str, dict[str, Any]] = {}
    for name, location in sets:
        entry = entries.get(location) if name != "val" else None
        loader, restrict = eval_set_loader(cfg.data, world_of(accelerator), location, classes,
                                           image_size=pre["image_size"], interpolation=pre["interpolation"],
                                           crop_pct=pre["crop_pct"], entry=entry)
        metrics = score(model, loader, normalize=normalize, num_classes=num_classes, device=accelerator.device,
                        restrict=restrict, autocast=accelerator.autocast, eval_cfg=cfg.eval)
        summaries[name] = {k: metrics[k] for k in ("top1", "top5", "balanced_acc", "loss", "count")}
        if not result:
            result, transform = metrics, loader.dataset.transform
    result["sets"] = summaries
    result["classes"] = list(classes or [])
    result["preprocess"] = {"image_size": transform.image_size, "resize": transform.resize_size,
                            "crop_pct": transform.crop_pct, "interpolation": transform.interpolation,
                            "mean": list(pre["mean"]), "std": list(pre["std"])}
    result["weights"] = art.describe()
    result["is_main"] = accelerator.is_main_process
    return result


def _fallback_classes(cfg: JobConfig, where: str) -> list[str] | None:
    """Class list for a weights file that records none: the training classes of ``cfg.data.train``
    (what training would build), checked against ``model.num_classes``; None without ``data.train``."""
    if not cfg.data.train:
        return None
    classes = read_classes(cfg.data)
    check_num_classes(cfg.model, classes, f"data.train ({', '.join(map(str, cfg.data.train))}), the class list "
                                          f"used for '{where}' (it records none)")
    return classes
