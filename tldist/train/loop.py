"""The fine-tuning loop: micro-batches -> optimizer steps -> logs, evals and checkpoints.

Every rank runs exactly ``total_steps`` optimizer steps: the train loader is an infinite,
evenly split stream (see ``tldist.data.pipeline``) and the eval loader yields the same number
of batches on every rank, so no collective can hang on an uneven shard split.
"""

from __future__ import annotations

import contextlib
import json
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

from tldist.config import CheckpointConfig, TrainConfig
from tldist.data.augment import erase_batch
from tldist.data.device_decode import images_on
from tldist.train.checkpoint import CheckpointManager
from tldist.errors import DataError
from tldist.train.distributed import (STOP_DATA_FAULT, STOP_PREEMPT, StopVote, all_reduce_sum, average_buffers,
                                     model_consistency)
from tldist.train.parallelize import Parallel
from tldist.train.metrics import EvalAccumulator
from tldist.train.tracking import Tracker

log = logging.getLogger("tldist")

_STOP = threading.Event()


def request_stop() -> None:
    """Ask the running loop to checkpoint and return at the next optimizer step.

    Safe to call from a signal handler (preemption, timeout) on any rank: ranks agree on the
    flag with an all-reduce before acting on it.
    """
    _STOP.set()


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


@dataclass
class RunInfo:
    """Facts of the run fixed at build time that the loop reads."""

    steps_per_epoch: int
    total_steps: int
    global_batch: int
    """Images per optimizer step over all ranks (batch x world size x grad_accum)."""
    output_dir: Path
    config_yaml: str
    """The resolved config, saved with every checkpoint."""
    class_names: list[str]
    tasks: Any = None
    """:class:`tldist.train.multitask.TaskHeads` with ``model.heads=separate`` (per-task loss and eval), else None."""


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
    eval_loaders: dict[str, Any]
    normalize: Callable[[torch.Tensor], torch.Tensor]
    tracker: Tracker
    checkpoints: CheckpointManager
    run: RunInfo
    state: TrainerState = field(default_factory=TrainerState)
    distiller: Any = None
    """:class:`tldist.train.distill.Distiller` with ``distill.teacher`` (adds the teacher's soft targets to the loss), else None."""
    ema: Any = None
    """:class:`tldist.train.ema.WeightEma` with ``train.ema_decay`` > 0 (updated after each optimizer step), else None."""

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

    @property
    def tasks(self):
        return self.run.tasks

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
        profiler = self._profiler()
        trace = None
        if self.cfg.trace_samples:
            (self.run.output_dir / "trace").mkdir(parents=True, exist_ok=True)
            trace = open(self.run.output_dir / "trace" / f"rank{self.parallel.world.rank}.jsonl", "a")
        bar = _progress_bar(self.is_main, self.state.step, self.run.total_steps)
        try:
            # log lines go through tqdm.write while the bar is shown, so the bar stays on the last line
            with _redirect_logging(not bar.disable):
                stopped, last_metrics = self._steps(profiler, trace, bar)
        finally:  # a failing step still leaves a profiler trace and a flushed sample trace; no collectives here
            bar.close()
            if profiler is not None:
                profiler.stop()
            if trace is not None:
                trace.close()
        data = self._data_totals()
        return {"step": self.state.step, "stopped": stopped, "best_top1": self.state.best_metric,
                "best_step": self.state.best_step, "data_read": data["read"], "data_skipped": data["skipped"],
                **model_consistency(self.model, self.num_processes),
                **{k: v for k, v in last_metrics.items() if not isinstance(v, list)}}

    def _steps(self, profiler, trace, bar) -> tuple[bool, dict[str, Any]]:
        """The step loop of :meth:`fit`; (stopped, last eval metrics)."""
        from tldist.train.recipe import build_criterion, build_mixup

        # Mixup/CutMix: draws keyed by (seed, rank, step, micro-batch), so a resume continues them exactly
        mixup = build_mixup(self.cfg, len(self.run.class_names), rank=self.parallel.world.rank)
        criterion = build_criterion(self.cfg, mixup)
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
                if mixup is not None:  # labels become (B, num_classes) soft targets
                    images, labels = mixup(images, labels, step=self.state.step, micro=micro)
                with self.parallel.grad_sync(micro == accum - 1):
                    with self.parallel.autocast():
                        logits = self.model(images)
                        loss = criterion(logits, labels) if self.tasks is None else self.tasks.loss(
                            logits, labels, batch["source"], self.cfg.label_smoothing)
                        if self.distiller is not None:  # the teacher sees the same images, same autocast
                            loss = self.distiller(logits, images, loss)
                    self.parallel.backward(loss / accum)
                loss_sum += loss.detach().float()
                window[1] += 1
            if self.cfg.clip_grad_norm > 0 or self._log_due(self.state.step + 1):
                grad_norm = self._clip()
            self.parallel.step(self.optimizer)
            if self.ema is not None:  # local foreach lerp: no collective, no host sync
                self.ema.update(self.state.step + 1)
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.state.step += 1
            bar.update(1)
            self.state.images_seen += global_batch
            window_steps += 1
            if profiler is not None:
                profiler.step()
            step = self.state.step
            if trace is not None:
                trace.write(json.dumps({"step": step, "keys": step_keys}) + "\n")
                trace.flush()

            if self._log_due(step):
                window[0], window[3] = loss_sum.item(), time.perf_counter() - tick
                self._log_train(window, window_steps, global_batch, grad_norm)
                if self.distiller is not None:  # train/kd_loss (collective: every rank logs here)
                    self.tracker.log(self.distiller.log_metrics(), step=step)
                window.zero_()
                loss_sum.zero_()
                window_steps, tick = 0, time.perf_counter()
            epoch_end = step % self.run.steps_per_epoch == 0
            eval_due = (self.cfg.eval_every_steps and step % self.cfg.eval_every_steps == 0) or \
                (not self.cfg.eval_every_steps and epoch_end) or step == total_steps
            new_best = None
            if eval_due and self.eval_loaders:
                last_metrics = self._evaluate_all()
                top1 = last_metrics.get(self.ckpt_cfg.best_metric)
                if top1 is not None and top1 > self.state.best_metric:
                    self.state.best_metric, self.state.best_step, new_best = top1, step, top1
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
        if not last_metrics and not stopped and self.eval_loaders and self.state.step >= total_steps:
            # resumed from the final checkpoint (killed before the run wrote its result): the
            # result still carries the final eval, which is deterministic, so it equals the lost one
            last_metrics = self._evaluate_all()
        return stopped, last_metrics

    def _evaluate_all(self) -> dict[str, Any]:
        """:meth:`evaluate` of the model, then of its EMA swapped in when ``train.ema_decay`` > 0
        (``eval_ema/...``); leaves the model in train mode (call on every rank)."""
        metrics = self.evaluate()
        if self.ema is not None:  # the same eval with the EMA values swapped into the model
            with self.ema.applied():
                metrics.update(self.evaluate(base="eval_ema"))
        self.model.train()
        return metrics

    def _raise_data_fault(self) -> None:
        """Every rank raises the same :class:`DataError`, naming each rank's fault (call on every
        rank, once the ranks agreed on a data fault; the CLI prints it on the main process only)."""
        from tldist.train.checkpoint import gather_objects

        faults = [f for f in gather_objects(str(self.train_loader.fault) if self.train_loader.fault else None) if f]
        err = DataError(" | ".join(faults))
        err.same_on_every_rank = True
        raise err

    def _data_totals(self) -> dict[str, int]:
        """Train samples read and skipped (corrupt, truncated, unreachable), summed over ranks and
        cumulative over resumes (call on every rank)."""
        stats = self.train_loader.stats()
        t = all_reduce_sum(torch.tensor([stats.get("read", 0), stats.get("skipped", 0)], dtype=torch.float64))
        read, skipped = (int(v) for v in t.tolist())
        return {"read": read, "skipped": skipped}

    def _log_train(self, window: torch.Tensor, steps: int, global_batch: int, grad_norm) -> None:
        """Reduce the window across ranks and log it (call on every rank)."""
        loss_sum, micro, wait, elapsed = all_reduce_sum(window.clone()).tolist()
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
        }
        if torch.cuda.is_available():
            metrics["train/gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.tracker.log(metrics, step=self.state.step)
        if self.is_main:
            log.info("step %d/%d  loss %.4f  lr %.3g  %.0f img/s  data-wait %.0f%%", self.state.step,
                     self.run.total_steps, metrics["train/loss"], metrics["train/lr"], metrics["train/images_per_s"],
                     100 * metrics["train/data_wait_frac"])

    # ---- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, base: str = "eval") -> dict[str, Any]:
        """Top-1/top-5/loss over every eval set, exact across ranks (call on every rank).

        The first eval set's per-class accuracy, confusion matrix and a few sample predictions
        (from rank 0's first batch) also go to the tracker. ``base`` prefixes the metric names:
        ``eval/top1``, ``eval/<set>/top1``...; ``eval_ema`` while the EMA weights are swapped in
        (no per-class details then).
        """
        average_buffers(self.model)
        self.model.eval()
        metrics: dict[str, Any] = {}
        for i, (name, loader) in enumerate(self.eval_loaders.items()):
            lo, hi = self.tasks.eval_span(name) if self.tasks is not None else (0, len(self.run.class_names))
            acc = EvalAccumulator(hi - lo, self.device)
            samples = None
            for batch in loader:
                images, labels = self._to_device(batch)
                with self.parallel.autocast():
                    logits = self.model(images)[:, lo:hi]  # with separate heads: this set's task head
                mask = batch["mask"].to(self.device)
                acc.update(logits, labels, mask)
                if samples is None and i == 0 and self.is_main:
                    samples = _sample_predictions(batch, logits, self.run.class_names[lo:hi])
            result = acc.compute()
            prefix = base if name == "val" else f"{base}/{name}"
            for k in ("top1", "top5", "loss", "count"):
                metrics[f"{prefix}/{k}"] = result[k]
            metrics[f"{prefix}/per_class_acc"] = result["per_class_acc"]
            if self.is_main:
                log.info("%s %s @ step %d: top1 %.2f%%  top5 %.2f%%  loss %.4f  (%d samples)", base, name,
                         self.state.step, result["top1"], result["top5"], result["loss"], result["count"])
                if i == 0 and base == "eval":
                    self.tracker.log_eval_details(prefix, result["per_class_acc"], result["confusion"],
                                                  self.run.class_names[lo:hi], samples or [], step=self.state.step)
        if self.tasks is not None and self.eval_loaders:  # the headline metric: mean over the tasks' heads
            metrics[f"{base}/top1"] = sum(metrics[f"{base}/{n}/top1"] for n in self.eval_loaders) / len(self.eval_loaders)
        self.tracker.log({k: v for k, v in metrics.items() if not isinstance(v, list)}, step=self.state.step)
        return metrics

    # ---- checkpoints -----------------------------------------------------------------------
    def save(self, metric: Optional[float] = None) -> Path:
        """Checkpoint the current step (call on every rank)."""
        average_buffers(self.model)
        state = {**self.state.state_dict(), "tracker": self.tracker.state_dict(),
                 "world_size": self.num_processes, "steps_per_epoch": self.run.steps_per_epoch}
        path = self.checkpoints.save(self.state.step, model=self.model, optimizer=self.optimizer,
                                     scheduler=self.scheduler, trainer_state=state,
                                     loader_state=self.train_loader.state_dict(), config_yaml=self.run.config_yaml,
                                     metric=metric, scaler=self.parallel.scaler, ema=self.ema)
        if self.is_main:
            log.info("saved checkpoint %s", path)
        self.tracker.log({"checkpoint/step": self.state.step}, step=self.state.step)
        return path

    def _profiler(self):
        if not self.cfg.profile:
            return None
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        out = self.run.output_dir / "profile"
        prof = profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
                       on_trace_ready=tensorboard_trace_handler(str(out), worker_name=f"rank{self.parallel.world.rank}"))
        prof.start()
        return prof


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
