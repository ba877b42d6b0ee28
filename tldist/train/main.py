"""The thin entry point: config -> build -> fit -> close.

``run(cfg)`` is what ``tldist train`` calls in every process started by ``accelerate launch``,
``torchrun`` or a submitit task; it must be called on every rank.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from tldist.config import JobConfig, format_config
from tldist.errors import ConfigError
from tldist.train.checkpoint import CheckpointManager
from tldist.train.distributed import (
    build_accelerator,
    fsdp_block_names,
    fsdp_requested,
    world_of,
)
from tldist.train.loop import RunInfo, Trainer, TrainerState
from tldist.train.parallelize import parallelize
from tldist.train.schedule import build_scheduler
from tldist.train.tracking import build_tracker, run_metadata

log = logging.getLogger("tldist")


def setup_logging(is_main: bool) -> None:
    """INFO on the main process, warnings only elsewhere."""
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", force=True)


def read_classes(data_cfg) -> list[str]:
    """The class list training will use: the train manifests' class names merged by name, in order."""
    from tldist.data.manifest import load_manifest

    classes: list[str] = []
    for location in data_cfg.train:
        for name in load_manifest(location).classes:
            if name not in classes:
                classes.append(name)
    return classes


def shard_set_id(location: str) -> tuple[str, ...]:
    """Path components that identify a shard set: a local path made absolute and normalised (a
    trailing ``manifest.json`` dropped), a URL's scheme then host and path components."""
    import os

    location = str(location).rstrip("/")
    if location.endswith("manifest.json"):
        location = location[: -len("manifest.json")].rstrip("/")
    scheme, sep, rest = location.partition("://")
    if sep:
        return (scheme + ":", *[p for p in rest.split("/") if p])
    return tuple(p for p in os.path.abspath(location).split(os.sep) if p)


def eval_set_names(locations: list[str], keys: list[str] = (), reserved: tuple[str, ...] = ("val",)) -> list[str]:
    """Distinct names for shard sets: ``.../digits/val`` -> ``digits/val``, longer tails where two sets share
    one (``/x/a/shards/val``, ``/x/b/shards/val`` -> ``a/shards/val``, ``b/shards/val``), never a ``reserved`` name.

    Raises :class:`ConfigError` naming both config keys (``keys[i]``, default ``locations[i]``) when two
    locations are the same shard set: it would be scored twice under one name.
    """
    keys = list(keys) or [f"'{loc}'" for loc in locations]
    ids = [shard_set_id(loc) for loc in locations]
    first: dict[tuple[str, ...], int] = {}
    for i, set_id in enumerate(ids):
        if set_id in first:
            j = first[set_id]
            raise ConfigError(f"config keys {keys[j]} ({locations[j]}) and {keys[i]} ({locations[i]}) name the same "
                              "shard set: list each eval set once")
        first[set_id] = i
    parts = [[p for p in set_id if not p.endswith(":")] or list(set_id) for set_id in ids]
    depth = [min(2, len(p)) for p in parts]
    while True:
        names = ["/".join(p[len(p) - d:]) for p, d in zip(parts, depth)]
        clash = [i for i, n in enumerate(names) if names.count(n) > 1 or n in reserved]
        grow = [i for i in clash if depth[i] < len(parts[i])]
        if not grow:
            # only a whole path equal to a reserved name is left (e.g. '/val'): use the location itself
            return [str(locations[i]) if i in clash else n for i, n in enumerate(names)]
        for i in grow:
            depth[i] += 1


def eval_sets(data_cfg) -> list[tuple[str, str]]:
    """``(name, location)`` of every eval set: ``data.val`` as ``val``, then ``data.val_sets`` under
    distinct names (:func:`eval_set_names`). Raises :class:`ConfigError` when an entry repeats another
    one or ``data.val``."""
    extra = list(data_cfg.val_sets)
    locations = ([data_cfg.val] if data_cfg.val else []) + extra
    keys = (["'data.val'"] if data_cfg.val else []) + [f"'data.val_sets[{i}]'" for i in range(len(extra))]
    eval_set_names(locations, keys)  # no set twice (data.val included)
    return ([("val", data_cfg.val)] if data_cfg.val else []) + list(zip(eval_set_names(extra), extra))


def check_num_classes(model_cfg, classes: list[str], source: str) -> int:
    """``model.num_classes`` (0 = from the manifest) must agree with the manifest."""
    if model_cfg.num_classes and model_cfg.num_classes != len(classes):
        raise ConfigError(f"config key 'model.num_classes' is {model_cfg.num_classes} but {source} has "
                          f"{len(classes)} classes ({', '.join(classes[:5])}{'...' if len(classes) > 5 else ''}); "
                          "set model.num_classes=0 to take the manifest's count")
    return len(classes)


def build_optimizer(cfg, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """SGD (Nesterov), AdamW, or timm's LAMB / LARS over param groups carrying ``lr_scale`` (each group's
    ``weight_decay`` kept). LAMB/LARS apply their layer-wise trust ratio to the weights (``.../decay``
    groups, ``always_adapt=True``, even at ``optim.weight_decay=0`` as in MAE's linear probe) and not
    to norms and biases (``.../no_decay``: plain steps), as MAE's LARS and BERT's LAMB do; timm's own
    default would skip every group whose weight decay is 0. LAMB's global gradient clipping is off
    (``max_grad_norm=None``): ``train.clip_grad_norm`` does that."""
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        if cfg.name in ("lamb", "lars"):
            g["always_adapt"] = g.get("name", "").endswith("/decay")
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    if cfg.name == "lamb":
        from timm.optim import Lamb

        return Lamb(groups, lr=lr, betas=tuple(cfg.betas), max_grad_norm=None)
    if cfg.name == "lars":
        from timm.optim import Lars

        return Lars(groups, lr=lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas))


def match_head_classes(model, info, checkpoint: str, classes: list[str]) -> None:
    """When ``model.checkpoint`` is a tldist checkpoint or export that records its classes, give
    every class of this run the head row trained for its name (see
    :func:`~tldist.models.transfer.apply_head_classes`), never the row at the same position."""
    from tldist.export import describe_checkpoint
    from tldist.models.transfer import apply_head_classes

    saved = describe_checkpoint(checkpoint)
    if saved["kind"] == "weights" or not saved["classes"] or saved["classes"] == classes:
        return
    from safetensors.torch import load_file

    weights = Path(saved["path"])
    state = load_file(str(weights / "model.safetensors" if weights.is_dir() else weights))
    carried = apply_head_classes(model, info, saved_classes=saved["classes"], classes=classes, saved_state=state)
    log.info("model.checkpoint %s: head rows matched by class name (%d of %d classes carried over, the others "
             "freshly initialised)", checkpoint, carried, len(classes))


def claim_output_dir(output_dir: Path, accelerator):
    """Lock ``output_dir`` for this run (call on every rank; the main process holds the lock).

    The ranks agree on the outcome, so when another run holds the directory every rank raises
    the same one-line error (printed once) instead of rank 0 failing while the others wait.
    Returns the lock (None on other ranks); release it with ``release()``.
    """
    from tldist.errors import UserError
    from tldist.train.checkpoint import gather_objects
    from tldist.train.lock import acquire_run_lock

    lock, refusal = None, None
    if accelerator.is_main_process:
        try:
            lock = acquire_run_lock(output_dir)
        except UserError as e:
            refusal = str(e)
    refusals = [r for r in gather_objects(refusal) if r]  # a normal-path collective: every rank gets here
    if refusals:
        if lock is not None:
            lock.release()
        err = UserError(refusals[0])
        err.same_on_every_rank = True
        raise err
    return lock


def build(cfg: JobConfig, accelerator=None) -> Trainer:
    """Make every object of a training job from its config (call on every rank).

    ``accelerator`` (from :func:`~tldist.train.distributed.build_accelerator`) is built here
    when not given.
    """
    from accelerate.utils import set_seed

    from tldist.data.pipeline import build_eval_loader, build_train_loader
    from tldist.data.transforms import Normalizer
    from tldist.models.factory import build_model
    from tldist.models.param_groups import build_param_groups
    from tldist.models.transfer import apply_transfer

    cfg.validate()
    accelerator = accelerator or build_accelerator(cfg.train)
    world = world_of(accelerator)
    setup_logging(accelerator.is_main_process)
    set_seed(cfg.train.seed)  # the same initial model on every rank (FSDP2 shards it without a broadcast)
    output_dir = Path(cfg.output_dir)
    config_yaml = format_config(cfg)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(config_yaml)
        log.info("resolved config:\n%s", config_yaml)

    # Data first: the manifests decide the class count and the epoch size.
    tasks = None
    if cfg.model.heads == "separate":  # multi-task: one head (output slice) per data.train entry
        from tldist.train.multitask import build_task_heads

        tasks = build_task_heads(cfg.data, cfg.train.task_weights)
    classes = tasks.classes if tasks is not None else read_classes(cfg.data)
    num_classes = check_num_classes(cfg.model, classes, f"data.train ({', '.join(cfg.data.train)})")
    model, info = build_model(cfg.model, num_classes, image_size=cfg.data.image_size)
    if cfg.model.checkpoint and tasks is None:
        match_head_classes(model, info, cfg.model.checkpoint, classes)
    apply_transfer(model, cfg.transfer, info)
    image_size = cfg.data.image_size or info.input_size
    # the loop is done with a batch by its next step (recycling); ranks stop together on data faults
    train_loader = build_train_loader(cfg.data, world, image_size=image_size, interpolation=info.interpolation,
                                      mean=info.mean, recycle_batches=True, raise_on_fault=False)
    eval_loaders = {}
    for i, (name, location) in enumerate(eval_sets(cfg.data)):  # distinct names, no set twice
        # Val labels are remapped by class name onto the training classes.
        eval_loaders[name] = build_eval_loader(cfg.data, world, image_size=image_size, interpolation=info.interpolation,
                                               crop_pct=info.crop_pct, location=location,
                                               classes=tasks.bind_eval(name, i) if tasks else train_loader.classes)

    # Placement and wrapping in one step; the optimizer is built on the final (possibly sharded) params.
    fsdp = fsdp_requested(cfg.train)
    if fsdp and not torch.distributed.is_initialized():
        raise ConfigError("train.fsdp=true needs a process group (even for one process): launch with "
                          "'accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes N -m tldist.cli "
                          "train ...' or torchrun")
    parallel = parallelize(model, cfg.train, device=accelerator.device, world=world, fsdp=fsdp,
                           fsdp_blocks=fsdp_block_names(cfg.train, model, info.block_class_names) if fsdp else [])
    accum = cfg.train.grad_accum
    global_batch = cfg.data.batch_size * world.world_size * accum
    lr = cfg.optim.lr * global_batch / cfg.optim.lr_ref_batch
    groups = build_param_groups(parallel.module, info, weight_decay=cfg.optim.weight_decay,
                                split_no_decay=cfg.optim.name in ("lamb", "lars"),
                                layer_decay=cfg.transfer.layer_decay, head_lr_mult=cfg.transfer.head_lr_mult)
    optimizer = build_optimizer(cfg.optim, groups, lr)
    from tldist.train.ema import build_ema

    ema = build_ema(cfg.train, parallel)  # fp32 EMA of the weights (sharded like them), None when off
    from tldist.train.distill import build_distiller  # before the reseed below: building the teacher draws RNG

    distiller = build_distiller(cfg.distill, classes, parallel.device, mean=info.mean, std=info.std,
                                image_size=image_size)

    steps_per_epoch = max(1, train_loader.steps_per_epoch // accum)
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    warmup = cfg.optim.warmup_steps or round(cfg.optim.warmup_epochs * steps_per_epoch)
    scheduler = build_scheduler(optimizer, warmup_steps=warmup, total_steps=total_steps,
                                min_ratio=cfg.optim.min_lr_ratio)
    # From here on each rank draws its own random stream (dropout, drop-path): seed + rank, as
    # timm's train.py does. The model above was initialised identically on every rank; data
    # order and augmentation use their own generators keyed by data.seed; a resume restores
    # each rank's saved stream below.
    set_seed(cfg.train.seed + world.rank)

    # Resume: model, optimizer, scheduler, RNG, loader position and tracker run id.
    checkpoints = CheckpointManager(output_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last,
                                    is_main=accelerator.is_main_process)
    state, run_id = TrainerState(extra={"classes": classes, "image_size": image_size,
                                        "model_kwargs": info.model_kwargs,  # rebuilds compute the same forward
                                        **({"tasks": tasks.state()} if tasks else {}),
                                        **({"distill": distiller.state_dict()} if distiller else {})}), None
    resume_from = checkpoints.resolve_resume(cfg.checkpoint.resume)
    if resume_from is not None:
        restored = checkpoints.load(resume_from, model=parallel.model, optimizer=optimizer, scheduler=scheduler,
                                    rank=world.rank, scaler=parallel.scaler, ema=ema)
        state.load_state_dict(restored["trainer"])
        if distiller is not None:
            distiller.load_state_dict(restored["trainer"].get("distill"))
        train_loader.load_state_dict(restored["loader"])
        run_id = restored["trainer"].get("tracker", {}).get("run_id")
        log.info("resumed from %s at step %d", resume_from, state.step)

    derived = {"world_size": world.world_size, "global_batch": global_batch, "lr_scaled": lr,
               "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "warmup_steps": warmup,
               "num_classes": num_classes, "image_size": image_size, "train_samples": train_loader.num_samples,
               "parallel": parallel.mode, "mixed_precision": cfg.train.mixed_precision,
               "compile": cfg.train.compile}
    log.info("derived: %s", "  ".join(f"{k}={v}" for k, v in derived.items()))
    metadata = {"derived": derived, "classes": classes, "data_sources": train_loader.state_dict()["sources"],
                 **run_metadata()}
    tracker = build_tracker(cfg.tracker, is_main=accelerator.is_main_process,
                            run_name=cfg.run_name or output_dir.name, output_dir=output_dir,
                            config={**cfg.to_dict(), **metadata}, run_id=run_id, resumed_step=state.step,
                            new_run=cfg.checkpoint.resume == "none")
    run = RunInfo(steps_per_epoch=steps_per_epoch, total_steps=total_steps, global_batch=global_batch,
                  output_dir=output_dir, config_yaml=config_yaml, class_names=classes, tasks=tasks)
    return Trainer(cfg=cfg.train, ckpt_cfg=cfg.checkpoint, parallel=parallel, optimizer=optimizer,
                   scheduler=scheduler, train_loader=train_loader, eval_loaders=eval_loaders,
                   normalize=Normalizer(info.mean, info.std, device=parallel.device,
                                        channels_last=parallel.channels_last),
                   tracker=tracker, checkpoints=checkpoints, run=run, state=state, distiller=distiller,
                   ema=ema)


def run(cfg: JobConfig) -> dict[str, Any]:
    """Build, fit and close one training job (call on every rank). Returns the final metrics.

    Fail-fast: an exception on one rank (bad data, OOM, a bad checkpoint on one node, Ctrl-C)
    leaves this function without any further collective, so the process exits at once; the
    other ranks' pending collectives then fail (gloo: connection closed; otherwise after
    ``train.collective_timeout_s``) and the launcher or ``srun --kill-on-bad-exit`` ends them.
    """
    from tldist.launch.signals import die_with_parent

    die_with_parent()  # a killed launcher must not leave orphaned ranks writing checkpoints
    cfg.validate()
    accelerator = build_accelerator(cfg.train)
    lock = claim_output_dir(Path(cfg.output_dir), accelerator)
    trainer = None
    try:
        trainer = build(cfg, accelerator)
        if lock is not None:
            trainer.checkpoints.guard = lock.ensure_held
        result = trainer.fit()
        result["tracker_run_id"] = trainer.tracker.run_id
        trainer.tracker.summary({k: v for k, v in result.items() if isinstance(v, (int, float))})
        if trainer.is_main:
            (trainer.run.output_dir / "result.json").write_text(json.dumps(result, indent=1))
            log.info("done: step %d, best top1 %.2f%% (step %d)", result["step"], result["best_top1"],
                     result["best_step"])
        accelerator.wait_for_everyone()  # success path only: never a collective on an error path
        return result
    finally:
        if trainer is not None:
            trainer.tracker.finish()
        if lock is not None:
            lock.release()
