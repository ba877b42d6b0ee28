"""``tldist study``: a label-budget study on the user's own shards.

For every labels-per-class ``k`` (e.g. 1, 5, 10, all), arm and seed, one training run (a *cell*) on a
seeded, stratified ``k``-per-class subset of the train shards (:mod:`tldist.data.subset`, written once
to ``<out>/subsets/k<k>-seed<s>``), evaluated on the full ``data.val`` set. Arms:

- ``finetune``: the base config's pretrained backbone (``model.checkpoint`` or ``model.pretrained``
  weights), ``transfer.strategy=full``, the base recipe;
- ``probe``: the same backbone, ``transfer.strategy=linear_probe``;
- ``scratch``: ``model.pretrained=false``, no checkpoint, no layer-wise decay or head multiplier, and
  the LR and warm-up picked from a small grid: per ``k``, one grid run per (lr, warm-up) with a tuning
  seed one past the reported seeds (its own subset, init and data order, so no reported scratch run is
  the one selected on val), chosen by final val top-1 (ties: lower lr, then shorter warm-up). The
  grid costs ``len(lr grid) x len(warm-up grid) x steps(k)`` extra steps per ``k`` (none for one point).

Budget: every arm gets the same optimizer steps at a given ``k`` (``train.max_steps``):
``steps(k) = --steps`` when given, else ``max(--min-steps, ceil(--epochs x n_k / global batch))`` with
``n_k = k x classes`` (the full train set for ``all``). Warm-up is a fraction of ``steps(k)``
(``--warmup-fraction`` for finetune/probe, the grid for scratch). Each cell evaluates once, at its last
step (no checkpoint selection on val), and checkpoints every quarter of its steps.

Runs live in ``<out>/runs/<arm>-k<k>-seed<s>``; a cell is finished when its ``result.json`` exists,
so a re-run skips finished cells and resumes an interrupted one from its checkpoint. Local mode runs the
cells one after another in the calling ranks (``accelerate launch ... -m tldist.cli study``, or one
process); ``--jobs N`` (one process, no launcher) runs N cells at a time, each in a forked one-rank
child with its output in ``<run dir>/train.log`` (on a CPU machine two single-core cells side by side
cost ~25% less than each cell on 2 DDP ranks: no gradient all-reduce, no duplicated optimizer step);
``--slurm`` submits them as job arrays (:func:`tldist.launch.slurm.submit_configs`), waits,
and aggregates. Aggregation (:mod:`tldist.study.report`) writes ``results.csv``, ``summary.md``,
``summary.csv``, ``study.png`` and a W&B summary run (group = the study name, as for every cell).

Per cell, seed ``s`` picks the subset and sets ``train.seed`` and ``data.seed``. A subset smaller than
ranks x ``data.num_workers`` x ``data.batch_size`` is loaded in-process (``data.num_workers=0``): a
loader slot with fewer samples than a batch would fill its batches with the same few classes.
``data.samples_per_epoch`` is set to one cell's samples (steps x global batch), so a subset smaller
than a batch does not make every step an epoch end (an eval and a checkpoint each). A re-run with
another budget (global batch, steps per k, scratch grid) than ``<out>/plan.json`` is refused.

Modules: :mod:`~tldist.study.plan` (options, budget, cell configs), :mod:`~tldist.study.runner`
(:func:`run_study`: local and SLURM), :mod:`~tldist.study.report`, :mod:`~tldist.study.cli`.
"""

from tldist.study.plan import ARMS, Cell, StudyOptions, StudyPlan, plan_study
from tldist.study.runner import run_study

__all__ = ["ARMS", "Cell", "StudyOptions", "StudyPlan", "plan_study", "run_study"]
