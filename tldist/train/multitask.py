"""Multi-task heads (``model.heads=separate``): one backbone, one classification head per train set.

The heads are slices of the model's single output layer: with tasks of ``C_0, C_1, ...`` classes
the layer has ``sum(C_t)`` outputs and task ``t`` owns columns ``[offset_t, offset_t + C_t)``. Rows
of a linear layer are independent parameters, so this *is* one head per task - what makes the
difference from a merged head is that each sample's softmax and loss only see its own task's
columns. Keeping one layer means the model factory, transfer strategies, param groups (head LR),
checkpoints, DDP/FSDP and export need no change.

Every train batch carries ``source`` (the index of its ``data.train`` entry, from the mixture
loader) and labels in the loader's merged class space; :class:`TaskHeads` maps them to the task's
own label, computes ``sum_t w_t * sum_{i in t} CE(logits_i[t-slice], y_i) / B`` (``w_t`` from
``train.task_weights``; how *often* each task is drawn is ``data.train_weights``), and tells the
evaluation which slice scores which val set (``data.val_sets[i]`` belongs to ``data.train[i]``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from tldist.data.manifest import eval_set_names, load_manifest, shard_set_id
from tldist.data.pipeline import merge_classes
from tldist.errors import ConfigError


class TaskHeads:
    """Task slices of the output layer, label mapping, the weighted per-task loss and eval binding."""

    def __init__(self, names: Sequence[str], class_lists: Sequence[Sequence[str]],
                 label_maps: Sequence[Optional[Sequence[int]]], merged_size: int,
                 weights: Sequence[float] = ()):
        if weights and len(weights) != len(names):
            raise ConfigError(f"config key 'train.task_weights' has {len(weights)} values for {len(names)} "
                              "data.train entries: give one loss weight per entry")
        if any(w <= 0 for w in weights):
            raise ConfigError(f"config key 'train.task_weights' has bad value {list(weights)}: weights must be > 0")
        self.names = list(names)
        """Task names (distinct: :func:`tldist.data.manifest.eval_set_names` of the ``data.train`` entries)."""
        self.class_lists = [list(c) for c in class_lists]
        self.offsets = [sum(len(c) for c in self.class_lists[:t]) for t in range(len(self.class_lists))]
        self.num_outputs = sum(len(c) for c in self.class_lists)
        self.weights = [float(w) for w in weights] or [1.0] * len(self.names)
        # loader label (merged class space) of a sample from task t -> its column in the output layer
        table = torch.full((len(self.names), max(merged_size, 1)), -1, dtype=torch.int64)
        for t, (classes, lmap) in enumerate(zip(self.class_lists, label_maps)):
            for local in range(len(classes)):
                table[t, lmap[local] if lmap is not None else local] = self.offsets[t] + local
        self._table = table
        self._task_of_column = torch.cat([torch.full((len(c),), t) for t, c in enumerate(self.class_lists)])
        self.eval_task: dict[str, int] = {}
        """Eval set name -> task index (filled by :meth:`bind_eval`)."""

    @property
    def classes(self) -> list[str]:
        """Output column names: ``<task>:<class>`` in column order."""
        return [f"{n}:{c}" for n, cl in zip(self.names, self.class_lists) for c in cl]

    def span(self, task: int) -> tuple[int, int]:
        """Columns ``[lo, hi)`` of ``task``'s head."""
        return self.offsets[task], self.offsets[task] + len(self.class_lists[task])

    def columns(self, labels: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Output column of each sample's label (loader labels are in the merged class space)."""
        table = self._table.to(labels.device)
        cols = table[source.to(labels.device), labels]
        if bool((cols < 0).any()):
            raise RuntimeError("a training label does not belong to its sample's task: the loader's class "
                               "merging and the task heads disagree")
        return cols

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, source: torch.Tensor,
             label_smoothing: float = 0.0) -> torch.Tensor:
        """``sum_t w_t * sum_{i in task t} CE(logits_i[t's columns], label_i) / batch``."""
        cols = self.columns(labels, source)
        source = source.to(labels.device)
        total = logits.new_zeros((), dtype=torch.float32)
        for t in torch.unique(source).tolist():
            rows = source == t
            lo, hi = self.span(t)
            ce = F.cross_entropy(logits[rows, lo:hi].float(), cols[rows] - lo, reduction="sum",
                                 label_smoothing=label_smoothing)
            total = total + self.weights[t] * ce
        return total / max(labels.numel(), 1)

    def bind_eval(self, name: str, task: int) -> list[str]:
        """Score eval set ``name`` with ``task``'s head; returns that task's classes (to map val labels by name).

        Raises :class:`ConfigError` when ``name`` is already bound to another task (two eval sets
        under one name would overwrite each other's scores and the mean ``eval/top1``).
        """
        if not 0 <= task < len(self.names):
            raise ConfigError(f"eval set '{name}' is bound to task {task}, but there are {len(self.names)} tasks "
                              "(data.val_sets[i] is scored with the head of data.train[i])")
        if self.eval_task.get(name, task) != task:
            raise ConfigError(f"eval set name '{name}' is used for the heads of tasks {self.eval_task[name]} and "
                              f"{task}: give data.val_sets entries distinct paths")
        self.eval_task[name] = task
        return list(self.class_lists[task])

    def eval_span(self, name: str) -> tuple[int, int]:
        """Output columns ``[lo, hi)`` scoring eval set ``name`` (bound with :meth:`bind_eval`)."""
        return self.span(self.eval_task[name])

    def state(self) -> list[dict[str, Any]]:
        """What a checkpoint records about the heads (``trainer.json``), for export and inspection."""
        return [{"name": n, "classes": c, "offset": o, "loss_weight": w}
                for n, c, o, w in zip(self.names, self.class_lists, self.offsets, self.weights)]


def build_task_heads(data_cfg, weights: Sequence[float] = ()) -> TaskHeads:
    """One task per ``data.train`` entry, with the label maps the train loader applies (same merge)."""
    manifests = [load_manifest(loc) for loc in data_cfg.train]
    merged, maps = merge_classes(manifests)
    locations = [str(loc) for loc in data_cfg.train]
    if len({shard_set_id(loc) for loc in locations}) == len(locations):
        names = eval_set_names(locations)  # distinct path tails
    else:  # the same set twice: nothing in the paths tells the tasks apart
        names = [f"task{t}" for t in range(len(locations))]
    return TaskHeads(names, [m.classes for m in manifests], maps, len(merged), weights)
