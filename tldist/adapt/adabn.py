"""``tldist adapt adabn``: re-estimate BatchNorm statistics on target-domain shards (AdaBN), no labels.

AdaBN (Li et al., 2016) keeps every learned weight and replaces each BatchNorm layer's running
mean/variance with statistics of its inputs on the target domain. Two estimators:

* ``population`` (default, exact): layers are visited in execution order; for layer ``k`` all
  BN layers before it already hold their *new* statistics (eval mode), the forward pass stops at
  layer ``k`` (a pre-hook collects its input moments and aborts), and the moments of the whole
  target set are summed. Each layer therefore sees its inputs exactly as the adapted model will at
  inference, and the result does not depend on batch size or on how samples are split across
  ranks: 2 processes give the statistics of 1 process. Cost: about K/2 forward passes for K BN
  layers (decoded batches are cached in memory when they fit, so data is decoded once).
* ``batch`` (one pass, the classic recipe): BN layers in train mode normalise with per-batch
  statistics (momentum=None, no grad, the rest of the model in eval mode); pre-hooks collect
  count-weighted per-channel sums of x and x^2. Cheaper, but deeper layers' inputs depend on the
  batch composition, so a different world size (different batches) gives slightly different
  statistics. Batches with fewer than 2 valid samples are skipped.

In both modes every rank sums ``(sum x, sum x^2, count)`` per channel in float64 over its exact part
of the target set (:func:`tldist.data.pipeline.build_eval_loader`; padding and undecodable samples
are dropped before the forward), the sums are all-reduced, and every rank sets
``running_mean = S1/n`` and ``running_var = (S2/n - mean^2) * n/(n-1)`` (unbiased, like PyTorch).
Rank 0 writes the adapted model as a new export directory (:mod:`tldist.export` format).
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any, Iterator, Optional

import torch
from torch import nn

from tldist.artifacts.export import check_out_dir, write_export
from tldist.artifacts.resolve import LoadedModel, load_model
from tldist.config import DataConfig
from tldist.data.manifest import load_manifest
from tldist.data.pipeline import build_eval_loader
from tldist.data.stream import slot_range
from tldist.data.transforms import Normalizer, preprocess_crop_pct
from tldist.errors import ConfigError, DataError, UserError
from tldist.evaluate import score
from tldist.world import all_reduce_, gather_objects, run_on_main, setup_logging, start_world, world_of

log = logging.getLogger("tldist")

MODES = ("population", "batch")
CACHE_BYTES = 1 << 30
"""Decoded uint8 target batches kept in memory per rank (population mode re-reads data beyond this)."""


class _Stop(Exception):
    """Raised by a pre-hook to end a forward pass once the layer being estimated has its input."""


class Moments:
    """Float64 per-channel ``sum x``, ``sum x^2`` and element count of a BN layer's inputs."""

    def __init__(self, channels: int, device: torch.device):
        self.sums = torch.zeros(2 * channels + 1, dtype=torch.float64, device=device)
        self.channels = channels

    def add(self, x: torch.Tensor) -> None:
        dims = [0, *range(2, x.dim())]
        xd = x.detach().to(torch.float64)
        c = self.channels
        self.sums[:c] += xd.sum(dims)
        self.sums[c:2 * c] += (xd * xd).sum(dims)
        self.sums[-1] += x.numel() / x.shape[1]

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(mean, unbiased var, count)`` from the (already reduced) sums."""
        c, n = self.channels, float(self.sums[-1])
        mean = self.sums[:c] / n
        var = (self.sums[c:2 * c] / n - mean * mean).clamp_(min=0.0)
        return mean, var * (n / (n - 1) if n > 1 else 1.0), n


def bn_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers that keep running statistics, by module name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None}


def execution_order(model: nn.Module, layers: dict[str, nn.Module], image_size: int, device) -> list[str]:
    """BN layer names in the order a forward pass first calls them (probed with one zero image)."""
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp, name=name: order.append(name) if name not in order else None)
             for name, m in layers.items()]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for h in hooks:
            h.remove()
    return order


class TargetBatches:
    """Re-iterable normalised target batches of this rank: masked rows dropped, optional sample limit.

    ``limit`` keeps the first ``limit`` samples of the set in manifest order (global indices are
    recovered from the eval loader's contiguous slot ranges, so the subset is the same for any
    world size). Decoded uint8 batches are cached while they fit in ``cache_bytes``.
    """

    def __init__(self, loader, normalize, device, *, limit: int = 0, cache_bytes: int = CACHE_BYTES):
        self.loader, self.normalize, self.device, self.limit = loader, normalize, device, limit
        self.cache: Optional[list[torch.Tensor]] = None
        self.cache_bytes = cache_bytes
        self.samples = 0

    def _raw(self) -> Iterator[torch.Tensor]:
        ds = self.loader.dataset
        total = ds.source.num_samples
        ranges = [slot_range(total, ds.rank * ds.workers + j, ds.num_slots) for j in range(ds.workers)]
        end = [min(hi, self.limit) if self.limit else hi for _, hi in ranges]
        start = [lo for lo, _ in ranges]
        for batch in self.loader:
            j = batch["_worker"]
            if j < 0:
                continue  # padding batch
            mask = batch["mask"].clone()
            index = start[j] + torch.arange(mask.numel())
            start[j] += mask.numel()
            mask &= index < end[j]
            if bool(mask.any()):
                yield batch["image"][mask]
            if self.limit and all(s >= e for s, e in zip(start, end)):
                break  # the rest of this rank's range is beyond the limit

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.cache is not None:
            for images in self.cache:
                yield self.normalize(images.to(self.device))
            return
        cache: Optional[list[torch.Tensor]] = []
        size, samples = 0, 0
        for images in self._raw():
            samples += images.shape[0]
            if cache is not None:
                size += images.numel()
                if size <= self.cache_bytes:
                    cache.append(images)
                else:
                    cache = None  # too big: later passes read the shards again
            yield self.normalize(images.to(self.device))
        self.samples, self.cache = samples, cache


def _set_stats(bn: nn.modules.batchnorm._BatchNorm, moments: Moments, batches: int) -> float:
    mean, var, n = moments.mean_var()
    bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
    bn.running_var.copy_(var.to(bn.running_var.dtype))
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.fill_(batches)
    return n


@torch.no_grad()
def estimate_population(model: nn.Module, layers: dict[str, nn.Module], order: list[str], data: TargetBatches,
                        device) -> dict[str, float]:
    """Exact population statistics, layer by layer in execution order (see the module docstring)."""
    counts: dict[str, float] = {}
    model.eval()
    for name in order:
        bn = layers[name]
        moments = Moments(bn.num_features, device)

        def grab(mod, inputs, moments=moments):
            moments.add(inputs[0])
            raise _Stop

        hook = bn.register_forward_pre_hook(grab)
        batches = 0
        try:
            for x in data:
                batches += 1
                try:
                    model(x)
                except _Stop:
                    pass
        finally:
            hook.remove()
        all_reduce_(moments.sums)
        batches = int(all_reduce_(torch.tensor([batches], device=device)).item())
        if moments.sums[-1] > 0:
            counts[name] = _set_stats(bn, moments, batches)
    return counts


@torch.no_grad()
def estimate_batch(model: nn.Module, layers: dict[str, nn.Module], data: TargetBatches, device) -> dict[str, float]:
    """One pass with train-mode BN (per-batch normalisation), count-weighted moments (see module docstring)."""
    moments = {name: Moments(bn.num_features, device) for name, bn in layers.items()}
    hooks = [bn.register_forward_pre_hook(lambda mod, inp, m=moments[name]: m.add(inp[0]))
             for name, bn in layers.items()]
    saved = {name: bn.momentum for name, bn in layers.items()}
    model.eval()
    for bn in layers.values():
        bn.reset_running_stats()
        bn.momentum = None
        bn.training = True  # set directly: frozen-BN classes ignore .train()
    batches = small = 0
    try:
        for x in data:
            if x.shape[0] < 2:
                small += 1
                continue
            model(x)
            batches += 1
    finally:
        for h in hooks:
            h.remove()
        for name, bn in layers.items():
            bn.momentum, bn.training = saved[name], False
    flat = all_reduce_(torch.cat([m.sums for m in moments.values()]))
    batches, small = (int(v) for v in all_reduce_(torch.tensor([batches, small], device=device)).tolist())
    if small:
        log.warning("adabn (batch mode): skipped %d batch(es) with fewer than 2 valid samples", small)
    counts, offset = {}, 0
    for name, m in moments.items():
        m.sums = flat[offset:offset + m.sums.numel()]
        offset += m.sums.numel()
        if m.sums[-1] > 0:
            counts[name] = _set_stats(layers[name], m, batches)
    return counts


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Running means and variances of every BN layer (for comparisons and tests)."""
    return {f"{name}.{b}": getattr(m, b).detach().clone() for name, m in bn_layers(model).items()
            for b in ("running_mean", "running_var")}


@torch.no_grad()
def evaluate(model: nn.Module, loader, normalize, num_classes: int, device) -> dict[str, Any]:
    """Top-1/top-5 of ``model`` on a labelled loader, exact across ranks (call on every rank; :func:`tldist.evaluate.score`)."""
    model.eval()
    r = score(model, loader, normalize=normalize, num_classes=num_classes, device=device)
    return {"top1": r["top1"], "top5": r["top5"], "count": r["count"]}


def adabn(model: str, target: str, out: str, *, mode: str = "population", batches: int = 0, batch_size: int = 64,
          num_workers: int = 1, val: Optional[str] = None, weights: Optional[str] = None) -> dict[str, Any]:
    """Adapt the BN statistics of ``model`` to ``target`` shards and export it to ``out``.

    Call on every rank. ``batches`` > 0 uses only the first ``batches * batch_size`` target samples.
    With ``val`` (a labelled shard set in the model's classes) top-1 before and after is reported.
    ``weights``: ``raw`` or ``ema`` of a checkpoint or run (default: what it judged best). Returns a
    summary (identical on every rank).
    """
    if mode not in MODES:
        raise ConfigError(f"--mode {mode!r} is unknown: choose one of {', '.join(MODES)}")
    if batches < 0 or batch_size < 1 or num_workers < 0:
        raise ConfigError(f"--batches {batches} must be >= 0 (0: all), --batch-size {batch_size} >= 1 and "
                          f"--num-workers {num_workers} >= 0")
    check_out_dir(out, {"--target": target, "--model": model, **({"--val": val} if val else {})})
    manifest = load_manifest(target)
    if manifest.num_samples == 0:
        raise DataError(f"--target '{target}' holds no samples (its manifest counts 0): "
                        "point it at a non-empty shard set")
    accelerator = start_world()
    setup_logging(accelerator.is_main_process)
    world, device, t0 = world_of(accelerator), accelerator.device, time.perf_counter()
    loaded: LoadedModel = load_model(model, weights=weights, single_head="adaptation")
    if accelerator.is_main_process:
        log.info("adabn --model %s: %s", model, loaded.artifact.describe())
    net = loaded.model.to(device).eval()
    layers = bn_layers(net)
    if not layers:
        raise UserError(f"--model '{model}' ({loaded.meta['model']}) has no BatchNorm layers with running "
                        "statistics (e.g. ViTs use LayerNorm): AdaBN does not apply to it")
    pre = loaded.meta["preprocess"]
    size, interp, crop_pct = int(pre["image_size"]), pre.get("interpolation", "bilinear"), preprocess_crop_pct(pre)
    normalize = Normalizer(pre["mean"], pre["std"], device=device)
    data_cfg = DataConfig(batch_size=batch_size, eval_batch_size=batch_size, num_workers=num_workers)
    loader = build_eval_loader(data_cfg, world, image_size=size, interpolation=interp, crop_pct=crop_pct,
                               location=target)
    data = TargetBatches(loader, normalize, device, limit=batches * batch_size)
    summary: dict[str, Any] = {"model": loaded.path, "model_kind": loaded.kind, "weights": loaded.artifact.describe(),
                               "target": str(target), "mode": mode,
                               "bn_layers": len(layers), "world_size": world.world_size, "out": str(out)}
    val_loader = None
    if val:
        classes = list(loaded.meta.get("classes") or []) or None
        val_loader = build_eval_loader(data_cfg, world, image_size=size, interpolation=interp, crop_pct=crop_pct,
                                       location=val, classes=classes)
        summary["val"] = str(val)
        summary["before"] = evaluate(net, val_loader, normalize, int(loaded.meta["num_classes"]), device)
    original = copy.deepcopy(bn_state(net))

    if mode == "population":
        counts = estimate_population(net, layers, execution_order(net, layers, size, device), data, device)
    else:
        counts = estimate_batch(net, layers, data, device)
    samples = int(all_reduce_(torch.tensor([data.samples], device=device)).item())
    if samples == 0:
        raise DataError(f"none of the samples of --target '{target}' could be decoded; check it with "
                        "'tldist shards verify'")
    missed = [name for name in layers if name not in counts]
    if missed and accelerator.is_main_process:
        log.warning("adabn: %d BN layer(s) were not reached by the forward pass and keep their statistics: %s",
                    len(missed), ", ".join(missed[:5]))
    new = bn_state(net)
    checksum = float(sum(v.double().sum() for v in new.values()))
    sums = gather_objects(checksum)
    summary.update({"samples": samples, "layers_adapted": len(counts), "ranks_agree": all(c == sums[0] for c in sums),
                    "mean_abs_change": float(sum((new[k] - original[k]).abs().mean() for k in new) / len(new)),
                    "seconds": round(time.perf_counter() - t0, 2)})
    if val_loader is not None:
        summary["after"] = evaluate(net, val_loader, normalize, int(loaded.meta["num_classes"]), device)

    meta = {**loaded.meta, "adapted_from": loaded.path,
            "adabn": {k: summary[k] for k in ("target", "mode", "samples", "layers_adapted", "world_size")}}
    run_on_main(lambda: str(write_export(net.cpu(), meta, out, extra={"adabn.json": summary})))
    accelerator.wait_for_everyone()
    return summary


def format_summary(s: dict[str, Any]) -> str:
    """The summary as a few human-readable lines."""
    lines = [f"adabn ({s['mode']}): {s['layers_adapted']}/{s['bn_layers']} BN layers re-estimated on {s['samples']} "
             f"samples of {s['target']} by {s['world_size']} process(es) in {s['seconds']} s; ranks agree: "
             f"{s['ranks_agree']}; mean |change| {s['mean_abs_change']:.4g}"]
    if "before" in s:
        lines.append(f"  {s['val']}: top-1 {s['before']['top1']:.2f}% -> {s['after']['top1']:.2f}% "
                     f"({s['after']['count']} samples)")
    lines.append(f"  wrote {s['out']}")
    return "\n".join(lines)
