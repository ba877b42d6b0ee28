"""W&B artifacts of tldist's runs, and the link from a model to the W&B run that trained it.

- A checkpoint or export directory is an artifact of type ``model`` (:func:`model_artifact`), logged as a
  **reference** (``file://`` URI, ``checksum=False``): no bytes are copied or read, the jobs share the
  storage the directory is on, and the URI names the contents (a checkpoint directory is renamed into
  place complete and never written again; :mod:`tldist.artifacts.checkpoint`). A checkpoint that the run
  prunes later leaves its artifact dangling, as any W&B reference to a deleted file.
- A shard set's manifest is an artifact of type ``dataset`` (:func:`dataset_artifact`): a reference to
  ``manifest.json`` with its MD5, so the artifact's version changes exactly when the data does.
- The **link** ``{"run_id", "project", "entity", "group"}`` of the training run is written to the run's
  ``tracker.json`` and to every checkpoint's model record (key :data:`LINK_KEY`, carried into exports), so
  that ``tldist eval``/``export``/``compress``/``adapt``/``pseudo-label`` runs join the training run's group
  and name the model artifact they used (:func:`training_link`, :mod:`tldist.train.job_runs`).

Offline (``WANDB_MODE=offline``, the default) every artifact goes into the run's transaction log and
``wandb sync`` uploads it. wandb refuses ``run.use_artifact`` offline (it asks the server), so an input
(the manifests a training run read, the model a job used) is marked used online and logged offline
(:func:`use_artifact`): synced, it then shows as the run's output, with the same version (same digest).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Optional

from tldist.artifacts import layout
from tldist.artifacts.resolve import Artifact
from tldist.data.manifest import MANIFEST_NAME, eval_set_names
from tldist.errors import UserError
from tldist.safeload import read_json

log = logging.getLogger("tldist")

MODEL = "model"
"""Artifact type of checkpoints and exports (W&B's model registry takes this type)."""
DATASET = "dataset"
"""Artifact type of shard manifests."""
LINK_KEY = "tracker"
"""Key of the training run's link in a model record (``model.json``)."""
_LINK_FIELDS = ("run_id", "project", "entity", "group")


def artifact_name(text: str) -> str:
    """``text`` as a W&B artifact name: letters, digits, ``-``, ``_`` and ``.`` (others become ``-``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "unnamed"


def model_collection(kind: str, record: dict[str, Any]) -> str:
    """The artifact collection a model directory belongs to: ``model`` (a run's checkpoints), ``compress``
    (a pruned or quantized export: its record has ``compression`` or ``quantization``), ``adapt`` (``adabn``),
    else ``export``."""
    if kind == "checkpoint":
        return "model"
    if "compression" in record or "quantization" in record:
        return "compress"
    return "adapt" if "adabn" in record else "export"


def model_artifact_name(link: Optional[dict[str, Any]], path: str | Path, collection: str = "model") -> str:
    """``<collection>-<run id>`` (:func:`model_collection`: ``model-<id>`` for the run's checkpoints,
    ``export-<id>`` for exports made from them...; a version per directory, so that the aliases ``best``,
    ``latest``, ``step-<N>`` of one collection name one kind of thing); without a link,
    ``<collection>-<the directory's name>``."""
    if link and link.get("run_id"):
        return f"{collection}-{link['run_id']}"
    return artifact_name(f"{collection}-{Path(path).name}")


def model_artifact(wandb: Any, path: str | Path, name: str, *, metadata: Optional[dict[str, Any]] = None) -> Any:
    """A ``model`` artifact referencing directory (or file) ``path`` by ``file://`` URI, nothing read or copied."""
    artifact = wandb.Artifact(name, type=MODEL, metadata=dict(metadata or {}))
    artifact.add_reference(Path(path).resolve().as_uri(), checksum=False)
    return artifact


def manifest_uri(location: str) -> tuple[str, bool]:
    """(URI of the ``manifest.json`` of shard-set ``location``, whether W&B may read it for a checksum): a local
    file is checksummed (its MD5 is the data version), an http(s) one is not (no network offline)."""
    loc = str(location)
    if "://" in loc:
        return (loc if loc.endswith(".json") else loc.rstrip("/") + "/" + MANIFEST_NAME), False
    p = Path(loc).expanduser()
    return (p / MANIFEST_NAME if p.is_dir() else p).resolve().as_uri(), True


def dataset_artifact(wandb: Any, location: str, *, role: str) -> Any:
    """A ``dataset`` artifact referencing the manifest of shard set ``location`` (``role``: ``train``, ``val``...),
    named after the set's path tail (``digits/val`` -> ``digits-val``, :func:`tldist.data.manifest.eval_set_names`)."""
    name = artifact_name(eval_set_names([location], reserved=())[0].replace("/", "-"))
    uri, checksum = manifest_uri(location)
    artifact = wandb.Artifact(name, type=DATASET, metadata={"location": str(location), "role": role})
    artifact.add_reference(uri, name=MANIFEST_NAME, checksum=checksum)
    return artifact


def use_artifact(run: Any, artifact: Any) -> None:
    """Mark ``artifact`` (a draft) as an input of ``run``: ``run.use_artifact`` online; offline, where wandb
    refuses it, ``run.log_artifact`` (see the module docstring)."""
    if run.offline:
        run.log_artifact(artifact)
    else:
        run.use_artifact(artifact)


# ---------------------------------------------------------------------------------------- the link
def link_of(run_id: str, project: str, entity: Optional[str], group: Optional[str]) -> dict[str, Any]:
    """The link of a training run (written to ``tracker.json`` and the model record)."""
    return {"run_id": run_id, "project": project, "entity": entity, "group": group}


def training_run_dir(art: Artifact) -> Optional[Path]:
    """The run directory a model path came from: the ``step_*`` directory's run, or for an export the run of
    its ``source_checkpoint``; None when unknown (a weights file, a moved export)."""
    candidates = [art.path] if art.kind == "checkpoint" else []
    source = art.record.get("source_checkpoint")
    if isinstance(source, str):
        candidates.append(Path(source))
    for step_dir in candidates:
        if step_dir.parent.name == layout.CHECKPOINTS:
            return step_dir.parent.parent
    return None


def training_link(art: Artifact) -> Optional[dict[str, Any]]:
    """The link of the W&B run that trained the model at ``art``: from its model record, else from its run
    directory's ``tracker.json`` (older checkpoints); None when it was not tracked."""
    recorded = art.record.get(LINK_KEY)
    if isinstance(recorded, dict) and recorded.get("run_id"):
        return {k: recorded.get(k) for k in _LINK_FIELDS}
    run_dir = training_run_dir(art)
    if run_dir is not None and (run_dir / layout.TRACKER).is_file():
        try:
            saved = read_json(run_dir / layout.TRACKER, what="W&B run record")
        except UserError as e:  # an unreadable record only loses the link
            log.warning("W&B: %s", e)
            return None
        if isinstance(saved, dict) and saved.get("run_id"):
            return {k: saved.get(k) for k in _LINK_FIELDS}
    return None
