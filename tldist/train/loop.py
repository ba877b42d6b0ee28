"""The fine-tuning loop: micro-batches -> optimizer steps -> logs, evals and checkpoints.

Every rank runs exactly ``total_steps`` optimizer steps: the train loader is an infinite,
evenly split stream (see ``tldist.data.pipeline``) and the eval loader yields the same number
of batches on every rank, so no collective can hang on an uneven shard split.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from tldist.artifacts.checkpoint import CheckpointManager, best_checkpoint, latest_checkpoint
from tldist.config import CheckpointConfig, DataConfig, EvalConfig, TrainConfig, val_set_entries
from tldist.data.augment import erase_batch
from tldist.data.device_decode import images_on
from tldist.data.manifest import eval_sets as eval_set_locations
from tldist.errors import DataError
from tldist.evaluate import eval_set_loader, score
from tldist.models.info import ModelInfo
from tldist.train.distributed import STOP_DATA_FAULT, STOP_PREEMPT, StopVote, average_buffers, model_consistency
from tldist.train.feature import TrainFeature
from tldist.train.parallelize import Parallel
from tldist.train.tracking import Tracker
from tldist.world import World, all_reduce_max, all_reduce_sum, gather_objects

log = logging.getLogger("tldist")

_STOP = threading.Event()


def request_stop() -> None:
    """Ask the running loop to checkpoint and return at the next optimizer step.

    Safe to call from a signal handler (preemption, timeout) on any rank: ranks agree on the
    flag with an all-reduce before acting on it.
    """
    _STOP.set()


def clear_stop_request() -> None:
    """Forget a stop requested earlier in this process (jobs run in-process by submitit's debug
    executor share the flag)."""
    _STOP.clear()


def stop_requested() -> bool:
    """Whether :func:`request_stop` was called since the last :func:`clear_stop_request`."""
    return _STOP.is_set()


def _progress_bar(enabled: bool, start: int, total: int):
    """A tqdm bar of optimizer steps on the main process when stderr is a terminal (log files get
    the periodic log lines only); a disabled bar elsewhere."""
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, leave=False,
                disable=not (enabled and sys.stderr.isatty()))


@dataclass
class TrainerState:
    """Everything about the loop's progress that a resume needs (besides model/optimizer/data)."""

    step: int = 0
    best_metric: float = -math.inf
    best_step: int = -1
    images_seen: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "best_metric": self.best_metric if math.isfinite(self.best_metric) else None,
                "best_step": self.best_step, "images_seen": self.images_seen, **self.extra}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.step = int(d["step"])
        self.best_metric = d["best_metric"] if d.get("best_metric") is not None else -math.inf
        self.best_step = int(d.get("best_step", -1))
        self.images_seen = int(d.get("images_seen", 0))
        if isinstance(d.get("layouts"), list):
            self.extra["layouts"] = list(d["layouts"])

    def note_layout(self, saved: dict[str, Any], world: World, data_cfg: DataConfig, loader: Any) -> None:
        """After a resume: when this job's layout (ranks, loader workers, batch) differs from the one that wrote
        the checkpoint, log it once (rank 0) and record it in ``layouts`` (``trainer.json``)."""
        now = {"step": self.step, "world_size": world.world_size, "num_workers": data_cfg.num_workers,
               "batch_size": data_cfg.batch_size}
        layouts = self.extra.setdefault("layouts", [])
        before = layouts[-1] if layouts else {"world_size": saved.get("world_size")}
        if all(before.get(k) == now[k] for k in ("world_size", "num_workers", "batch_size")):
            return
        layouts.append(now)
        if world.is_main:
            log.warning("resuming at step %d on another layout: %s ranks x %s loader workers x batch %s before, "
                        "%d x %d x %d now; the data continue at global sample %d, the model and optimizer are "
                        "resharded", self.step, before.get("world_size"), before.get("num_workers", "?"),
                        before.get("batch_size", "?"), now["world_size"], now["num_workers"], now["batch_size"],
                        loader.position)


@dataclass
class RunInfo:
    """Facts of the run fixed at build time that the loop reads."""

    steps_per_epoch: int
    total_steps: int
    global_batch: int
    """Images per optimizer step over all ranks (batch x world size x grad_accum)."""
    output_dir: Path
    class_names: list[str]
    mean_headline: bool = False
    """The headline ``eval/top1`` is the mean over the eval sets (one per task head, ``model.heads=separate``)."""
    flops_per_image: float = 0.0
    """Training FLOPs (forward + backward) per image (:func:`tldist.train.perf.train_flops_per_image`); 0: unknown."""
    peak_tflops: float = 0.0
    """One device's peak TFLOP/s, the denominator of ``perf/mfu`` (:func:`tldist.train.perf.peak_tflops`); 0: none."""
    eval_cfg: EvalConfig = field(default_factory=EvalConfig)
    """``eval.*``: the confusion-matrix threshold and how many confused pairs each eval reports."""


@dataclass
class EvalSet:
    """One eval shard set as the loop scores it."""

    name: str
    """``val`` for ``data.val``, else the set's distinct path tail (logged as ``eval/<name>/...``)."""
    loader: Any
    """Its :class:`~tldist.data.pipeline.EvalLoader` (labels mapped onto ``classes`` by name)."""
    span: tuple[int, int]
    """Output columns ``[lo, hi)`` that score it (one task's head with ``model.heads=separate``)."""
    classes: list[str]
    """Names of those columns."""
    restrict: Optional[list[int]] = None
    """Columns (within ``span``) predictions are restricted to (``restrict_classes``: the set's own classes)."""


def build_eval_sets(data_cfg: DataConfig, world: World, info: ModelInfo, image_size: int, classes: list[str],
                    tasks: Any = None) -> list[EvalSet]:
    """The run's eval sets: ``data.val`` then ``data.val_sets`` (distinct names, no set twice), val labels
    remapped by class name onto the training classes, or onto task ``i``'s classes for ``data.val_sets[i]``
    with ``model.heads=separate``; a ``data.val_sets`` entry's ``class_map`` and ``restrict_classes`` apply
    (:func:`tldist.evaluate.eval_set_loader`)."""
    entries = {e.path: e for e in val_set_entries(data_cfg.val_sets)}
    out = []
    for i, (name, location) in enumerate(eval_set_locations(data_cfg)):
        own = tasks.bind_eval(name, i) if tasks is not None else classes
        loader, restrict = eval_set_loader(data_cfg, world, location, list(own), image_size=image_size,
                                           interpolation=info.interpolation, crop_pct=info.crop_pct,
                                           entry=entries.get(location) if name != "val" else None)
        span = tasks.eval_span(name) if tasks is not None else (0, len(classes))
        out.append(EvalSet(name, loader, span, list(own), restrict))
    return out


@dataclass
class Trainer:
    """Owns the objects built by ``tldist.train.main.build`` and runs them.

    ``parallel`` holds the placed and wrapped model and its precision machinery (see
    :mod:`tldist.train.parallelize`); ``optimizer`` is the torch optimizer over its parameters.
    """

    cfg: TrainConfig
    ckpt_cfg: CheckpointConfig
    parallel: Parallel
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: Any
    eval_sets: list[EvalSet]
    normalize: Callable[[torch.Tensor], torch.Tensor]
    criterion: Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]
    """``criterion(logits, labels, batch)``: the micro-batch loss (see :func:`tldist.train.recipe.build_criterion`)."""
    tracker: Tracker
    checkpoints: CheckpointManager
    run: RunInfo
    state: TrainerState = field(default_factory=TrainerState)
    features: list[TrainFeature] = field(default_factory=list)
    """Optional behaviour (Mixup/CutMix, EMA, distillation), called at the loop's hooks (:mod:`tldist.train.feature`)."""

    # ---- helpers ---------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self.parallel.model

    @property
    def device(self) -> torch.device:
        return self.parallel.device

    @property
    def is_main(self) -> bool:
        return self.parallel.is_main

    @property
    def num_processes(self) -> int:
        return self.parallel.world.world_size

    def _to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.normalize(images_on(batch, self.device))  # data.decode=nvjpeg decodes here
        images = erase_batch(images, batch)  # data.random_erasing: train batches carry per-sample seeds, eval none
        return images, batch["label"].to(self.device, non_blocking=True)

    def _clip(self) -> torch.Tensor:
        """Clip the gradients to ``clip_grad_norm`` (when > 0); their total norm before clipping."""
        max_norm = self.cfg.clip_grad_norm if self.cfg.clip_grad_norm > 0 else float("inf")
        return self.parallel.clip_grad_norm_(self.optimizer, max_norm)

    # ---- training --------------------------------------------------------------------------
    def _log_due(self, step: int) -> bool:
        return step % self.cfg.log_every_steps == 0 or step == self.run.total_steps

    def fit(self) -> dict[str, Any]:
        """Train until ``total_steps`` or a stop request (call on every rank).

        The steady state has no host-device synchronisation of its own: the loss is summed on
        the device and read at log steps, the gradient norm is computed only when clipping or
        logging needs it, and the ranks' stop vote is read one step late (:class:`StopVote`).
        """
        bar = _progress_bar(self.is_main, self.state.step, self.run.total_steps)
        try:
            # log lines go through tqdm.write while the bar is shown, so the bar stays on the last line
            with _redirect_logging(not bar.disable):
                stopped, last_metrics = self._steps(bar)
        finally:  # a failing step still leaves a profiler trace and a flushed sample trace; no collectives here
            bar.close()
            for feature in self.features:
                feature.close()
        self.checkpoints.close()  # success path: an asynchronous save is on disk before the run reports
        if not stopped:  # tracker.log_model: the best and last checkpoints (a preempted run goes on later)
            self.tracker.training_done(best=best_checkpoint(self.checkpoints.root),
                                       latest=latest_checkpoint(self.checkpoints.root))
        data = self._data_totals()
        return {"step": self.state.step, "stopped": stopped, "best_top1": self.state.best_metric,
                "best_step": self.state.best_step, "data_read": data["read"], "data_skipped": data["skipped"],
                "data_retries": data["retries"],
                **model_consistency(self.model, self.num_processes),
                **{k: v for k, v in last_metrics.items() if not isinstance(v, list)}}

    def _steps(self, bar) -> tuple[bool, dict[str, Any]]:
        """The step loop of :meth:`fit`; (stopped, last eval metrics)."""
        data_iter = iter(self.train_loader)
        accum = self.cfg.grad_accum
        global_batch, total_steps = self.run.global_batch, self.run.total_steps
        window = torch.zeros(4, dtype=torch.float64)  # loss_sum, micro-batches, data_wait_s, elapsed_s
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)  # read at log steps only
        window_steps, last_metrics, stopped, grad_norm = 0, {}, False, None
        vote = StopVote()
        tick = time.perf_counter()
        self.model.train()
        while self.state.step < total_steps:
            step_keys: list[str] = []
            for micro in range(accum):
                t0 = time.perf_counter()
                batch = next(data_iter)
                window[2] += time.perf_counter() - t0
                step_keys.extend(batch.get("key", []))
                images, labels = self._to_device(batch)
                for feature in self.features:  # Mixup/CutMix: labels become (B, num_classes) soft targets
                    images, labels = feature.batch(images, labels, step=self.state.step, micro=micro)
                with self.parallel.grad_sync(micro == accum - 1):
                    with self.parallel.autocast():
                        logits = self.model(images)
                        loss = self.criterion(logits, labels, batch)
                        for feature in self.features:  # distillation: the teacher sees the same images
                            loss = feature.loss(loss, logits, images)
                    self.parallel.backward(loss / accum)
                loss_sum += loss.detach().float()
                window[1] += 1
            if self.cfg.clip_grad_norm > 0 or self._log_due(self.state.step + 1):
                grad_norm = self._clip()
            self.parallel.step(self.optimizer)
            for feature in self.features:  # the EMA update (a local foreach lerp), the sample trace, the profiler
                feature.after_step(self.state.step + 1, step_keys)
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.state.step += 1
            bar.update(1)
            self.state.images_seen += global_batch
            window_steps += 1
            step = self.state.step

            if self._log_due(step):
                window[0], window[3] = loss_sum.item(), time.perf_counter() - tick
                self._log_train(window, window_steps, global_batch, grad_norm)
                for feature in self.features:  # train/kd_loss (collective: every rank logs here)
                    self.tracker.log(feature.log_metrics(), step=step)
                window.zero_()
                loss_sum.zero_()
                window_steps, tick = 0, time.perf_counter()
            epoch_end = step % self.run.steps_per_epoch == 0
            eval_due = (self.cfg.eval_every_steps and step % self.cfg.eval_every_steps == 0) or \
                (not self.cfg.eval_every_steps and epoch_end) or step == total_steps
            new_best = None
            if eval_due and self.eval_sets:
                last_metrics = self._evaluate_all()
                top1 = last_metrics.get(self.ckpt_cfg.best_metric)
                if top1 is not None and top1 > self.state.best_metric:
                    self.state.best_metric, self.state.best_step, new_best = top1, step, top1
                    self.tracker.summary({"best_top1": top1, "best_step": step})  # the step of W&B's max eval/top1
            # -- stop decisions are taken by all ranks together, one step late (no per-step sync)
            code = STOP_DATA_FAULT if self.train_loader.fault is not None else STOP_PREEMPT if _STOP.is_set() else 0
            agreed = vote.poll(code)
            if agreed or step == total_steps:
                agreed = max(agreed, vote.finish())  # no collective left in flight
            if agreed == STOP_DATA_FAULT:
                self._raise_data_fault()
            stopped = agreed == STOP_PREEMPT
            ckpt_due = (self.ckpt_cfg.every_steps and step % self.ckpt_cfg.every_steps == 0) or epoch_end \
                or step == total_steps or stopped or new_best is not None
            if ckpt_due:
                self.save(metric=new_best)
            if stopped:
                self.tracker.mark_preempting()
                break
        if not last_metrics and not stopped and self.eval_sets and self.state.step >= total_steps:
            # resumed from the final checkpoint (killed before the run wrote its result): the
            # result still carries the final eval, which is deterministic, so it equals the lost one
            last_metrics = self._evaluate_all()
        return stopped, last_metrics

    def _evaluate_all(self) -> dict[str, Any]:
        """:meth:`evaluate` of the model, then the features' evaluations (the EMA's, ``eval_ema/...``);
        leaves the model in train mode (call on every rank)."""
        metrics = self.evaluate()
        for feature in self.features:
            metrics.update(feature.evaluate(self))
        self.model.train()
        return metrics

    def _raise_data_fault(self) -> None:
        """Every rank raises the same :class:`DataError`, naming each rank's fault (call on every
        rank, once the ranks agreed on a data fault; the CLI prints it on the main process only)."""
        faults = [f for f in gather_objects(str(self.train_loader.fault) if self.train_loader.fault else None) if f]
        err = DataError(" | ".join(faults))
        err.same_on_every_rank = True
        raise err

    def _data_totals(self) -> dict[str, int]:
        """Train samples read and skipped (corrupt, truncated, unreachable), summed over ranks and
        cumulative over resumes (call on every rank)."""
        stats = self.train_loader.stats()
        t = all_reduce_sum(torch.tensor([stats.get("read", 0), stats.get("skipped", 0), stats.get("retries", 0)],
                                        dtype=torch.float64))
        read, skipped, retries = (int(v) for v in t.tolist())
        return {"read": read, "skipped": skipped, "retries": retries}

    def _log_train(self, window: torch.Tensor, steps: int, global_batch: int, grad_norm) -> None:
        """Reduce the window across ranks and log it (call on every rank)."""
        loss_sum, micro, wait, elapsed = all_reduce_sum(window.clone()).tolist()
        slowest = float(all_reduce_max(window[3:4].clone()).item())  # the slowest rank's window time
        n = self.num_processes
        data = self._data_totals()
        metrics = {
            "train/loss": loss_sum / max(micro, 1),
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/images_per_s": global_batch * steps / max(elapsed / n, 1e-9),
            "train/images_per_s_per_rank": global_batch * steps / max(elapsed / n, 1e-9) / n,
            "train/data_wait_frac": wait / max(elapsed, 1e-9),
            "train/grad_norm": float(grad_norm),
            "train/epoch": self.state.step / self.run.steps_per_epoch,
            "data/read": data["read"],
            "data/skipped": data["skipped"],
            "data/retries": data["retries"],
        }
        metrics["perf/step_time_s"] = elapsed / n / max(steps, 1)
        metrics["perf/step_time_max_s"] = slowest / max(steps, 1)
        if self.run.flops_per_image > 0:
            metrics["perf/tflops_per_device"] = \
                self.run.flops_per_image * metrics["train/images_per_s_per_rank"] / 1e12
            if self.run.peak_tflops > 0:
                metrics["perf/mfu"] = metrics["perf/tflops_per_device"] / self.run.peak_tflops
        if torch.cuda.is_available():
            metrics["train/gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.tracker.log(metrics, step=self.state.step)
        if self.is_main:
            mfu = f"  mfu {100 * metrics['perf/mfu']:.1f}%" if "perf/mfu" in metrics else ""
            log.info("step %d/%d  loss %.4f  lr %.3g  %.0f img/s  data-wait %.0f%%  step %.3gs (slowest rank %.3gs)%s",
                     self.state.step, self.run.total_steps, metrics["train/loss"], metrics["train/lr"],
                     metrics["train/images_per_s"], 100 * metrics["train/data_wait_frac"],
                     metrics["perf/step_time_s"], metrics["perf/step_time_max_s"], mfu)

    # ---- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, base: str = "eval") -> dict[str, Any]:
        """Top-1/top-5/balanced accuracy/loss over every eval set, exact across ranks (call on every rank).

        The first eval set's per-class accuracy, confusion matrix (or most confused pairs, ``eval.*``) and a
        few sample predictions
        (from rank 0's first batch) also go to the tracker. ``base`` prefixes the metric names:
        ``eval/top1``, ``eval/<set>/top1``...; ``eval_ema`` while the EMA weights are swapped in
        (no per-class details then).
        """
        average_buffers(self.model)
        self.model.eval()
        metrics: dict[str, Any] = {}
        for i, es in enumerate(self.eval_sets):
            samples: list[dict] = []

            def keep_samples(batch: dict, logits: torch.Tensor, first=(i == 0 and self.is_main)) -> None:
                if first and not samples:
                    samples.extend(_sample_predictions(batch, logits, es.classes))

            result = score(self.model, es.loader, normalize=self.normalize, num_classes=len(es.classes),
                           device=self.device, span=es.span, restrict=es.restrict, autocast=self.parallel.autocast,
                           on_batch=keep_samples, eval_cfg=self.run.eval_cfg)
            prefix = base if es.name == "val" else f"{base}/{es.name}"
            for k in ("top1", "top5", "balanced_acc", "loss", "count"):
                metrics[f"{prefix}/{k}"] = result[k]
            metrics[f"{prefix}/per_class_acc"] = result["per_class_acc"]
            if self.is_main:
                log.info("%s %s @ step %d: top1 %.2f%%  top5 %.2f%%  balanced %.2f%%  loss %.4f  (%d samples)", base,
                         es.name, self.state.step, result["top1"], result["top5"], result["balanced_acc"],
                         result["loss"], result["count"])
                if i == 0 and base == "eval":
                    self.tracker.log_eval_details(prefix, result, es.classes, samples, step=self.state.step)
        if self.run.mean_headline and self.eval_sets:  # the headline metric: mean over the tasks' heads
            metrics[f"{base}/top1"] = sum(metrics[f"{base}/{es.name}/top1"] for es in self.eval_sets) / len(self.eval_sets)
        self.tracker.log({k: v for k, v in metrics.items() if not isinstance(v, list)}, step=self.state.step)
        return metrics

    # ---- checkpoints -----------------------------------------------------------------------
    def save(self, metric: Optional[float] = None) -> Path:
        """Checkpoint the current step (call on every rank)."""
        average_buffers(self.model)
        state = {**self.state.state_dict(), "tracker": self.tracker.state_dict(),
                 "world_size": self.num_processes, "steps_per_epoch": self.run.steps_per_epoch}
        path = self.checkpoints.save(self.state.step, trainer=state, metric=metric)
        if self.is_main:
            log.info("saved checkpoint %s", path)
        self.tracker.checkpoint_saved(path, step=self.state.step, best=metric is not None)  # tracker.log_model=all
        self.tracker.log({"checkpoint/step": self.state.step}, step=self.state.step)
        return path


def _redirect_logging(enabled: bool):
    """Route log records through ``tqdm.write`` while a progress bar is on screen."""
    if not enabled:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def _sample_predictions(batch: dict, logits: torch.Tensor, class_names: list[str], limit: int = 8) -> list[dict]:
    """Up to ``limit`` real (unmasked) samples of a batch with their prediction, for the tracker."""
    probs = logits.float().softmax(-1).cpu()
    out = []
    for j in torch.nonzero(batch["mask"]).flatten().tolist()[:limit]:
        conf, pred = probs[j].max(0)
        label = int(batch["label"][j])
        out.append({"image": batch["image"][j].cpu().permute(1, 2, 0).numpy(), "key": batch["key"][j],
                    "label": class_names[label] if class_names else label,
                    "pred": class_names[int(pred)] if class_names else int(pred), "confidence": float(conf)})
    return out
