"""The model card (``README.md``) of an export directory: what the model is, what it was trained and scored on,
and how it was made.

:func:`model_card` reads only files tldist wrote: the export's model record, the checkpoint's ``config.yaml`` and
``trainer.json`` (the training command line, the best metric), the run's ``result.json`` (the final eval
metrics), the shard manifests the config names (local ones; URLs are listed, not fetched), and, for a cell of a
label-budget study (``<study>/runs/<cell>``), the study's ``summary.md``. A file that is missing or unreadable
leaves its section out (``not recorded``): a card never stops an export. The YAML front matter is the Hugging
Face Hub's model-card metadata (``library_name: timm`` makes the Hub show timm's loading snippet).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from tldist.artifacts import layout
from tldist.data.manifest import load_manifest
from tldist.errors import UserError
from tldist.safeload import read_json, read_yaml

STUDY_SUMMARY = "summary.md"
"""A label-budget study's table (:mod:`tldist.study.report`), two levels above each of its run directories."""


def _read(path: Path, reader) -> Optional[Any]:
    try:
        return reader(path) if path.is_file() else None
    except UserError:
        return None


def _json(path: Path) -> Optional[Any]:
    return _read(path, lambda p: read_json(p, what="model card input"))


def _yaml(path: Path) -> Optional[Any]:
    return _read(path, lambda p: read_yaml(p, what="model card input"))


def source_checkpoint(meta: dict[str, Any], artifact_path: Path) -> Optional[Path]:
    """The ``step_*`` checkpoint an export came from: the artifact itself when it is one, else the model
    record's ``source_checkpoint`` when that still exists."""
    if (artifact_path / layout.TRAINER).is_file():
        return artifact_path
    src = meta.get("source_checkpoint")
    if src and (Path(src) / layout.TRAINER).is_file():
        return Path(src)
    return None


def _manifest_rows(config: dict[str, Any]) -> list[str]:
    data = config.get("data") or {}
    roles = [("train", loc) for loc in data.get("train") or []]
    roles += [("val", data["val"])] if data.get("val") else []
    roles += [("val set", loc) for loc in data.get("val_sets") or []]
    rows = []
    for role, loc in roles:
        loc = str(loc)
        if loc.startswith(("http://", "https://")):
            rows.append(f"| {role} | `{loc}` | | | |")
            continue
        try:
            m = load_manifest(loc)
        except Exception:  # noqa: BLE001 - moved or deleted since: the location is still worth stating
            rows.append(f"| {role} | `{loc}` | not readable now | | |")
            continue
        source = m.meta.get("source") if isinstance(m.meta, dict) else None
        if isinstance(source, dict):  # the writer's provenance record: its kind and where it read from
            source = " ".join(str(source[k]) for k in ("type", "name", "root", "path", "url") if source.get(k))
        rows.append(f"| {role} | `{loc}` | {m.num_samples} | {m.num_classes} | {source or ''} |")
    return rows


def _eval_rows(result: Optional[dict[str, Any]], trainer: Optional[dict[str, Any]]) -> list[str]:
    rows = []
    for k, v in sorted((result or {}).items()):
        if k.startswith(("eval/", "eval_ema/")) and isinstance(v, (int, float)) and not k.endswith("/count"):
            rows.append(f"| `{k}` | {v:.4g} |")
    if trainer and trainer.get("best_metric") is not None:
        rows.append(f"| best (step {trainer.get('best_step')}) | {float(trainer['best_metric']):.4g} |")
    return rows


def model_card(meta: dict[str, Any], artifact_path: Path, *, export_command: str, timm_name: Optional[str] = None,
               repo_id: Optional[str] = None) -> str:
    """The ``README.md`` text of an export of the model record ``meta`` made from ``artifact_path`` (a checkpoint,
    run or export directory) by ``export_command``. ``timm_name`` (the timm architecture) adds timm's loading
    snippet and ``library_name: timm``; ``repo_id`` (``--push-to-hub``) names the Hub repository in it."""
    ckpt = source_checkpoint(meta, artifact_path)
    config = (_yaml(ckpt / layout.CONFIG) if ckpt else None) or {}
    trainer = _json(ckpt / layout.TRAINER) if ckpt else None
    run_dir = ckpt.parent.parent if ckpt and ckpt.parent.name == layout.CHECKPOINTS else None
    result = _json(run_dir / layout.RESULT) if run_dir else None
    classes = list(meta.get("classes") or [])
    pre = meta.get("preprocess") or {}
    front = ["---", "tags:", "- image-classification", "- tldist", *(["- timm"] if timm_name else []),
             f"library_name: {'timm' if timm_name else 'pytorch'}", "pipeline_tag: image-classification", "---", ""]
    title = repo_id or Path(str(meta.get("model", "model"))).name
    lines = [*front, f"# {title}", "",
             f"A `{meta.get('model')}` fine-tuned with tldist on {len(classes) or meta.get('num_classes')} classes "
             f"({meta.get('weights', 'raw')} weights"
             + (f", step {meta['step']}" if meta.get("step") is not None else "") + ").", "",
             "## Model", "",
             "| | |", "| --- | --- |",
             f"| architecture | `{meta.get('model')}` |",
             f"| classes | {', '.join(classes[:20])}{', ...' if len(classes) > 20 else ''} |",
             f"| input | {pre.get('image_size')} px, resize {pre.get('resize')} ({pre.get('interpolation')}), "
             f"center crop; mean {pre.get('mean')}, std {pre.get('std')} |",
             f"| weights | {meta.get('weights', 'raw')} |", ""]
    if meta.get("distilled_from") or meta.get("teacher"):
        lines += [f"Distilled from `{meta.get('distilled_from') or meta.get('teacher')}`.", ""]
    rows = _manifest_rows(config) if config else []
    lines += ["## Data", ""]
    lines += (["| role | shard set | samples | classes | source |", "| --- | --- | --- | --- | --- |", *rows, ""]
              if rows else ["Not recorded (no training config beside the weights).", ""])
    evals = _eval_rows(result, trainer)
    lines += ["## Evaluation", ""]
    lines += (["| metric | value |", "| --- | --- |", *evals, ""] if evals
              else ["Not recorded (the run wrote no result.json).", ""])
    summary = run_dir.parent.parent / STUDY_SUMMARY if run_dir and run_dir.parent.name == "runs" else None
    if summary is not None and summary.is_file():
        lines += ["## Study results", "", f"From the label-budget study `{summary.parent}`:", "",
                  summary.read_text().strip(), ""]
    lines += ["## How it was made", "", "```"]
    if trainer and trainer.get("command"):
        ranks = f" (world size {trainer['world_size']})" if trainer.get("world_size") else ""
        lines.append(f"{trainer['command']}    # training{ranks}")
    lines += [f"{export_command}    # this export", "```", ""]
    lines += ["## Use", "", "```python"]
    if timm_name:
        where = f"hf-hub:{repo_id}" if repo_id else "local-dir:PATH/TO/THIS/DIR"
        lines += ["import timm", f"model = timm.create_model({where!r}, pretrained=True).eval()",
                  "cfg = timm.data.resolve_data_config({}, model=model)",
                  "transform = timm.data.create_transform(**cfg)",
                  "label_names = model.pretrained_cfg['label_names']"]
    else:
        lines += ["# tldist predict DIR image.jpg   (or tldist.artifacts.resolve.load_model(DIR))"]
    lines += ["```", "", f"Files: `{layout.WEIGHTS}` (weights), `{layout.MODEL_RECORD}` (tldist's model record)"
              + (", `config.json` (timm's)" if timm_name else "") + ".", ""]
    if config:
        lines += ["<details><summary>Training config</summary>", "", "```json",
                  json.dumps({k: config.get(k) for k in ("model", "transfer", "optim", "train", "data") if k in config},
                             indent=1, default=str), "```", "</details>", ""]
    return "\n".join(lines)
