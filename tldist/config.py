"""Typed job configuration.

Precedence, stated once: dataclass defaults < the YAML file < dotted CLI overrides
(``optim.lr=3e-4``). :func:`load_config` is the only place where they are merged.
Unknown keys and wrong types are rejected by OmegaConf's structured merge; value
ranges are checked by :meth:`JobConfig.validate`, both raising :class:`ConfigError`
naming the key.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tldist.errors import ConfigError


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)
    """Training shard sets: each a manifest location (shard dir, ``manifest.json`` path or http(s) URL)."""
    train_weights: list[float] = field(default_factory=list)
    """Sampling weight per entry of ``train`` (mixtures); empty means proportional to sample counts."""
    train_urls: list[str] = field(default_factory=list)
    """Optional shard URL patterns overriding the manifest's shard locations, one per ``train`` entry
    (brace-expanded; local paths, ``http(s)://`` or ``pipe:`` commands)."""
    val: Optional[str] = None
    """Validation shard set (manifest location); evaluation is skipped when unset."""
    val_sets: list[str] = field(default_factory=list)
    """Extra eval shard sets, each scored and logged on its own as ``eval/<name>/top1`` (e.g. the
    per-dataset val sets of a mixture); ``<name>`` is the set's directory name and its parent's."""
    val_urls: Optional[str] = None
    """Optional shard URL pattern overriding the val manifest's shard locations."""
    batch_size: int = 32
    """Micro-batch size per process (the global batch is this x processes x grad accumulation)."""
    eval_batch_size: int = 0
    """Per-process eval batch size; 0 means 2 x ``batch_size``."""
    num_workers: int = 2
    """DataLoader worker processes per rank (persistent across epochs)."""
    shuffle_buffer: int = 1000
    """Samples per shuffle block; raw bytes of one block are held in memory per worker."""
    seed: int = 0
    """Seed for shard order and in-block shuffles; together with the step it fixes the sample order."""
    image_size: int = 0
    """Input resolution; 0 means the backbone's own default input size."""
    train_crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """RandomResizedCrop scale range for training."""
    hflip: bool = True
    """Random horizontal flip during training (turn off for digits and text)."""
    resampled: bool = False
    """Draw training shards with replacement (for very large or multi-source data); needs ``samples_per_epoch``."""
    samples_per_epoch: int = 0
    """Declared epoch size in samples; 0 means the manifests' total (required with ``resampled``)."""
    decode: str = "pil"
    """Image decoder in loader workers: ``pil`` or ``torchvision`` (torchvision.io.decode_image for JPEG/PNG/WebP,
    PIL for other formats); both give the same pixels (rule in :mod:`tldist.data.transforms`). ``nvjpeg``: JPEGs are
    decoded, cropped and resized by the trainer on its device (nvjpeg on CUDA), others as ``torchvision``
    (:mod:`tldist.data.device_decode`)."""
    max_skip_fraction: float = 0.01
    """Stop the run when more than this fraction of samples read so far failed to decode."""
    pin_memory: bool = True
    """Pin host memory for faster host-to-GPU copies (ignored on CPU)."""
    auto_augment: str = ""
    """Augmentation policy run in the loader workers after crop + flip; empty = off. timm's strings:
    ``rand-m9-mstd0.5-inc1`` (RandAugment), ``original``/``v0`` (AutoAugment, ImageNet / EfficientNet policy),
    or ``trivialaugment`` (torchvision's TrivialAugmentWide); see :mod:`tldist.data.augment`. Not with
    ``decode=nvjpeg``."""
    color_jitter: float = 0.0
    """Colour jitter factor in the loader workers (timm's scalar: brightness = contrast = saturation, no hue);
    0 = off. Applied after ``auto_augment`` when both are set. Not with ``decode=nvjpeg``."""
    random_erasing: float = 0.0
    """Random erasing probability per image (timm's ``re_prob``, per-pixel noise mode), applied to the normalized
    batch on the training device; 0 = off."""


@dataclass
class ModelConfig:
    name: str = "resnet18"
    """torchvision classification model name (``resnet50``, ``vit_b_16``...) or ``timm:<name>``."""
    pretrained: bool = True
    """Load pretrained weights (torchvision ``weights`` enum, timm's weights or ``checkpoint``)."""
    weights: str = "DEFAULT"
    """torchvision weights enum member (``DEFAULT``, ``IMAGENET1K_V2``...)."""
    checkpoint: Optional[str] = None
    """Local checkpoint (state dict, tldist checkpoint or export) to initialise the backbone from."""
    num_classes: int = 0
    """Classes of the new head; 0 means the count in the training manifest."""
    heads: str = "merged"
    """``merged``: one head over the train sets' class names merged by name; ``separate``: one head per
    ``data.train`` entry (multi-task; see :mod:`tldist.train.multitask`), ``data.val_sets[i]`` scored with head i."""
    drop_path_rate: Optional[float] = None
    """Stochastic depth (Huang et al. 2016), the deepest block's drop probability in [0, 1): timm's
    ``drop_path_rate``; torchvision's ``stochastic_depth_prob`` (convnext, efficientnet, efficientnet_v2; swin and
    maxvit, whose builders fix it, get their linear per-block schedule rescaled). Unset (null): the
    architecture's own default (timm: 0; torchvision: e.g. 0.2 for efficientnet_b0, 0.1 for convnext_tiny).
    Models without stochastic depth (torchvision's resnets, ViTs...) refuse a value > 0: use timm's version
    (``timm:resnet50``, ``timm:vit_base_patch16_224``). Acts in training mode only (see :mod:`tldist.models.drop_path`)."""


@dataclass
class TransferConfig:
    strategy: str = "full"
    """``linear_probe`` (backbone frozen), ``full``, or ``last_n`` (unfreeze the last ``last_n`` stages)."""
    last_n: int = 1
    """Stages/blocks to unfreeze with ``strategy=last_n``."""
    freeze_bn: bool = False
    """Keep BatchNorm running statistics and affine parameters fixed."""
    layer_decay: float = 1.0
    """Layer-wise LR decay: stage i of n gets ``lr * layer_decay ** (n - i)``; 1.0 disables it."""
    head_lr_mult: float = 1.0
    """LR multiplier for the new classification head."""


@dataclass
class OptimConfig:
    name: str = "sgd"
    """``sgd`` (Nesterov momentum), ``adamw``, or for large global batches ``lamb`` (timm's ``Lamb``, You et al.
    2019; uses ``betas``) or ``lars`` (timm's ``Lars``, You et al. 2017; uses ``momentum``). Both adapt the
    step by the trust ratio only on weight-decayed groups (norms, biases: plain steps) and leave gradient
    clipping to ``train.clip_grad_norm``."""
    lr: float = 0.1
    """Base LR for a global batch of ``lr_ref_batch`` images; scaled linearly with the real global batch."""
    lr_ref_batch: int = 256
    """Global batch at which ``lr`` applies unscaled."""
    weight_decay: float = 1e-4
    """Weight decay (never applied to norm layers and biases)."""
    momentum: float = 0.9
    """SGD and LARS momentum."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW and LAMB betas."""
    warmup_steps: int = 0
    """Linear warmup in optimizer steps (takes priority over ``warmup_epochs``)."""
    warmup_epochs: float = 0.0
    """Linear warmup in epochs, used when ``warmup_steps`` is 0."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of the peak LR."""


@dataclass
class TrainConfig:
    epochs: int = 1
    """Training epochs (an epoch is the declared train sample count / global batch)."""
    max_steps: int = 0
    """Stop after this many optimizer steps; 0 means ``epochs`` decide."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    mixed_precision: str = "no"
    """``no``, ``bf16`` or ``fp16``."""
    clip_grad_norm: float = 0.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing (with Mixup/CutMix: folded into the mixed soft targets)."""
    mixup_alpha: float = 0.0
    """Mixup (Zhang et al. 2018) Beta(alpha, alpha) parameter, >= 0; 0 turns Mixup off. Mixup/CutMix run on
    the device batch through timm's ``Mixup`` (batch mode) with a soft-target cross-entropy."""
    cutmix_alpha: float = 0.0
    """CutMix (Yun et al. 2019) Beta(alpha, alpha) parameter, >= 0; 0 turns CutMix off."""
    mixup_prob: float = 1.0
    """Probability in [0, 1] that a batch is mixed at all (timm's ``prob``)."""
    mixup_switch_prob: float = 0.5
    """Probability in [0, 1] of CutMix instead of Mixup when both alphas are > 0 (timm's ``switch_prob``)."""
    ema_decay: float = 0.0
    """Decay of an fp32 exponential moving average of the weights, updated after every optimizer step
    (timm's ``ModelEmaV3``; see :mod:`tldist.train.ema`): 0 turns it off, else a value in (0, 1) such as
    0.999 (averages over ~1/(1 - decay) steps). Evaluated next to the raw model as ``eval_ema/*`` and saved
    in every checkpoint (``ema.safetensors``)."""
    ema_warmup: bool = False
    """Ramp the EMA decay up as ``min(ema_decay, 1 - (1 + step) ** -ema_warmup_power)`` (timm's ``use_warmup``),
    so that the EMA forgets the first, still poor weights quickly."""
    ema_warmup_power: float = 2 / 3
    """Exponent of the EMA warm-up, > 0 (timm's ``warmup_power``: 2/3 for runs of a million steps or more,
    3/4 for shorter ones)."""
    task_weights: list[float] = field(default_factory=list)
    """Loss weight per ``data.train`` entry with ``model.heads=separate``; empty means all 1."""
    eval_every_steps: int = 0
    """Evaluate every N optimizer steps; 0 means once per epoch."""
    log_every_steps: int = 10
    """Log train metrics every N optimizer steps."""
    seed: int = 0
    """Seed for model init (the same on every rank); dropout and drop-path draw from ``seed + rank``."""
    channels_last: bool = True
    """Use channels_last memory format for conv nets on GPUs (ignored on CPU, where it is slower,
    and under FSDP2, which cannot shard channels_last parameters)."""
    fsdp: bool = False
    """Shard the model with FSDP2 (also turned on by an accelerate config with ``distributed_type: FSDP``)."""
    fsdp_block: str = ""
    """Module class name wrapped as one FSDP unit (e.g. ``BasicBlock``, ``EncoderBlock``); empty picks the model's stages."""
    trace_samples: bool = False
    """Append each step's sample keys to ``output_dir/trace/rank<r>.jsonl`` (reproducibility checks)."""
    profile: bool = False
    """Write a torch profiler trace of a few steps to ``output_dir/profile``."""
    compile: bool = False
    """``torch.compile`` the model (in place, ``nn.Module.compile``: state-dict keys unchanged, so
    checkpoints load into compiled and plain models alike). Under DDP the module is compiled before
    wrapping, under FSDP2 after sharding."""
    compile_mode: str = "default"
    """``torch.compile`` mode: ``default``, ``reduce-overhead``, ``max-autotune`` or ``max-autotune-no-cudagraphs``."""
    collective_timeout_s: int = 600
    """Seconds a collective (all-reduce, barrier) may wait for the other ranks before it raises and
    the job ends; bounds the hang when a node is lost without closing its connections."""

    def __post_init__(self) -> None:
        # YAML 1.1 reads an unquoted `no` as false: `train.mixed_precision=no` (as documented) arrives
        # here as the string "False"; it means full precision.
        if self.mixed_precision in ("False", "false"):
            self.mixed_precision = "no"


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Save every N optimizer steps (0: only at the end and at each epoch end)."""
    keep_last: int = 2
    """Periodic checkpoints to keep (the best is kept as well)."""
    best_metric: str = "eval/top1"
    """The eval metric (higher is better) that picks the best checkpoint: ``eval/top1`` (the raw weights) or
    ``eval_ema/top1`` (the EMA weights; needs ``train.ema_decay`` > 0). ``tldist export`` exports the weights it
    judged unless told otherwise (``--weights``)."""
    resume: str = "auto"
    """``auto`` (latest in ``output_dir/checkpoints`` if any), ``none``, or a checkpoint directory."""


@dataclass
class TrackerConfig:
    backend: str = "wandb"
    """``wandb`` or ``none``."""
    project: str = "tldist"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team/user)."""
    mode: str = "offline"
    """W&B mode: ``offline`` (default; sync later with ``wandb sync``), ``online`` or ``disabled``."""
    group: Optional[str] = None
    """W&B group (sweeps and job arrays share one)."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""


@dataclass
class DistillConfig:
    teacher: Optional[str] = None
    """Knowledge distillation (:mod:`tldist.train.distill`): the fine-tuned teacher, an export dir
    (``model.json``), a checkpoint dir (``step_*``) or a run's output dir (its best checkpoint). Its
    classes must be the training data's (by name, any order). Unset: plain training."""
    alpha: float = 0.5
    """Weight of the soft-target term, in [0, 1]: ``loss = alpha * T^2 * KL(p_teacher^T || p_student^T)
    + (1 - alpha) * hard loss`` (Hinton et al. 2015). As DeiT's ``distillation_alpha``; note that torchdistill's
    ``KDLoss`` and Keras' distiller put their ``alpha`` on the hard term instead."""
    temperature: float = 4.0
    """Softmax temperature T (> 0) of both teacher and student in the soft term; the T^2 factor keeps its
    gradient scale independent of T (Hinton et al. 2015, section 2)."""


@dataclass
class JobConfig:
    output_dir: str = "runs/default"
    """Where checkpoints, logs and the resolved config go."""
    run_name: str = ""
    """Run name for the tracker; empty uses the output dir's name."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def validate(self) -> "JobConfig":
        """Check value ranges; raises :class:`ConfigError` naming the key."""
        d, t, o = self.data, self.train, self.optim
        if not d.train:
            _bad("data.train", d.train, "list at least one shard set, e.g. data.train=[shards/train]")
        if d.train_weights and len(d.train_weights) != len(d.train):
            _bad("data.train_weights", d.train_weights, f"give one weight per data.train entry ({len(d.train)})")
        if any(w <= 0 for w in d.train_weights):
            _bad("data.train_weights", d.train_weights, "weights must be > 0")
        if d.train_urls and len(d.train_urls) != len(d.train):
            _bad("data.train_urls", d.train_urls, f"give one URL pattern per data.train entry ({len(d.train)})")
        _positive("data.batch_size", d.batch_size)
        _at_least("data.num_workers", d.num_workers, 0)
        _positive("data.shuffle_buffer", d.shuffle_buffer)
        if len(d.train_crop_scale) != 2 or not 0 < d.train_crop_scale[0] <= d.train_crop_scale[1] <= 1:
            _bad("data.train_crop_scale", d.train_crop_scale, "use [min, max] with 0 < min <= max <= 1")
        if d.resampled and d.samples_per_epoch <= 0:
            _bad("data.samples_per_epoch", d.samples_per_epoch, "set a positive epoch size when data.resampled=true")
        _choice("data.decode", d.decode, ("pil", "torchvision", "nvjpeg"))
        from tldist.data.augment import check_augment

        check_augment(d)
        if not 0 <= d.max_skip_fraction < 1:
            _bad("data.max_skip_fraction", d.max_skip_fraction, "use a fraction in [0, 1)")
        _choice("model.heads", self.model.heads, ("merged", "separate"))
        if self.model.heads == "separate":
            if d.val:
                _bad("data.val", d.val, "with model.heads=separate list one val set per data.train entry in "
                     "data.val_sets instead (each is scored with its own head)")
            if d.val_sets and len(d.val_sets) != len(d.train):
                _bad("data.val_sets", d.val_sets, f"with model.heads=separate give one per data.train entry "
                     f"({len(d.train)}), in the same order")
        if t.task_weights and (self.model.heads != "separate" or len(t.task_weights) != len(d.train)):
            _bad("train.task_weights", t.task_weights, f"needs model.heads=separate and one weight per data.train "
                 f"entry ({len(d.train)})")
        if any(w <= 0 for w in t.task_weights):
            _bad("train.task_weights", t.task_weights, "weights must be > 0")
        _positive("train.collective_timeout_s", t.collective_timeout_s)
        _choice("train.compile_mode", t.compile_mode, ("default", "reduce-overhead", "max-autotune",
                                                        "max-autotune-no-cudagraphs"))
        _choice("transfer.strategy", self.transfer.strategy, ("linear_probe", "full", "last_n"))
        _positive("transfer.last_n", self.transfer.last_n)
        if not 0 < self.transfer.layer_decay <= 1:
            _bad("transfer.layer_decay", self.transfer.layer_decay, "use a value in (0, 1]")
        _choice("optim.name", o.name, ("sgd", "adamw", "lamb", "lars"))
        _positive("optim.lr", o.lr)
        _positive("optim.lr_ref_batch", o.lr_ref_batch)
        _at_least("optim.weight_decay", o.weight_decay, 0)
        _choice("train.mixed_precision", t.mixed_precision, ("no", "bf16", "fp16"))
        _positive("train.epochs", t.epochs)
        _positive("train.grad_accum", t.grad_accum)
        _positive("train.log_every_steps", t.log_every_steps)
        if not 0 <= t.label_smoothing < 1:
            _bad("train.label_smoothing", t.label_smoothing, "use a value in [0, 1)")
        _at_least("train.mixup_alpha", t.mixup_alpha, 0)
        _at_least("train.cutmix_alpha", t.cutmix_alpha, 0)
        for key, value in (("train.mixup_prob", t.mixup_prob), ("train.mixup_switch_prob", t.mixup_switch_prob)):
            if not 0 <= value <= 1:
                _bad(key, value, "use a probability in [0, 1]")
        if t.mixup_alpha > 0 or t.cutmix_alpha > 0:
            if d.batch_size % 2:
                _bad("data.batch_size", d.batch_size, "Mixup/CutMix mix each batch with its reverse and need an even "
                     "batch: use an even data.batch_size or set train.mixup_alpha=0 train.cutmix_alpha=0")
            if self.model.heads == "separate":
                _bad("train.mixup_alpha" if t.mixup_alpha > 0 else "train.cutmix_alpha",
                     max(t.mixup_alpha, t.cutmix_alpha), "Mixup/CutMix would mix images of different tasks: "
                     "use model.heads=merged or turn them off (0)")
        if self.model.drop_path_rate is not None and not 0 <= self.model.drop_path_rate < 1:
            _bad("model.drop_path_rate", self.model.drop_path_rate, "use a probability in [0, 1), or null for "
                 "the architecture's default")
        if not 0 <= t.ema_decay < 1:
            _bad("train.ema_decay", t.ema_decay, "use 0 (off) or a decay in (0, 1) such as 0.999")
        _positive("train.ema_warmup_power", t.ema_warmup_power)
        _choice("checkpoint.best_metric", self.checkpoint.best_metric, ("eval/top1", "eval_ema/top1"))
        if self.checkpoint.best_metric.startswith("eval_ema/") and not t.ema_decay:
            _bad("checkpoint.best_metric", self.checkpoint.best_metric, "needs train.ema_decay > 0 (e.g. 0.999), "
                 "or use eval/top1")
        _at_least("checkpoint.keep_last", self.checkpoint.keep_last, 1)
        _choice("tracker.backend", self.tracker.backend, ("wandb", "none"))
        _choice("tracker.mode", self.tracker.mode, ("offline", "online", "disabled"))
        if not 0 <= self.distill.alpha <= 1:
            _bad("distill.alpha", self.distill.alpha, "use a weight in [0, 1] (1: soft targets only, 0: labels only)")
        _positive("distill.temperature", self.distill.temperature)
        if self.distill.teacher and not Path(self.distill.teacher).expanduser().exists():
            _bad("distill.teacher", self.distill.teacher, "it does not exist; give a tldist export dir, a checkpoint "
                 "dir (step_*) or a training run's output dir")
        if self.distill.teacher and self.model.heads == "separate":
            _bad("distill.teacher", self.distill.teacher, "distillation needs one head (model.heads=merged)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _bad(key: str, value: Any, hint: str) -> None:
    raise ConfigError(f"config key '{key}' has bad value {value!r}: {hint}")


def _positive(key: str, value: float) -> None:
    if value <= 0:
        _bad(key, value, "must be > 0")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        _bad(key, value, f"must be >= {low}")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _bad(key, value, f"choose one of {', '.join(choices)}")


def load_config(path: Optional[str | Path] = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Build a :class:`JobConfig`: defaults < YAML file at ``path`` < ``overrides`` (``key=value``).

    Every mistake raises :class:`ConfigError` with one line naming the file (with the line and
    column of a YAML syntax error) or the override, and the key: a missing or unreadable file, YAML
    that does not parse or is not a mapping, an override without ``=`` or whose value does not parse
    as YAML (``data.train=[a,``), an unknown key, a value of the wrong type, a bad interpolation.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    merged = OmegaConf.structured(JobConfig)
    layers: list[tuple[str, Any]] = []
    if path is not None:
        layers.append((f"config file '{path}'", _load_yaml_file(Path(path))))
    for item in overrides:
        layers.append((f"override '{item}'", _parse_override(item)))
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{source}: {_omegaconf_message(e)}") from None
    try:
        cfg: JobConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:  # interpolations are resolved here: ${...} naming no key
        where = f"config file '{path}' or the overrides" if path is not None else "the overrides"
        raise ConfigError(f"{_omegaconf_message(e)} (set in {where})") from None
    return cfg


def _load_yaml_file(p: Path) -> Any:
    """The YAML file ``p`` as an OmegaConf mapping; one-line :class:`ConfigError` for any problem."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not p.is_file():
        raise ConfigError(f"config file '{p}' not found: pass the path of a YAML file such as configs/demo_target.yaml")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{p}' is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"config file '{p}' cannot be read: {e.strerror or e}") from None
    try:
        kind = yaml.compose(text, Loader=yaml.SafeLoader)  # the document's top node, nothing constructed
        layer = OmegaConf.load(io.StringIO(text))
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{p}' is not valid YAML: {_yaml_problem(e)}") from None
    except (OmegaConfBaseException, OSError, ValueError) as e:
        raise ConfigError(f"config file '{p}': {_omegaconf_message(e)}") from None
    if kind is not None and not isinstance(kind, yaml.MappingNode):
        what = "a list" if isinstance(kind, yaml.SequenceNode) else "a single value"
        raise ConfigError(f"config file '{p}' holds {what}, not a mapping of config keys: write keys like "
                          "'optim: {lr: 0.1}' (see configs/demo_target.yaml)")
    return layer


def _parse_override(item: str) -> Any:
    """One ``key=value`` override as an OmegaConf mapping; one-line :class:`ConfigError` naming it."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    key, sep, value = item.partition("=")
    if not sep:
        raise ConfigError(f"override '{item}' is not key=value (for example optim.lr=3e-4)")
    if not key.strip():
        raise ConfigError(f"override '{item}' has no key before '=' (for example optim.lr=3e-4)")
    try:
        return OmegaConf.from_dotlist([item])
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at character {mark.column + 1} of the value" if mark is not None and mark.line == 0 \
            else " at the end of the value"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"override '{item}': the value is not valid YAML ({problem}{where}): close its brackets "
                          "and quotes, e.g. data.train=[a,b] or run_name='a: b'") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"override '{item}': {_omegaconf_message(e)}") from None


def _yaml_problem(e: Exception) -> str:
    """``line 3, column 4: did not find expected ',' or ']' (while parsing a flow sequence at line 2, column 10)``."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    text = problem or " ".join(str(e).split())
    if mark is not None:
        text = f"line {mark.line + 1}, column {mark.column + 1}: {text}"
    context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context:
        at = f" at line {cmark.line + 1}, column {cmark.column + 1}" if cmark is not None else ""
        text += f" ({context}{at})"
    return text


def config_from_dict(d: dict[str, Any]) -> JobConfig:
    """Rebuild a config saved with a checkpoint (strict, like :func:`load_config`)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobConfig), OmegaConf.create(d)))  # type: ignore[return-value]


def _omegaconf_message(e: Exception) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    if "Key '" in msg and "not in" in msg:
        return f"unknown config key '{key}' (check the spelling; see tldist/config.py for the keys)"
    if key:
        return f"config key '{key}': {msg}"
    return msg


def format_config(cfg: JobConfig) -> str:
    """The resolved config as YAML, printed once at start and saved with checkpoints."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
