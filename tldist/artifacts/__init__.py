"""What a run leaves on disk, and how any path a user gives is read back.

- :mod:`~tldist.artifacts.layout`: the file names of a run directory, a checkpoint and an export;
- :mod:`~tldist.artifacts.checkpoint`: atomic, resumable checkpoints (:class:`CheckpointManager`);
- :mod:`~tldist.artifacts.lock`: one run per output directory (:func:`claim_output_dir`);
- :mod:`~tldist.artifacts.export`: the model record (``model.json``) and the export-directory format;
- :mod:`~tldist.artifacts.resolve`: any path (export, checkpoint, run dir, weights file) -> the model it holds.
"""

from tldist.artifacts.checkpoint import CheckpointManager, best_checkpoint, latest_checkpoint
from tldist.artifacts.export import model_record, read_export_meta, write_export
from tldist.artifacts.layout import RunDir
from tldist.artifacts.lock import acquire_run_lock, claim_output_dir
from tldist.artifacts.resolve import Artifact, LoadedModel, build_configured_model, load_model, resolve

__all__ = [
    "Artifact",
    "CheckpointManager",
    "LoadedModel",
    "RunDir",
    "acquire_run_lock",
    "best_checkpoint",
    "build_configured_model",
    "claim_output_dir",
    "latest_checkpoint",
    "load_model",
    "model_record",
    "read_export_meta",
    "resolve",
    "write_export",
]
