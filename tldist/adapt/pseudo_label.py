"""``tldist pseudo-label``: a teacher labels unlabelled shards; confident predictions become a shard set.

Every rank scores its exact part of the unlabelled set (:func:`tldist.data.pipeline.build_eval_loader`:
each sample once across ranks x workers, a contiguous range of the manifest order per rank, padding and
undecodable samples masked out). Predictions whose max softmax probability reaches ``threshold`` are
candidates; optional balancing keeps the most confident ones per class up to a common cap. No rank holds
another rank's candidates: the ranks agree on per-class counts (an all-reduce of ``classes`` integers) and,
under a cap, on each capped class's confidence cut-off by bisection over the float32 confidences (about 31
all-reduces of ``classes`` integers; only candidates tied exactly at a cut-off are exchanged, to break the tie
by key). Each rank then streams its own range of the unlabelled shards once, picks its kept samples' image
bytes by key and writes them as shards; rank 0 renames the parts into one ``train`` shard set and merges
their manifests. The manifest's ``meta.pseudo_label`` records the threshold, the teacher, the counts per
class and - when the unlabelled shards carry true labels - the pseudo-label precision.

The next round is ordinary fine-tuning on a mixture, no new training code::

    tldist train cfg.yaml data.train=[labelled,pseudo] data.train_weights=[0.5,0.5]

True labels: ``tldist shards`` always stores a ``.cls`` per sample. If the unlabelled set was
written with the teacher's class names, those labels are taken as ground truth and used *only* to
report precision (never for selection); pass ``ignore_labels`` (``--ignore-labels``) when they are
placeholders, or write the set with ``meta.true_labels = false``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

import tldist
from tldist.artifacts.export import check_out_dir
from tldist.artifacts.resolve import LoadedModel, load_model
from tldist.config import DataConfig
from tldist.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, load_manifest
from tldist.data.pipeline import build_eval_loader
from tldist.data.sources import Sample, SampleSource
from tldist.data.stream import slot_range
from tldist.data.subset import samples_by_key
from tldist.data.transforms import Normalizer, preprocess_crop_pct
from tldist.data.writer import prepare_out, write_shards
from tldist.errors import ConfigError, DataError
from tldist.world import (World, all_reduce_max, all_reduce_sum, barrier, gather_objects, setup_logging, start_world,
                          world_of)

log = logging.getLogger("tldist")

Candidate = tuple[str, int, float, int]
"""``(key, predicted class, confidence, true class or -1)``."""


def check_options(threshold: float, max_per_class: int, batch_size: int, num_workers: int) -> None:
    """Reject impossible option values before any work (raises :class:`ConfigError` naming the flag)."""
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and 0.0 < threshold <= 1.0):
        raise ConfigError(f"--threshold {threshold} is outside (0, 1]: it is compared with the max softmax "
                          "probability, which never exceeds 1; use e.g. --threshold 0.9")
    if max_per_class < 0:
        raise ConfigError(f"--max-per-class {max_per_class} must be >= 0 (0: no cap)")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1")
    if num_workers < 0:
        raise ConfigError(f"--num-workers {num_workers} must be >= 0")


def teacher_classes(loaded: LoadedModel, manifest, unlabelled: str, model: str) -> list[str]:
    """The teacher's class names (from its metadata; the manifest's when the model recorded none)."""
    classes = list(loaded.meta.get("classes") or [])
    n = int(loaded.meta["num_classes"])
    if classes and len(classes) == n:
        return classes
    if manifest.num_classes == n:
        return list(manifest.classes)
    raise ConfigError(f"--model '{model}' records no class names and has {n} outputs, but --unlabelled "
                      f"'{unlabelled}' lists {manifest.num_classes} classes: re-export the teacher from its run "
                      "directory ('tldist export RUN OUT') so the class names are known")


def labels_are_true(manifest, classes: list[str], unlabelled: str, model: str, ignore_labels: bool) -> bool:
    """Whether the unlabelled set's labels (``.cls``, or what its manifest's ``meta.labels`` names:
    :attr:`~tldist.data.manifest.Manifest.label_rule`) are real labels in the teacher's class space; never for a
    set indexed with ``--label none``.

    Raises :class:`ConfigError` when they claim classes the teacher does not have.
    """
    if ignore_labels or manifest.meta.get("true_labels") is False or not manifest.label_rule.labelled:
        return False
    unknown = [c for c in manifest.classes if c not in classes]
    if unknown:
        raise ConfigError(
            f"--unlabelled '{unlabelled}' has {manifest.num_classes} classes ({_names(manifest.classes)}) but the "
            f"teacher '{model}' has {len(classes)} ({_names(classes)}); {_names(unknown)} are not among them. "
            "Write the unlabelled set with the teacher's class names, or pass --ignore-labels if its labels "
            "are placeholders")
    return True


@torch.no_grad()
def score(loaded: LoadedModel, loader, device, threshold: float,
          true_labels: bool) -> tuple[list[Candidate], dict[str, Any]]:
    """This rank's candidates (confidence >= ``threshold``) and counts over its scored samples."""
    pre = loaded.meta["preprocess"]
    normalize = Normalizer(pre["mean"], pre["std"], device=device)
    model = loaded.model.to(device).eval()
    n_classes = int(loaded.meta["num_classes"])
    candidates: list[Candidate] = []
    scored, correct, max_conf = 0, 0, 0.0
    predicted = [0] * n_classes
    for batch in loader:
        mask = batch["mask"]
        if not bool(mask.any()):
            continue  # padding batch (the model is not wrapped: no collective to keep in step)
        conf, pred = model(normalize(batch["image"][mask].to(device))).float().softmax(-1).max(-1)
        conf, pred = conf.cpu().tolist(), pred.cpu().tolist()
        truth = batch["label"][mask].tolist() if true_labels else [-1] * len(pred)
        keys = [k for k, m in zip(batch["key"], mask.tolist()) if m]
        for key, p, c, t in zip(keys, pred, conf, truth):
            scored += 1
            predicted[p] += 1
            correct += int(p == t)
            max_conf = max(max_conf, c)
            if c >= threshold:
                candidates.append((key, int(p), float(c), int(t)))
    stats = loader.stats()
    return candidates, {"scored": scored, "failed": stats["skipped"], "correct": correct, "max_conf": max_conf,
                        "predicted": predicted}


def select(candidates: list[Candidate], num_classes: int, *, balance: bool,
           max_per_class: int) -> tuple[list[Candidate], Optional[int]]:
    """Keep the most confident candidates per class up to a cap; returns ``(kept, cap)`` (call on every rank;
    ``candidates`` are this rank's, ``kept`` this rank's share of the job-wide selection).

    The cap is ``max_per_class`` (0: none), lowered with ``balance`` to the smallest non-zero per-class count
    over all ranks. The selection is that of sorting every rank's candidates together by confidence
    descending, then key, and keeping each class's first ``cap``; it is found without moving candidates:
    per-class counts are all-reduced, and each capped class's cut-off confidence is bisected over float32 bit
    patterns (ordered like the values, as confidences are positive), one all-reduce of ``num_classes`` counts
    per bisection step. Candidates tied exactly at a cut-off are the only ones exchanged (their keys).
    """
    cls = np.fromiter((c[1] for c in candidates), dtype=np.int64, count=len(candidates))
    bits = np.array([c[2] for c in candidates], dtype=np.float32).view(np.int32).astype(np.int64)
    counts = all_reduce_sum(torch.from_numpy(np.bincount(cls, minlength=num_classes))).numpy()
    cap: Optional[int] = max_per_class or None
    if balance and counts.any():
        smallest = int(counts[counts > 0].min())
        cap = smallest if cap is None else min(cap, smallest)
    if cap is None:
        return sorted(candidates, key=lambda c: (c[1], -c[2], c[0])), cap
    over = counts > cap  # classes whose candidates are cut
    lo = np.zeros(num_classes, dtype=np.int64)  # count(bits >= lo) >= cap holds for every class over the cap
    hi = np.full(num_classes, np.float32(np.inf).view(np.int32), dtype=np.int64)  # and fails at hi
    while multi_any(over & (hi - lo > 1)):
        mid = (lo + hi) // 2
        local = np.bincount(cls[bits >= mid[cls]], minlength=num_classes)
        above = all_reduce_sum(torch.from_numpy(local)).numpy()
        ok = above >= cap
        lo, hi = np.where(over & ok, mid, lo), np.where(over & ~ok, mid, hi)
    cut = np.where(over, lo, -1)  # keep bits > cut, and the first (cap - count(bits > cut)) ties by key
    strictly = all_reduce_sum(torch.from_numpy(np.bincount(cls[bits > cut[cls]], minlength=num_classes))).numpy()
    tied = [c for c, b in zip(candidates, bits) if over[c[1]] and b == cut[c[1]]]
    chosen: set[str] = set()
    if multi_any(np.asarray([bool(tied)])):
        by_class: dict[int, list[str]] = {}
        for part in gather_objects([(c[1], c[0]) for c in tied]):
            for k, key in part:
                by_class.setdefault(k, []).append(key)
        for k, keys in by_class.items():
            chosen.update(sorted(keys)[: cap - int(strictly[k])])
    kept = [c for c, b in zip(candidates, bits) if not over[c[1]] or b > cut[c[1]] or c[0] in chosen]
    return sorted(kept, key=lambda c: (c[1], -c[2], c[0])), cap


def multi_any(flags: np.ndarray) -> bool:
    """Whether any flag is set on any rank (call on every rank)."""
    return bool(all_reduce_sum(torch.tensor([int(np.any(flags))], dtype=torch.int64)).item())


def pseudo_label(model: str, unlabelled: str, out: str, *, threshold: float = 0.9, balance: bool = False,
                 max_per_class: int = 0, ignore_labels: bool = False, batch_size: int = 64, num_workers: int = 1,
                 shards: int = 0, weights: Optional[str] = None) -> dict[str, Any]:
    """Label ``unlabelled`` with the teacher ``model`` and write the confident samples to ``out``.

    Call on every rank (alone, or under ``accelerate launch``/``torchrun``); returns the summary that
    also goes into the new manifest's ``meta.pseudo_label`` (identical on every rank). Raises
    :class:`ConfigError`/:class:`DataError`/:class:`UserError` for bad options, paths, class lists,
    an empty unlabelled set or no prediction reaching the threshold. ``weights``: ``raw`` or ``ema`` of
    a teacher checkpoint or run (default: what it judged best).
    """
    check_options(threshold, max_per_class, batch_size, num_workers)
    check_out_dir(out, {"--unlabelled": unlabelled, "--model": model})
    manifest = load_manifest(unlabelled)
    if manifest.num_samples == 0:
        raise DataError(f"--unlabelled '{unlabelled}' holds no samples (its manifest counts 0): "
                        "nothing to pseudo-label; point it at a non-empty shard set")
    accelerator = start_world()
    setup_logging(accelerator.is_main_process)
    loaded = load_model(model, weights=weights, single_head="pseudo-labelling")
    classes = teacher_classes(loaded, manifest, unlabelled, model)
    true_labels = labels_are_true(manifest, classes, unlabelled, model, ignore_labels)
    pre = loaded.meta["preprocess"]
    data_cfg = DataConfig(batch_size=batch_size, eval_batch_size=batch_size, num_workers=num_workers)
    loader = build_eval_loader(data_cfg, world_of(accelerator), image_size=int(pre["image_size"]),
                               interpolation=pre.get("interpolation", "bilinear"), crop_pct=preprocess_crop_pct(pre),
                               location=unlabelled,
                               classes=classes if true_labels else None)
    if accelerator.is_main_process:
        log.info("pseudo-labelling %d samples of %s with %s (%s), threshold %.3f, %d process(es)",
                 manifest.num_samples, unlabelled, loaded.path, loaded.artifact.describe(), threshold,
                 accelerator.num_processes)

    world = world_of(accelerator)
    local, stats = score(loaded, loader, accelerator.device, threshold, true_labels)
    n = len(classes)
    totals = all_reduce_sum(torch.tensor([stats["scored"], stats["failed"], stats["correct"], len(local)],
                                         dtype=torch.int64)).tolist()
    total = dict(zip(("scored", "failed", "correct", "above"), totals))
    max_conf = float(all_reduce_max(torch.tensor([stats["max_conf"]], dtype=torch.float64)).item())
    if total["scored"] == 0:
        raise DataError(f"none of the {manifest.num_samples} samples of --unlabelled '{unlabelled}' could be "
                        f"decoded ({total['failed']} failed); check it with 'tldist shards verify'")
    if total["above"] == 0:
        raise DataError(f"no prediction of '{model}' on the {total['scored']} samples of '{unlabelled}' reached "
                        f"--threshold {threshold} (highest confidence {max_conf:.4f}); lower --threshold or "
                        "train a better teacher")
    kept, cap = select(local, n, balance=balance, max_per_class=max_per_class)
    # job-wide figures from per-rank sums: [kept per class, kept hits per class, hits above threshold, conf sum]
    sums = torch.zeros(2 * n + 2, dtype=torch.float64)
    for c in kept:
        sums[c[1]] += 1
        sums[n + c[1]] += int(c[1] == c[3])
        sums[2 * n + 1] += c[2]
    sums[2 * n] = sum(int(c[1] == c[3]) for c in local)
    sums = all_reduce_sum(sums)
    counts = [int(v) for v in sums[:n].tolist()]
    hits = [int(v) for v in sums[n:2 * n].tolist()]
    num_kept = sum(counts)
    empty = [classes[i] for i, k in enumerate(counts) if k == 0]
    if empty and accelerator.is_main_process:
        log.warning("no pseudo-label reached the threshold for %d class(es): %s", len(empty), _names(empty))
    summary: dict[str, Any] = {
        "teacher": loaded.path, "teacher_kind": loaded.kind, "teacher_weights": loaded.artifact.describe(),
        "unlabelled": str(unlabelled), "threshold": threshold,
        "balance": balance, "max_per_class": max_per_class, "cap_per_class": cap,
        "scored": total["scored"], "failed": total["failed"], "above_threshold": total["above"], "kept": num_kept,
        "coverage": num_kept / total["scored"], "mean_confidence": float(sums[2 * n + 1]) / num_kept,
        "counts_per_class": dict(zip(classes, counts)), "true_labels": true_labels,
        "precision": None, "precision_above_threshold": None, "teacher_top1": None,
        "world_size": accelerator.num_processes, "out": str(out),
    }
    if true_labels:  # labels are used for these numbers only, never for selection
        summary["precision"] = 100.0 * sum(hits) / num_kept
        summary["precision_above_threshold"] = 100.0 * float(sums[2 * n]) / total["above"]
        summary["teacher_top1"] = 100.0 * total["correct"] / total["scored"]
        summary["precision_per_class"] = {classes[i]: (100.0 * hits[i] / counts[i] if counts[i] else None)
                                          for i in range(n)}
    written = write_pseudo_shards(manifest, kept, out, classes, summary, world=world, num_workers=num_workers,
                                  shards=shards or len(manifest.shards))
    summary.update(shards=len(written.shards), num_samples=written.num_samples)
    return summary


def write_pseudo_shards(manifest, kept: list[Candidate], out: str | Path, classes: list[str],
                        summary: dict[str, Any], *, world: World, num_workers: int, shards: int = 1) -> Manifest:
    """Write this rank's kept samples, then (rank 0) merge every rank's part into one shard set (call on every
    rank; returns the merged manifest on every rank).

    Each rank streams only its own range of the unlabelled shards (the one its eval loader scored) and writes
    its samples, image bytes as stored (no re-encode), to ``out/.ranks/rank<r>``, with about
    ``shards x its share of the kept samples`` shards. Rank 0 then renames the parts' tars into ``out`` as
    ``train-%06d.tar`` in rank order and writes the manifest (shard entries and class counts of the parts),
    last. Raises :class:`DataError` if a kept key is no longer in the shards (they changed while labelling).
    """
    out = Path(out)
    parts = out / ".ranks"
    labels = {c[0]: c[1] for c in kept}
    share = all_reduce_sum(torch.tensor([len(labels)], dtype=torch.int64))
    if world.is_main:
        prepare_out(out, "train")
        shutil.rmtree(parts, ignore_errors=True)  # parts of a killed earlier run
        parts.mkdir(parents=True)
    barrier()
    mine = parts / f"rank{world.rank}"
    if labels:
        lo, hi = rank_range(manifest.num_samples, world, num_workers)

        def generate() -> Iterator[Sample]:
            yield from samples_by_key(manifest, labels, start=lo, end=hi,
                                      missing=f"pseudo-labelled samples were not found again in '{manifest.base}'; did "
                                      "its shards change while labelling? Run pseudo-label again")

        info = {"type": "pseudo-label", "unlabelled": summary["unlabelled"], "teacher": summary["teacher"]}
        n_shards = max(1, min(len(labels), round(shards * len(labels) / max(1, int(share.item())))))
        write_shards(SampleSource(len(labels), generate, info), mine, "train", classes, max_count=None,
                     max_size=None, min_shards=n_shards, check="none")
    barrier()  # every rank's part is written
    if world.is_main:
        merge_parts(parts, out, world.world_size, classes, summary)
    barrier()
    return load_manifest(out)


def rank_range(total: int, world: World, num_workers: int) -> tuple[int, int]:
    """``[lo, hi)`` of the manifest order that this rank's eval loader reads (its workers' contiguous slots,
    :class:`~tldist.data.worker.EvalDataset`)."""
    workers = max(1, num_workers)
    slots = world.world_size * workers
    return (slot_range(total, world.rank * workers, slots)[0],
            slot_range(total, world.rank * workers + workers - 1, slots)[1])


def merge_parts(parts: Path, out: Path, world_size: int, classes: list[str], summary: dict[str, Any]) -> Manifest:
    """Rename the per-rank parts' shards into ``out`` (``train-%06d.tar``, rank order) and write their merged
    manifest last; the parts directory is removed."""
    shard_infos, class_counts, k = [], [0] * len(classes), 0
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # no manifest describes the dir until the new one exists
    for r in range(world_size):
        part = parts / f"rank{r}"
        if not (part / MANIFEST_NAME).is_file():
            continue  # this rank kept nothing
        m = load_manifest(part)
        for info in m.shards:
            name = f"train-{k:06d}.tar"
            os.replace(part / info.name, out / name)
            shard_infos.append(ShardInfo(name, info.num_samples, offsets=info.offsets))
            k += 1
        for i, c in enumerate(m.meta.get("class_counts") or []):
            class_counts[i] += int(c)
    for stale in out.glob("train-*.tar"):
        if stale.name not in {s.name for s in shard_infos}:
            stale.unlink()
    meta = {"tldist_version": tldist.__version__,
            "source": {"type": "pseudo-label", "unlabelled": summary["unlabelled"], "teacher": summary["teacher"]},
            "pseudo_label": summary, "true_labels": False, "class_counts": class_counts, "skipped": 0}
    merged = Manifest(split="train", classes=list(classes), shards=shard_infos, meta=meta, base=str(out))
    merged.save(out / MANIFEST_NAME)
    shutil.rmtree(parts, ignore_errors=True)
    return merged


def format_summary(s: dict[str, Any]) -> str:
    """The summary as a few human-readable lines."""
    lines = [f"pseudo-labels: kept {s['kept']} of {s['scored']} scored samples ({100 * s['coverage']:.1f}%) "
             f"at threshold {s['threshold']}" + (f", cap {s['cap_per_class']}/class" if s["cap_per_class"] else ""),
             "  per class: " + "  ".join(f"{c}:{n}" for c, n in s["counts_per_class"].items())]
    if s["precision"] is not None:
        lines.append(f"  precision {s['precision']:.2f}% (vs. the unlabelled set's true labels; "
                     f"{s['precision_above_threshold']:.2f}% before the cap), teacher top-1 on all "
                     f"{s['scored']}: {s['teacher_top1']:.2f}%")
    lines.append(f"  wrote {s.get('num_samples', s['kept'])} samples in {s.get('shards', '?')} shard(s) to {s['out']}")
    return "\n".join(lines)


def _names(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + ("..." if len(items) > n else "")
