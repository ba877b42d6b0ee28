"""The thin entry point of training: config -> build -> fit -> close.

``run(cfg)`` is what ``tldist train`` calls in every process started by ``accelerate launch``,
``torchrun`` or a submitit task; it must be called on every rank. ``build(cfg)`` makes every object of
the job from its config; the helpers it calls live where their concern lives (data, models, artifacts,
:mod:`~tldist.train.parallelize`, :mod:`~tldist.train.optim`, the features).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Optional

from accelerate.utils import set_seed

from tldist.accelerate_env import apply_launcher_settings
from tldist.artifacts import layout
from tldist.artifacts.checkpoint import CheckpointManager, ModelState, OptimizerState, RngState, resolve_resume
from tldist.artifacts.export import model_record
from tldist.artifacts.lock import claim_output_dir
from tldist.artifacts.remote import RemoteStore
from tldist.artifacts.resolve import build_run_model
from tldist.config import JobConfig, format_config
from tldist.data.manifest import check_num_classes, classes_without_samples, read_classes
from tldist.data.pipeline import build_train_loader, check_data_config, check_data_locations
from tldist.data.transforms import Normalizer
from tldist.models.param_groups import build_param_groups
from tldist.models.transfer import apply_transfer
from tldist.paths import make_output_dir
from tldist.train.distill import build_distiller
from tldist.train.ema import build_ema
from tldist.train.feature import build_observers
from tldist.train.loop import RunInfo, Trainer, TrainerState, build_eval_sets
from tldist.train.multitask import build_task_heads
from tldist.train.optim import (apply_global_batch, build_optimizer, build_scheduler, describe_lr, lr_scaling_rule,
                                scaled_lr)
from tldist.train.parallelize import check_parallel_config, fsdp_block_names, fsdp_requested, parallelize
from tldist.train.perf import peak_tflops, train_flops_per_image
from tldist.train.recipe import build_criterion, build_mixup
from tldist.train.tracking import build_tracker, config_classes, run_metadata
from tldist.train.wandb_artifacts import LINK_KEY
from tldist.world import World, command_line, die_with_parent, setup_logging, start_world, world_of

log = logging.getLogger("tldist")


def resolve_settings(cfg: JobConfig) -> list:
    """Settings that follow from the launch, written into ``cfg`` so that the saved config says what ran (idempotent):
    ``train.global_batch_size`` -> ``train.grad_accum`` for this world size, then accelerate launch's choices
    (:func:`~tldist.accelerate_env.apply_launcher_settings`, whose settings are returned for the log)."""
    apply_global_batch(cfg.train, cfg.data.batch_size, World.from_env().world_size)
    return apply_launcher_settings(cfg)


def build(cfg: JobConfig, accelerator: Any = None) -> Trainer:
    """Make every object of a training job from its config (call on every rank).

    ``accelerator`` (from :func:`~tldist.world.start_world`) is started here when not given. Raises
    :class:`~tldist.errors.ConfigError` naming the key for a bad value, before any expensive work.
    """
    launched = resolve_settings(cfg)
    cfg.validate()
    check_data_config(cfg.data)
    check_data_locations(cfg.data)  # a missing shard set: one line naming the key, before the run dir exists
    check_parallel_config(cfg.train)
    accelerator = accelerator or start_world(mixed_precision=cfg.train.mixed_precision,
                                             timeout_s=cfg.train.collective_timeout_s)
    world = world_of(accelerator)
    setup_logging(world.is_main)
    if launched and world.is_main:
        log.info("from the launcher: %s", "  ".join(f"{s.key}={s.value} ({s.env})" for s in launched))
    set_seed(cfg.train.seed)  # the same initial model on every rank (FSDP2 shards it without a broadcast)
    run_dir = layout.RunDir.of(cfg.output_dir)
    config_yaml = format_config(cfg)
    if world.is_main:
        make_output_dir(run_dir.path, "output_dir")
        run_dir.config.write_text(config_yaml)
        log.info("resolved config:\n%s", config_yaml)

    # Data first: the manifests decide the class count and the epoch size.
    tasks = build_task_heads(cfg.data, cfg.train.task_weights) if cfg.model.heads == "separate" else None
    classes = tasks.classes if tasks is not None else read_classes(cfg.data)
    num_classes = check_num_classes(cfg.model, classes, f"data.train ({', '.join(cfg.data.train)})")
    empty = classes_without_samples(cfg.data)
    if empty and world.is_main:
        log.warning("%d class(es) of data.train have no training sample: %s; their head outputs are never trained "
                    "(a CSV with 1-based labels? its class '0' is one)", len(empty), ", ".join(empty[:20]))
    remote = RemoteStore(cfg.checkpoint.remote) if cfg.checkpoint.remote else None
    resume_from = resolve_resume(run_dir.checkpoints, cfg.checkpoint.resume, remote)
    model, info, origin = build_run_model(cfg.model, num_classes, classes, resume_from, image_size=cfg.data.image_size,
                                          has_tasks=tasks is not None)
    apply_transfer(model, cfg.transfer, info)
    image_size = cfg.data.image_size or info.input_size
    # the loop is done with a batch by its next step (recycling); ranks stop together on data faults
    train_loader = build_train_loader(cfg.data, world, image_size=image_size, interpolation=info.interpolation,
                                      mean=info.mean, recycle_batches=True, raise_on_fault=False,
                                      grad_accum=cfg.train.grad_accum)
    eval_sets = build_eval_sets(cfg.data, world, info, image_size, train_loader.classes, tasks)

    # Model FLOPs counted once on the plain model: frozen layers as trained, before checkpointing and sharding.
    flops_per_image = train_flops_per_image(model, image_size)
    # Placement and wrapping in one step; the optimizer is built on the final (possibly sharded) params.
    fsdp = fsdp_requested(cfg.train)
    blocks = fsdp_block_names(cfg.train, model, info.block_class_names) if fsdp or cfg.train.grad_checkpointing else []
    parallel = parallelize(model, cfg.train, device=accelerator.device, world=world, fsdp=fsdp, fsdp_blocks=blocks)
    peak, peak_source = peak_tflops(parallel.device, cfg.train.mixed_precision, cfg.train.peak_tflops) \
        if flops_per_image > 0 else (0.0, "")
    if world.is_main and flops_per_image > 0:
        log.info("perf: %.4g GFLOPs per training image (forward + backward, FlopCounterMode); perf/mfu against %.4g "
                 "TFLOP/s per device: %s", flops_per_image / 1e9, peak, peak_source)
    global_batch = cfg.data.batch_size * world.world_size * cfg.train.grad_accum
    lr = scaled_lr(cfg.optim, global_batch)
    if world.is_main:
        log.info("%s", describe_lr(cfg.optim, global_batch))
    groups = build_param_groups(parallel.module, info, weight_decay=cfg.optim.weight_decay,
                                split_no_decay=cfg.optim.name in ("lamb", "lars"),
                                layer_decay=cfg.transfer.layer_decay, head_lr_mult=cfg.transfer.head_lr_mult)
    optimizer = build_optimizer(cfg.optim, groups, lr)
    mixup = build_mixup(cfg.train, num_classes, rank=world.rank)  # draws keyed by (seed, rank, step, micro)
    features = [f for f in (mixup, build_ema(cfg.train, parallel),  # before the reseed: a teacher draws RNG
                            build_distiller(cfg.distill, classes, parallel.device, mean=info.mean, std=info.std,
                                            image_size=image_size)) if f is not None]
    steps_per_epoch = max(1, train_loader.steps_per_epoch // cfg.train.grad_accum)
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    warmup = cfg.optim.warmup_steps or round(cfg.optim.warmup_epochs * steps_per_epoch)
    scheduler = build_scheduler(optimizer, warmup_steps=warmup, total_steps=total_steps,
                                min_ratio=cfg.optim.min_lr_ratio)
    # From here on each rank draws its own random stream (dropout, drop-path): seed + rank, as timm's
    # train.py does. The model above was initialised identically on every rank; data order and
    # augmentation use their own generators keyed by data.seed; a resume restores each rank's stream.
    set_seed(cfg.train.seed + world.rank)

    # Every stateful piece goes into every checkpoint; resume restores them all in place.
    states: dict[str, Any] = {"model": ModelState(parallel.model), "optimizer": OptimizerState(parallel.model, optimizer),
                              "scheduler": scheduler, "loader": train_loader, "rng": RngState(),
                              **({"scaler": parallel.scaler} if parallel.scaler is not None else {}),
                              **{f.name: f for f in features if f.name}}
    best_weights = "ema" if cfg.checkpoint.best_metric.startswith("eval_ema/") else "raw"
    lineage = {k: v for f in features for k, v in f.record().items()}  # e.g. what it was distilled from
    record = model_record(info, classes=classes, image_size=image_size, weights=best_weights,
                          tasks=tasks.state() if tasks is not None else None, pruned=origin.pruned if origin else None,
                          **lineage)
    checkpoints = CheckpointManager(run_dir.checkpoints, states=states, keep_last=cfg.checkpoint.keep_last,
                                    is_main=world.is_main, config_yaml=config_yaml, model_record=record,
                                    async_save=cfg.checkpoint.async_save, full_weights=cfg.checkpoint.full_weights,
                                    remote=remote)
    layout0 = {"step": 0, "world_size": world.world_size, "num_workers": cfg.data.num_workers,
               "batch_size": cfg.data.batch_size}
    state, run_id = TrainerState(extra={"classes": classes, "image_size": image_size, "layouts": [layout0],
                                        "model_kwargs": info.model_kwargs, "command": command_line()}), None
    if resume_from is not None:
        saved = checkpoints.load(resume_from)
        state.load_state_dict(saved)
        run_id = saved.get("tracker", {}).get("run_id")
        log.info("resumed from %s at step %d", resume_from, state.step)
        state.note_layout(saved, world, cfg.data, train_loader)  # a world-size change: logged once, recorded

    derived = {"world_size": world.world_size, "global_batch": global_batch, "lr_scaled": lr,
               "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "warmup_steps": warmup,
               "num_classes": num_classes, "image_size": image_size, "train_samples": train_loader.num_samples,
               "parallel": parallel.mode, "mixed_precision": cfg.train.mixed_precision,
               "compile": cfg.train.compile, "grad_checkpointing": cfg.train.grad_checkpointing,
               "lr_rule": lr_scaling_rule(cfg.optim),
               "gflops_per_image": round(flops_per_image / 1e9, 4), "peak_tflops": round(peak, 4),
               "launcher": {s.key: s.env for s in launched}}
    log.info("derived: %s", "  ".join(f"{k}={v}" for k, v in derived.items()))
    metadata = {"derived": derived, "classes": config_classes(classes),  # not 21,841 names: the count is in derived
                "data_sources": train_loader.state_dict()["sources"],
                **run_metadata()}
    tracker = build_tracker(cfg.tracker, is_main=world.is_main, run_name=cfg.run_name or run_dir.path.name,
                            output_dir=run_dir.path, config={**cfg.to_dict(), **metadata}, run_id=run_id,
                            resumed_step=state.step, new_run=cfg.checkpoint.resume == "none")
    if tracker.link() is not None:  # jobs using a checkpoint or its export find the W&B run that trained it
        checkpoints.model_record = {**record, LINK_KEY: tracker.link()}
    tracker.log_datasets(cfg.data)  # each manifest read: a `dataset` artifact (reference)
    run = RunInfo(steps_per_epoch=steps_per_epoch, total_steps=total_steps, global_batch=global_batch,
                  output_dir=run_dir.path, class_names=classes, mean_headline=tasks is not None, eval_cfg=cfg.eval,
                  flops_per_image=flops_per_image, peak_tflops=peak)
    return Trainer(cfg=cfg.train, ckpt_cfg=cfg.checkpoint, parallel=parallel, optimizer=optimizer,
                   scheduler=scheduler, train_loader=train_loader, eval_sets=eval_sets,
                   normalize=Normalizer(info.mean, info.std, device=parallel.device,
                                        channels_last=parallel.channels_last),
                   criterion=build_criterion(cfg.train, mixup, tasks), tracker=tracker, checkpoints=checkpoints,
                   run=run, state=state,
                   features=features + build_observers(cfg.train, run_dir.path, world.rank))  # last: profiler starts


def run(cfg: JobConfig) -> dict[str, Any]:
    """Build, fit and close one training job (call on every rank). Returns the final metrics.

    Fail-fast: an exception on one rank (bad data, OOM, a bad checkpoint on one node, Ctrl-C)
    leaves this function without any further collective, so the process exits at once; the
    other ranks' pending collectives then fail (gloo: connection closed; otherwise after
    ``train.collective_timeout_s``) and the launcher or ``srun --kill-on-bad-exit`` ends them.
    """
    die_with_parent()  # a killed launcher must not leave orphaned ranks writing checkpoints
    resolve_settings(cfg)  # before the Accelerator: a conflict with the launcher is one line, exit 2
    cfg.validate()
    check_parallel_config(cfg.train)
    check_data_locations(cfg.data)  # before the run lock creates output_dir
    accelerator = start_world(mixed_precision=cfg.train.mixed_precision, timeout_s=cfg.train.collective_timeout_s)
    lock = claim_output_dir(cfg.output_dir, is_main=accelerator.is_main_process)
    trainer: Optional[Trainer] = None
    try:
        trainer = build(cfg, accelerator)
        if lock is not None:
            trainer.checkpoints.guard = lock.ensure_held
        result = trainer.fit()
        result["tracker_run_id"] = trainer.tracker.run_id
        trainer.tracker.summary({k: v for k, v in result.items() if isinstance(v, (int, float))})
        if trainer.is_main:
            layout.RunDir.of(cfg.output_dir).result.write_text(json.dumps(result, indent=1))
            best = (f"best top1 {result['best_top1']:.2f}% (step {result['best_step']})"
                    if result["best_step"] >= 0 else "no eval set (data.val)")
            log.info("done: step %d, %s", result["step"], best)
        accelerator.wait_for_everyone()  # success path only: never a collective on an error path
        return result
    finally:
        if trainer is not None:
            trainer.tracker.finish()
        if lock is not None:
            lock.release()

