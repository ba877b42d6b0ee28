"""``tldist pseudo-label``: a teacher labels unlabelled shards; confident predictions become a shard set.

Every rank scores its exact part of the unlabelled set (:func:`tldist.data.pipeline.build_eval_loader`:
each sample once across ranks x workers, padding and undecodable samples masked out). Predictions
whose max softmax probability reaches ``threshold`` are candidates; optional balancing keeps the
most confident ones per class up to a common cap. All ranks gather the candidates (so every rank
takes the same decisions and raises the same errors); rank 0 then streams the unlabelled shards
once, picks the kept samples' image bytes by key and writes them, with their pseudo-labels, as a
new ``train`` shard set whose manifest ``meta.pseudo_label`` records the threshold, the teacher,
the counts per class and - when the unlabelled shards carry true labels - the pseudo-label precision.

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
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from tldist.adapt import LoadedModel, check_out_dir, init_distributed, load_model, on_main
from tldist.errors import ConfigError, DataError

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
    """Whether the unlabelled set's ``.cls`` fields are real labels in the teacher's class space.

    Raises :class:`ConfigError` when they claim classes the teacher does not have.
    """
    if ignore_labels or manifest.meta.get("true_labels") is False:
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
    from tldist.data.transforms import Normalizer

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
    """Keep the most confident candidates per class up to a cap; returns ``(kept, cap)``.

    The cap is ``max_per_class`` (0: none), lowered with ``balance`` to the smallest non-zero
    per-class count. Order is deterministic: confidence descending, then key.
    """
    by_class: list[list[Candidate]] = [[] for _ in range(num_classes)]
    for c in candidates:
        by_class[c[1]].append(c)
    cap: Optional[int] = max_per_class or None
    if balance:
        present = [len(v) for v in by_class if v]
        if present:
            cap = min(present) if cap is None else min(cap, min(present))
    kept: list[Candidate] = []
    for rows in by_class:
        rows.sort(key=lambda c: (-c[2], c[0]))
        kept.extend(rows if cap is None else rows[:cap])
    return kept, cap


def pseudo_label(model: str, unlabelled: str, out: str, *, threshold: float = 0.9, balance: bool = False,
                 max_per_class: int = 0, ignore_labels: bool = False, batch_size: int = 64, num_workers: int = 1,
                 shards: int = 0) -> dict[str, Any]:
    """Label ``unlabelled`` with the teacher ``model`` and write the confident samples to ``out``.

    Call on every rank (alone, or under ``accelerate launch``/``torchrun``); returns the summary that
    also goes into the new manifest's ``meta.pseudo_label`` (identical on every rank). Raises
    :class:`ConfigError`/:class:`DataError`/:class:`UserError` for bad options, paths, class lists,
    an empty unlabelled set or no prediction reaching the threshold.
    """
    from tldist.config import DataConfig
    from tldist.data.manifest import load_manifest
    from tldist.data.pipeline import build_eval_loader
    from tldist.data.transforms import preprocess_crop_pct
    from tldist.train.checkpoint import gather_objects
    from tldist.train.distributed import world_of

    check_options(threshold, max_per_class, batch_size, num_workers)
    check_out_dir(out, {"--unlabelled": unlabelled, "--model": model})
    manifest = load_manifest(unlabelled)
    if manifest.num_samples == 0:
        raise DataError(f"--unlabelled '{unlabelled}' holds no samples (its manifest counts 0): "
                        "nothing to pseudo-label; point it at a non-empty shard set")
    accelerator = init_distributed()
    loaded = load_model(model)
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
                 manifest.num_samples, unlabelled, loaded.path, loaded.kind, threshold, accelerator.num_processes)

    local, stats = score(loaded, loader, accelerator.device, threshold, true_labels)
    parts = gather_objects((local, stats))  # every rank: same inputs -> same decisions and errors
    candidates = sorted((c for cands, _ in parts for c in cands), key=lambda c: c[0])
    total = {k: sum(s[k] for _, s in parts) for k in ("scored", "failed", "correct")}
    max_conf = max(s["max_conf"] for _, s in parts)
    if total["scored"] == 0:
        raise DataError(f"none of the {manifest.num_samples} samples of --unlabelled '{unlabelled}' could be "
                        f"decoded ({total['failed']} failed); check it with 'tldist shards verify'")
    if not candidates:
        raise DataError(f"no prediction of '{model}' on the {total['scored']} samples of '{unlabelled}' reached "
                        f"--threshold {threshold} (highest confidence {max_conf:.4f}); lower --threshold or "
                        "train a better teacher")
    kept, cap = select(candidates, len(classes), balance=balance, max_per_class=max_per_class)
    counts = [0] * len(classes)
    for c in kept:
        counts[c[1]] += 1
    empty = [classes[i] for i, n in enumerate(counts) if n == 0]
    if empty and accelerator.is_main_process:
        log.warning("no pseudo-label reached the threshold for %d class(es): %s", len(empty), _names(empty))
    summary: dict[str, Any] = {
        "teacher": loaded.path, "teacher_kind": loaded.kind, "unlabelled": str(unlabelled), "threshold": threshold,
        "balance": balance, "max_per_class": max_per_class, "cap_per_class": cap,
        "scored": total["scored"], "failed": total["failed"], "above_threshold": len(candidates), "kept": len(kept),
        "coverage": len(kept) / total["scored"], "mean_confidence": sum(c[2] for c in kept) / len(kept),
        "counts_per_class": dict(zip(classes, counts)), "true_labels": true_labels,
        "precision": None, "precision_above_threshold": None, "teacher_top1": None,
        "world_size": accelerator.num_processes, "out": str(out),
    }
    if true_labels:  # labels are used for these numbers only, never for selection
        summary["precision"] = 100.0 * sum(c[1] == c[3] for c in kept) / len(kept)
        summary["precision_above_threshold"] = 100.0 * sum(c[1] == c[3] for c in candidates) / len(candidates)
        summary["teacher_top1"] = 100.0 * total["correct"] / total["scored"]
        per_class_hits = [0] * len(classes)
        for c in kept:
            per_class_hits[c[1]] += int(c[1] == c[3])
        summary["precision_per_class"] = {classes[i]: (100.0 * per_class_hits[i] / counts[i] if counts[i] else None)
                                          for i in range(len(classes))}

    def write() -> dict[str, Any]:
        written = write_pseudo_shards(manifest, {c[0]: c[1] for c in kept}, out, classes, summary,
                                      shards=shards or len(manifest.shards))
        return {"shards": len(written.shards), "num_samples": written.num_samples}

    summary.update(on_main(write, is_main=accelerator.is_main_process))
    accelerator.wait_for_everyone()
    return summary


def write_pseudo_shards(manifest, labels: dict[str, int], out: str | Path, classes: list[str],
                        summary: dict[str, Any], *, shards: int = 1):
    """Stream the unlabelled shards once and write the samples named in ``labels`` with those labels.

    Image bytes are copied as stored (no re-encode). Raises :class:`DataError` if a kept key is
    no longer in the shards (they changed while labelling).
    """
    from tldist.data.sources import Sample, SampleSource
    from tldist.data.subset import samples_by_key
    from tldist.data.writer import write_shards

    def generate() -> Iterator[Sample]:
        yield from samples_by_key(manifest, labels, missing=f"pseudo-labelled samples were not found again in "
                                  f"'{manifest.base}'; did its shards change while labelling? Run pseudo-label again")

    info = {"type": "pseudo-label", "unlabelled": summary["unlabelled"], "teacher": summary["teacher"]}
    source = SampleSource(len(labels), generate, info)
    return write_shards(source, out, "train", classes, max_count=None, max_size=None,
                        min_shards=max(1, min(shards, len(labels))), check="none",
                        meta={"pseudo_label": summary, "true_labels": False})  # the labels are predictions


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
