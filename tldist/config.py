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
    val_sets: list[Any] = field(default_factory=list)
    """Extra eval shard sets, each scored and logged on its own as ``eval/<name>/top1`` (e.g. the
    per-dataset val sets of a mixture); ``<name>`` is the set's directory name and its parent's. An entry is
    a manifest location, or a mapping ``{path: LOCATION, restrict_classes: true, class_map: FILE}``
    (:class:`ValSet`): ``restrict_classes`` scores only the set's own classes (the ImageNet-R/-A protocol:
    the other outputs are masked out before top-k, timm#176), ``class_map`` maps the set's class names to
    the model's (ImageNet-V2, whose folders are class indices; :mod:`tldist.data.class_map`)."""
    val_urls: Optional[str] = None
    """Optional shard URL pattern overriding the val manifest's shard locations."""
    batch_size: int = field(default=32, metadata={"timm": "--batch-size"})
    """Micro-batch size per process (the global batch is this x processes x grad accumulation)."""
    eval_batch_size: int = field(default=0, metadata={"timm": "--validation-batch-size"})
    """Per-process eval batch size; 0 means 2 x ``batch_size``."""
    num_workers: int = field(default=2, metadata={"timm": "--workers"})
    """DataLoader worker processes per rank (persistent across epochs)."""
    shuffle_buffer: int = 1000
    """Raw samples held for the block shuffle across the whole job: each of the ``data.partitions`` partitions
    shuffles blocks of ``ceil(shuffle_buffer / partitions)`` records, so a loader worker holds about
    ``shuffle_buffer / (ranks x workers)`` records (raw bytes, before decoding)."""
    partitions: int = 0
    """Canonical partitions of each stream-epoch (MosaicML Streaming's ``num_canonical_nodes``): global sample
    ``t`` is draw ``t // partitions`` of partition ``t % partitions``, so the samples of every global step are
    the same on any number of ranks and loader workers at the same global batch. 0: the least common multiple
    of 240 and the starting world size (240 = 2^4 x 3 x 5 divides most world sizes; 960 at 64 ranks, 7,680 at
    512), at most the smallest train set's sample count. Fixed when a run starts (a resume keeps the
    checkpoint's). A world size that does not divide it still gets the same samples, but each partition is
    then read by several ranks (a warning names the factor): choose a multiple of every world size you will
    run on, at least ranks x data.num_workers."""
    seed: int = 0
    """Seed for shard order and in-block shuffles; together with the step it fixes the sample order."""
    image_size: int = field(default=0, metadata={"timm": "--img-size"})
    """Input resolution; 0 means the backbone's own default input size."""
    train_crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0], metadata={"timm": "--scale"})
    """RandomResizedCrop scale range for training."""
    hflip: bool = field(default=True, metadata={"timm": "--hflip 0.5 (true) / --hflip 0 (false)"})
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
    read_retries: int = 3
    """Re-opens of a remote shard (``http(s)://``, ``pipe:``, ``s3://``) that broke off after delivering data,
    read on from its next unread member (:mod:`tldist.data.retry`); only what is still missing after the last
    one counts as skipped. 0: no retries."""
    retry_backoff_s: float = 0.5
    """Seconds before the first retry of a shard; each further retry of it waits twice as long."""
    pin_memory: bool = field(default=True, metadata={"timm": "--pin-mem"})
    """Pin host memory for faster host-to-GPU copies (ignored on CPU)."""
    auto_augment: str = field(default="", metadata={"timm": "--aa"})
    """Augmentation policy run in the loader workers after crop + flip; empty = off. timm's strings:
    ``rand-m9-mstd0.5-inc1`` (RandAugment), ``original``/``v0`` (AutoAugment, ImageNet / EfficientNet policy),
    or ``trivialaugment`` (torchvision's TrivialAugmentWide); see :mod:`tldist.data.augment`. Not with
    ``decode=nvjpeg``."""
    color_jitter: float = field(default=0.0, metadata={"timm": "--color-jitter"})
    """Colour jitter factor in the loader workers (timm's scalar: brightness = contrast = saturation, no hue);
    0 = off. Applied after ``auto_augment`` when both are set. Not with ``decode=nvjpeg``."""
    random_erasing: float = field(default=0.0, metadata={"timm": "--reprob (--remode pixel)"})
    """Random erasing probability per image (timm's ``re_prob``, per-pixel noise mode), applied to the normalized
    batch on the training device; 0 = off."""


@dataclass
class ModelConfig:
    name: str = field(default="resnet18", metadata={"timm": "--model (as timm:<name>)"})
    """torchvision classification model name (``resnet50``, ``vit_b_16``...) or ``timm:<name>``."""
    pretrained: bool = field(default=True, metadata={"timm": "--pretrained"})
    """Load pretrained weights (torchvision ``weights`` enum, timm's weights or ``checkpoint``)."""
    weights: str = "DEFAULT"
    """torchvision weights enum member (``DEFAULT``, ``IMAGENET1K_V2``...)."""
    checkpoint: Optional[str] = field(default=None, metadata={"timm": "--initial-checkpoint"})
    """Local checkpoint to initialise the backbone from: a tldist export, checkpoint (``step_*``) or run
    directory, or a weights file (``.safetensors``, ``.pt``/``.pth`` state dict); read by
    :func:`tldist.artifacts.resolve.resolve` like every other model path."""
    checkpoint_weights: Optional[str] = None
    """Which weights of a tldist checkpoint or run ``model.checkpoint`` names: ``raw`` or ``ema`` (the
    ``tldist export --weights`` choice); null: the ones its run judged best (``checkpoint.best_metric``)."""
    num_classes: int = field(default=0, metadata={"timm": "--num-classes"})
    """Classes of the new head; 0 means the count in the training manifest."""
    heads: str = "merged"
    """``merged``: one head over the train sets' class names merged by name; ``separate``: one head per
    ``data.train`` entry (multi-task; see :mod:`tldist.train.multitask`), ``data.val_sets[i]`` scored with head i."""
    drop_path_rate: Optional[float] = field(default=None, metadata={"timm": "--drop-path"})
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
    layer_decay: float = field(default=1.0, metadata={"timm": "--layer-decay"})
    """Layer-wise LR decay: stage i of n gets ``lr * layer_decay ** (n - i)``; 1.0 disables it."""
    head_lr_mult: float = 1.0
    """LR multiplier for the new classification head."""


@dataclass
class OptimConfig:
    name: str = field(default="sgd", metadata={"timm": "--opt"})
    """``sgd`` (Nesterov momentum), ``adamw``, or for large global batches ``lamb`` (timm's ``Lamb``, You et al.
    2019; uses ``betas``) or ``lars`` (timm's ``Lars``, You et al. 2017; uses ``momentum``). Both adapt the
    step by the trust ratio only on weight-decayed groups (norms, biases: plain steps) and leave gradient
    clipping to ``train.clip_grad_norm``."""
    lr: float = field(default=0.1, metadata={"timm": "--lr-base (--lr with optim.lr_ref_batch=0)"})
    """Base LR for a global batch of ``lr_ref_batch`` images, scaled to the run's global batch by ``lr_scaling``
    (timm's ``--lr-base``); with ``lr_ref_batch=0`` the LR itself, unscaled (timm's ``--lr``). The effective peak LR
    and the rule that produced it are logged once at start and saved as ``derived.lr_scaled``
    (:func:`tldist.train.optim.scaled_lr`)."""
    lr_ref_batch: int = field(default=256, metadata={"timm": "--lr-base-size"})
    """Global batch (images per optimizer step, all ranks) at which ``lr`` applies unscaled (timm's
    ``--lr-base-size``); 0: ``lr`` is absolute, whatever the global batch."""
    lr_scaling: str = field(default="linear", metadata={"timm": "--lr-base-scale"})
    """How ``lr`` follows the global batch B: ``linear`` (``lr x B / lr_ref_batch``, Goyal et al. 2017), ``sqrt``
    (``lr x sqrt(B / lr_ref_batch)``, Krizhevsky 2014; for adaptive optimizers), or ``auto``: timm's
    ``--lr-base-scale ''`` rule (``sqrt`` for ``adamw`` and ``lamb``, ``linear`` otherwise). Ignored with
    ``lr_ref_batch=0``."""
    weight_decay: float = field(default=1e-4, metadata={"timm": "--weight-decay"})
    """Weight decay (never applied to norm layers and biases)."""
    momentum: float = field(default=0.9, metadata={"timm": "--momentum"})
    """SGD and LARS momentum."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata={"timm": "--opt-betas"})
    """AdamW and LAMB betas."""
    warmup_steps: int = 0
    """Linear warmup in optimizer steps (takes priority over ``warmup_epochs``)."""
    warmup_epochs: float = field(default=0.0, metadata={"timm": "--warmup-epochs"})
    """Linear warmup in epochs, used when ``warmup_steps`` is 0."""
    min_lr_ratio: float = field(default=0.0, metadata={"timm": "--min-lr (absolute in timm: min_lr_ratio x peak LR)"})
    """Cosine floor as a fraction of the peak LR."""


@dataclass
class TrainConfig:
    epochs: int = field(default=1, metadata={"timm": "--epochs"})
    """Training epochs (an epoch is the declared train sample count / global batch)."""
    max_steps: int = 0
    """Stop after this many optimizer steps; 0 means ``epochs`` decide."""
    grad_accum: Optional[int] = field(default=None, metadata={"timm": "--grad-accum-steps"})
    """Micro-batches per optimizer step. Unset (null): the launcher's ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS``
    (``accelerate launch --gradient_accumulation_steps N``, or exported), else 1; set here and there to different
    values: an error (:mod:`tldist.accelerate_env`)."""
    global_batch_size: int = 0
    """Images per optimizer step over all ranks (torchtitan's ``training.global_batch_size``); 0: not fixed. When
    set, ``train.grad_accum`` follows from the world size at start, ``global_batch_size / (ranks x
    data.batch_size)`` (it must divide), so a job requeued onto fewer nodes (``tldist submit --min-nodes``)
    keeps its global batch, learning rate and sample order by accumulating more micro-batches."""
    mixed_precision: Optional[str] = field(default=None, metadata={"timm": "--amp --amp-dtype bfloat16|float16"})
    """``no``, ``bf16`` or ``fp16``. Unset (null): the launcher's choice (``accelerate launch --mixed_precision bf16``
    or ``mixed_precision:`` in its config file), else ``no``; set here and there to different values: an error
    (:mod:`tldist.accelerate_env`). The run's saved ``config.yaml`` holds the precision used."""
    clip_grad_norm: float = field(default=0.0, metadata={"timm": "--clip-grad (--clip-mode norm)"})
    """Clip the global gradient norm to this value; 0 disables clipping."""
    label_smoothing: float = field(default=0.0, metadata={"timm": "--smoothing"})
    """Cross-entropy label smoothing (with Mixup/CutMix: folded into the mixed soft targets)."""
    mixup_alpha: float = field(default=0.0, metadata={"timm": "--mixup"})
    """Mixup (Zhang et al. 2018) Beta(alpha, alpha) parameter, >= 0; 0 turns Mixup off. Mixup/CutMix run on
    the device batch through timm's ``Mixup`` (batch mode) with a soft-target cross-entropy."""
    cutmix_alpha: float = field(default=0.0, metadata={"timm": "--cutmix"})
    """CutMix (Yun et al. 2019) Beta(alpha, alpha) parameter, >= 0; 0 turns CutMix off."""
    mixup_prob: float = field(default=1.0, metadata={"timm": "--mixup-prob"})
    """Probability in [0, 1] that a batch is mixed at all (timm's ``prob``)."""
    mixup_switch_prob: float = field(default=0.5, metadata={"timm": "--mixup-switch-prob"})
    """Probability in [0, 1] of CutMix instead of Mixup when both alphas are > 0 (timm's ``switch_prob``)."""
    ema_decay: float = field(default=0.0, metadata={"timm": "--model-ema --model-ema-decay"})
    """Decay of an fp32 exponential moving average of the weights, updated after every optimizer step
    (timm's ``ModelEmaV3``; see :mod:`tldist.train.ema`): 0 turns it off, else a value in (0, 1) such as
    0.999 (averages over ~1/(1 - decay) steps). Evaluated next to the raw model as ``eval_ema/*`` and saved
    in every checkpoint (``ema.safetensors``)."""
    ema_warmup: bool = field(default=False, metadata={"timm": "--model-ema-warmup"})
    """Ramp the EMA decay up as ``min(ema_decay, 1 - (1 + step) ** -ema_warmup_power)`` (timm's ``use_warmup``),
    so that the EMA forgets the first, still poor weights quickly."""
    ema_warmup_power: float = 2 / 3
    """Exponent of the EMA warm-up, > 0 (timm's ``warmup_power``: 2/3 for runs of a million steps or more,
    3/4 for shorter ones)."""
    task_weights: list[float] = field(default_factory=list)
    """Loss weight per ``data.train`` entry with ``model.heads=separate``; empty means all 1."""
    eval_every_steps: int = 0
    """Evaluate every N optimizer steps; 0 means once per epoch."""
    log_every_steps: int = field(default=10, metadata={"timm": "--log-interval"})
    """Log train metrics every N optimizer steps."""
    seed: int = field(default=0, metadata={"timm": "--seed"})
    """Seed for model init (the same on every rank); dropout and drop-path draw from ``seed + rank``."""
    channels_last: bool = field(default=True, metadata={"timm": "--channels-last"})
    """Use channels_last memory format for conv nets on GPUs (ignored on CPU, where it is slower,
    and under FSDP2, which cannot shard channels_last parameters)."""
    fsdp: bool = False
    """Shard the model with FSDP2 (also turned on by an accelerate config with ``distributed_type: FSDP``)."""
    fsdp_block: str = ""
    """Module class name wrapped as one FSDP unit (e.g. ``BasicBlock``, ``EncoderBlock``); empty picks the model's stages."""
    fsdp_reshard_after_forward: Optional[bool] = None
    """FSDP2 frees the all-gathered parameters of each block after its forward and gathers them again for the
    backward (``fully_shard(reshard_after_forward=True)``, ZeRO-3); false keeps them until the backward (ZeRO-2:
    more memory, one all-gather less per block). Unset (null): the accelerate config's
    ``fsdp_reshard_after_forward``, else true."""
    grad_checkpointing: Optional[bool] = field(default=None, metadata={"timm": "--grad-checkpointing"})
    """Activation checkpointing: keep only block inputs in the forward and recompute each block in the backward
    (lower peak memory for about one more forward pass). timm models: their own ``set_grad_checkpointing()``;
    torchvision models: each block FSDP2 would wrap (``train.fsdp_block`` or the backbone's block classes)
    through ``torch.utils.checkpoint``, applied before sharding and compiling (:mod:`tldist.train.parallelize`).
    Unset (null): the accelerate config's ``fsdp_activation_checkpointing``, else false."""
    trace_samples: bool = False
    """Append each step's sample keys to ``output_dir/trace/rank<r>.jsonl`` (reproducibility checks)."""
    profile: bool = False
    """Write a torch profiler trace of a few steps to ``output_dir/profile``."""
    compile: Optional[bool] = field(default=None, metadata={"timm": "--torchcompile"})
    """``torch.compile`` the model (in place, ``nn.Module.compile``: state-dict keys unchanged, so
    checkpoints load into compiled and plain models alike). Under DDP the module is compiled before
    wrapping, under FSDP2 after sharding."""
    compile_mode: Optional[str] = field(default=None, metadata={"timm": "--torchcompile-mode"})
    """``torch.compile`` mode: ``default``, ``reduce-overhead``, ``max-autotune`` or ``max-autotune-no-cudagraphs``.
    ``compile`` and ``compile_mode`` unset (null): the launcher's ``--dynamo_backend inductor`` / ``--dynamo_mode``
    (``dynamo_config`` in its config file), else no compiling and ``default``."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device at the run's precision, the denominator of ``perf/mfu``; 0: NVIDIA's
    datasheet figure for H100/H200/A100 (:data:`tldist.train.perf.PEAK_TFLOPS`), or on a CPU a matmul measured
    at start (the log says which)."""
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
    keep_last: int = field(default=2, metadata={"timm": "--checkpoint-hist"})
    """Periodic checkpoints to keep (the best is kept as well)."""
    best_metric: str = field(default="eval/top1", metadata={"timm": "--eval-metric"})
    """The eval metric (higher is better) that picks the best checkpoint: ``eval/top1`` (the raw weights) or
    ``eval_ema/top1`` (the EMA weights; needs ``train.ema_decay`` > 0). ``tldist export`` exports the weights it
    judged unless told otherwise (``--weights``)."""
    resume: str = field(default="auto", metadata={"timm": "--resume"})
    """``auto`` (latest in ``output_dir/checkpoints`` if any), ``none``, or a checkpoint directory. A run resumes
    on any number of ranks and loader workers: the model, optimizer and EMA are resharded, the data continue
    at the same global sample (:mod:`tldist.data.stream`)."""
    async_save: bool = False
    """Write checkpoints in the background (torchtitan's ``async_mode``): training is blocked only while the
    state is copied to host memory; the next save and the end of the run wait for the write, and a crash
    mid-write leaves the previous checkpoint the latest complete one."""
    full_weights: bool = False
    """Also write ``model.safetensors`` (the full model gathered on rank 0) into every checkpoint, for tools
    outside tldist; ``tldist export`` writes one from any checkpoint."""
    remote: str = ""
    """Mirror every checkpoint to this URL (``s3://bucket/run1`` through boto3, the ``s3`` extra; or any fsspec URL,
    ``gs://...``, ``file:///mnt/b``, with its package installed): uploaded once in place, pruned with the local ones, and
    ``resume=auto`` takes the newest complete checkpoint of either side (open_clip's ``--remote-sync``,
    Composer's ``save_folder``). Empty: local only."""


@dataclass
class TrackerConfig:
    backend: str = field(default="wandb", metadata={"timm": "--log-wandb (wandb)"})
    """``wandb`` or ``none``."""
    project: str = field(default="tldist", metadata={"timm": "--wandb-project"})
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team/user)."""
    mode: str = "offline"
    """W&B mode: ``offline`` (default; sync later with ``wandb sync``), ``online`` or ``disabled``."""
    group: Optional[str] = None
    """W&B group (sweeps and job arrays share one). Null: ``array-<SLURM_ARRAY_JOB_ID>`` in a job array,
    else the run's own id, so that the ``tldist eval``/``export``/``compress``/``adapt``/``pseudo-label``/
    ``study`` runs that use its model are grouped with it."""
    tags: list[str] = field(default_factory=list, metadata={"timm": "--wandb-tags"})
    """W&B tags."""
    log_model: str = "false"
    """Checkpoints as W&B artifacts of type ``model`` (Lightning's ``WandbLogger(log_model=...)``): ``false``
    (none), ``true`` (the best and the last checkpoint, once training ends), ``all`` (every checkpoint as it
    is written). Aliases ``latest``, ``best`` and ``step-<N>``; logged as references (``file://``, no bytes
    copied: the checkpoint dir is on storage the jobs share), so a pruned checkpoint's artifact dangles."""

    def __post_init__(self) -> None:
        # YAML reads unquoted true/false as booleans: `tracker.log_model=true` arrives as "True"
        if self.log_model in ("True", "False"):
            self.log_model = self.log_model.lower()


@dataclass
class EvalConfig:
    confusion_max_classes: int = 1000
    """Build the dense confusion matrix (classes x classes integer counts, rank 0 only) when the model has at
    most this many classes; above it only the ``top_confused`` pairs are reported. Memory: 8 x classes^2
    bytes (1,000 classes: 8 MB; 21,841: 3.8 GB). 0: never."""
    top_confused: int = 20
    """How many most frequent (true class, predicted class) mistakes each eval reports (rank 0), >= 0."""


@dataclass
class DistillConfig:
    teacher: Optional[str] = None
    """Knowledge distillation (:mod:`tldist.train.distill`): the fine-tuned teacher, an export dir
    (``model.json``), a checkpoint dir (``step_*``) or a run's output dir (its best checkpoint). Its
    classes must be the training data's (by name, any order). Unset: plain training."""
    teacher_weights: Optional[str] = None
    """Which weights of a teacher checkpoint or run: ``raw`` or ``ema``; null: the ones its run judged best
    (as ``tldist export`` picks them)."""
    alpha: float = 0.5
    """Weight of the soft-target term, in [0, 1]: ``loss = alpha * T^2 * KL(p_teacher^T || p_student^T)
    + (1 - alpha) * hard loss`` (Hinton et al. 2015). As DeiT's ``distillation_alpha``; note that torchdistill's
    ``KDLoss`` and Keras' distiller put their ``alpha`` on the hard term instead."""
    temperature: float = 4.0
    """Softmax temperature T (> 0) of both teacher and student in the soft term; the T^2 factor keeps its
    gradient scale independent of T (Hinton et al. 2015, section 2)."""


@dataclass
class JobConfig:
    output_dir: str = field(default="runs/default", metadata={"timm": "--output"})
    """Where checkpoints, logs and the resolved config go."""
    run_name: str = field(default="", metadata={"timm": "--experiment"})
    """Run name for the tracker; empty uses the output dir's name."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> "JobConfig":
        """Check value ranges and the rules that tie sections together; raises :class:`ConfigError`
        naming the key. The ``data.*`` values on their own are checked where they are used, by
        :func:`tldist.data.pipeline.check_data_config` (training calls it first, before any work)."""
        d, t, o = self.data, self.train, self.optim
        require_choice("model.heads", self.model.heads, ("merged", "separate"))
        if self.model.heads == "separate":
            if d.val:
                bad_value("data.val", d.val, "with model.heads=separate list one val set per data.train entry in "
                     "data.val_sets instead (each is scored with its own head)")
            if d.val_sets and len(d.val_sets) != len(d.train):
                bad_value("data.val_sets", d.val_sets, f"with model.heads=separate give one per data.train entry "
                     f"({len(d.train)}), in the same order")
        if t.task_weights and (self.model.heads != "separate" or len(t.task_weights) != len(d.train)):
            bad_value("train.task_weights", t.task_weights, f"needs model.heads=separate and one weight per data.train "
                 f"entry ({len(d.train)})")
        if any(w <= 0 for w in t.task_weights):
            bad_value("train.task_weights", t.task_weights, "weights must be > 0")
        require_positive("train.collective_timeout_s", t.collective_timeout_s)
        if t.compile_mode is not None:  # null: the launcher's dynamo_mode (tldist.accelerate_env)
            require_choice("train.compile_mode", t.compile_mode, COMPILE_MODES)
        require_choice("transfer.strategy", self.transfer.strategy, ("linear_probe", "full", "last_n"))
        require_positive("transfer.last_n", self.transfer.last_n)
        if not 0 < self.transfer.layer_decay <= 1:
            bad_value("transfer.layer_decay", self.transfer.layer_decay, "use a value in (0, 1]")
        require_choice("optim.name", o.name, ("sgd", "adamw", "lamb", "lars"))
        require_positive("optim.lr", o.lr)
        require_at_least("optim.lr_ref_batch", o.lr_ref_batch, 0)
        require_choice("optim.lr_scaling", o.lr_scaling, ("linear", "sqrt", "auto"))
        require_at_least("optim.weight_decay", o.weight_decay, 0)
        if t.mixed_precision is not None:  # null: the launcher's choice (tldist.accelerate_env)
            require_choice("train.mixed_precision", t.mixed_precision, PRECISIONS)
        require_positive("train.epochs", t.epochs)
        if t.grad_accum is not None:
            require_positive("train.grad_accum", t.grad_accum)
        require_at_least("train.global_batch_size", t.global_batch_size, 0)
        require_at_least("train.peak_tflops", t.peak_tflops, 0)
        require_positive("train.log_every_steps", t.log_every_steps)
        if not 0 <= t.label_smoothing < 1:
            bad_value("train.label_smoothing", t.label_smoothing, "use a value in [0, 1)")
        require_at_least("train.mixup_alpha", t.mixup_alpha, 0)
        require_at_least("train.cutmix_alpha", t.cutmix_alpha, 0)
        for key, value in (("train.mixup_prob", t.mixup_prob), ("train.mixup_switch_prob", t.mixup_switch_prob)):
            if not 0 <= value <= 1:
                bad_value(key, value, "use a probability in [0, 1]")
        if t.mixup_alpha > 0 or t.cutmix_alpha > 0:
            if d.batch_size % 2:
                bad_value("data.batch_size", d.batch_size, "Mixup/CutMix mix each batch with its reverse and need an even "
                     "batch: use an even data.batch_size or set train.mixup_alpha=0 train.cutmix_alpha=0")
            if self.model.heads == "separate":
                bad_value("train.mixup_alpha" if t.mixup_alpha > 0 else "train.cutmix_alpha",
                     max(t.mixup_alpha, t.cutmix_alpha), "Mixup/CutMix would mix images of different tasks: "
                     "use model.heads=merged or turn them off (0)")
        for key, value in (("model.checkpoint_weights", self.model.checkpoint_weights),
                           ("distill.teacher_weights", self.distill.teacher_weights)):
            if value is not None and value not in ("raw", "ema"):
                bad_value(key, value, "use raw (the trained weights), ema (their moving average) or null (the "
                          "ones the run judged best)")
        if self.model.drop_path_rate is not None and not 0 <= self.model.drop_path_rate < 1:
            bad_value("model.drop_path_rate", self.model.drop_path_rate, "use a probability in [0, 1), or null for "
                 "the architecture's default")
        if not 0 <= t.ema_decay < 1:
            bad_value("train.ema_decay", t.ema_decay, "use 0 (off) or a decay in (0, 1) such as 0.999")
        require_positive("train.ema_warmup_power", t.ema_warmup_power)
        require_choice("checkpoint.best_metric", self.checkpoint.best_metric, ("eval/top1", "eval_ema/top1"))
        if self.checkpoint.best_metric.startswith("eval_ema/") and not t.ema_decay:
            bad_value("checkpoint.best_metric", self.checkpoint.best_metric, "needs train.ema_decay > 0 (e.g. 0.999), "
                 "or use eval/top1")
        require_at_least("checkpoint.keep_last", self.checkpoint.keep_last, 1)
        require_choice("tracker.backend", self.tracker.backend, ("wandb", "none"))
        require_choice("tracker.mode", self.tracker.mode, ("offline", "online", "disabled"))
        require_choice("tracker.log_model", self.tracker.log_model, ("false", "true", "all"))
        require_at_least("eval.confusion_max_classes", self.eval.confusion_max_classes, 0)
        require_at_least("eval.top_confused", self.eval.top_confused, 0)
        val_set_entries(d.val_sets)
        if not 0 <= self.distill.alpha <= 1:
            bad_value("distill.alpha", self.distill.alpha, "use a weight in [0, 1] (1: soft targets only, 0: labels only)")
        require_positive("distill.temperature", self.distill.temperature)
        if self.distill.teacher and not Path(self.distill.teacher).expanduser().exists():
            bad_value("distill.teacher", self.distill.teacher, "it does not exist; give a tldist export dir, a checkpoint "
                 "dir (step_*) or a training run's output dir")
        if self.distill.teacher and self.model.heads == "separate":
            bad_value("distill.teacher", self.distill.teacher, "distillation needs one head (model.heads=merged)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRECISIONS = ("no", "bf16", "fp16")
"""``train.mixed_precision`` values: fp32, or autocast to bfloat16 / float16."""
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""``train.compile_mode`` values (``torch.compile(mode=...)``)."""


def _sections(cls: Any) -> dict[str, Any]:
    """The fields of config dataclass ``cls`` that are sections themselves: ``{name: dataclass}``."""
    import typing

    return {n: t for n, t in typing.get_type_hints(cls).items() if dataclasses.is_dataclass(t)}


def _leaf_fields(cls: Any = JobConfig, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """``(dotted key, field)`` of every key of config dataclass ``cls`` that is not a section, in field order
    (``optim.lr``, ``data.batch_size``, ...)."""
    sections, out = _sections(cls), []
    for f in dataclasses.fields(cls):
        out += _leaf_fields(sections[f.name], f"{prefix}{f.name}.") if f.name in sections else [(prefix + f.name, f)]
    return out


def timm_flags() -> list[tuple[str, str]]:
    """``(config key, timm train.py flag)`` for every key whose field declares ``metadata={"timm": ...}``, in
    the order of :class:`JobConfig` (the one source of the table in ``tldist train --help``)."""
    return [(key, f.metadata["timm"]) for key, f in _leaf_fields() if "timm" in f.metadata]


def bad_value(key: str, value: Any, hint: str) -> None:
    """Raise the one-line :class:`ConfigError` of a bad value: ``config key 'k' has bad value v: hint``."""
    raise ConfigError(f"config key '{key}' has bad value {value!r}: {hint}")


def require_positive(key: str, value: float) -> None:
    """:func:`bad_value` unless ``value`` > 0."""
    if value <= 0:
        bad_value(key, value, "must be > 0")


def require_at_least(key: str, value: float, low: float) -> None:
    """:func:`bad_value` unless ``value`` >= ``low``."""
    if value < low:
        bad_value(key, value, f"must be >= {low}")


def require_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    """:func:`bad_value` unless ``value`` is one of ``choices``."""
    if value not in choices:
        bad_value(key, value, f"choose one of {', '.join(choices)}")


@dataclass(frozen=True)
class ValSet:
    """One ``data.val_sets`` entry, read by :func:`val_set_entries`."""

    path: str
    """The shard set's manifest location."""
    restrict_classes: bool = False
    """Score only the set's own classes: the model's other outputs are masked to -inf before top-k and the
    loss (the ImageNet-R/-A protocol; timm's ``validate.py --valid-labels`` slices them out, the same result)."""
    class_map: Optional[str] = None
    """File mapping the set's class names to the model's (:func:`tldist.data.class_map.read_class_map`)."""
    key: str = "data.val_sets"
    """The config key of the entry, for messages (``data.val_sets[2]``)."""


_VAL_SET_KEYS = ("path", "restrict_classes", "class_map")


def val_set_entries(val_sets: list[Any]) -> list[ValSet]:
    """The ``data.val_sets`` entries as :class:`ValSet`: a string is a plain set, a mapping has ``path`` and
    optionally ``restrict_classes`` (bool) and ``class_map`` (an existing file). Raises :class:`ConfigError`
    naming ``data.val_sets[i]`` for any other shape."""
    out = []
    for i, entry in enumerate(val_sets):
        key = f"data.val_sets[{i}]"
        if isinstance(entry, str):
            out.append(ValSet(entry, key=key))
            continue
        if not isinstance(entry, dict):
            bad_value(key, entry, "give a shard set location or a mapping {path: LOCATION, restrict_classes: true, "
                      "class_map: FILE}")
        unknown = sorted(set(map(str, entry)) - set(_VAL_SET_KEYS))
        if unknown:
            bad_value(key, entry, f"unknown key(s) {', '.join(unknown)}: use {', '.join(_VAL_SET_KEYS)}")
        path, restrict, class_map = entry.get("path"), entry.get("restrict_classes", False), entry.get("class_map")
        if not isinstance(path, str) or not path:
            bad_value(f"{key}.path", path, "give the shard set's manifest location")
        if not isinstance(restrict, bool):
            bad_value(f"{key}.restrict_classes", restrict, "use true or false")
        if class_map is not None and (not isinstance(class_map, str) or not Path(class_map).expanduser().is_file()):
            bad_value(f"{key}.class_map", class_map, "not a file: give a .txt (one set class per line, line i = "
                      "model output i, timm's --class-map) or a .json {set class: model class}")
        out.append(ValSet(path, restrict, class_map, key=key))
    return out



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


def suggest_key(key: str) -> Optional[str]:
    """The config key meant by the unknown ``key``, or None when no key is near. In order: misspelled
    sections are corrected by :func:`difflib.get_close_matches` (its default cutoff, 0.6); then a timm flag
    name is mapped to its key (``optim.opt`` or ``opt`` -> ``optim.name``, from each field's ``timm`` metadata,
    :func:`timm_flag_keys`); then the section's closest field (``optim.lrr`` -> ``optim.lr``); then the one key of
    any section with the same, or else the closest, last name (``lr`` -> ``optim.lr``, ``epoch`` ->
    ``train.epochs``)."""
    import difflib

    cls: Any = JobConfig
    path: list[str] = []
    *sections, last = key.split(".")
    for name in sections:
        subsections = _sections(cls)
        if name not in subsections:
            close = difflib.get_close_matches(name, list(subsections), n=1)
            if not close:
                return None
            name = close[0]
        path.append(name)
        cls = subsections[name]
    names = [f.name for f in dataclasses.fields(cls)]
    if last in names:
        return ".".join([*path, last])
    flag = timm_flag_keys().get(last.lstrip("-").replace("-", "_"))
    if flag is not None:
        return flag
    close = difflib.get_close_matches(last, names, n=1)
    if close:
        return ".".join([*path, close[0]])
    leaves = [k for k, _ in _leaf_fields()]
    for near in [last, *difflib.get_close_matches(last, sorted({k.rsplit(".", 1)[-1] for k in leaves}), n=1)]:
        elsewhere = [k for k in leaves if k.rsplit(".", 1)[-1] == near]  # 'lr' -> 'optim.lr'
        if len(elsewhere) == 1:
            return elsewhere[0]
    return None


def timm_flag_keys() -> dict[str, str]:
    """``{timm flag name: config key}`` from :func:`timm_flags`: every ``--flag`` named in a field's ``timm``
    metadata, written the Python way (``--batch-size`` -> ``batch_size``, as argparse stores it); a flag that
    stands for several keys is left out."""
    import re

    found: dict[str, set[str]] = {}
    for key, text in timm_flags():
        for flag in re.findall(r"--([a-z][a-z0-9-]*)", text):
            found.setdefault(flag.replace("-", "_"), set()).add(key)
    return {flag: keys.pop() for flag, keys in found.items() if len(keys) == 1}


def _omegaconf_message(e: Exception) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    if "Key '" in msg and "not in" in msg:
        close = suggest_key(str(key)) if key else None
        last = str(key).rsplit(".", 1)[-1].replace("-", "_")
        timm = f" (timm's --{last.replace('_', '-')})" if close and timm_flag_keys().get(last) == close else ""
        if close and close != key:
            return f"unknown config key '{key}': did you mean '{close}'{timm}?"
        return f"unknown config key '{key}' (check the spelling; see tldist/config.py for the keys)"
    section = _section_named_in(msg) if msg.startswith("Merge error") else None
    if section is not None:  # 'model=resnet50': a value given to a whole section
        close = timm_flag_keys().get(section)
        first = next(k for k, _ in _leaf_fields(_sections(JobConfig)[section], section + "."))
        example = f"'{close}' (timm's --{section})" if close else f"'{first}'"
        return f"config key '{section}' is a section, not a value: set one of its keys, e.g. {example}"
    if key:
        return f"config key '{key}': {msg}"
    return msg


def _section_named_in(msg: str) -> Optional[str]:
    """The top-level section whose dataclass OmegaConf's merge error names (``... is not a subclass of
    ModelConfig``), else None."""
    for name, t in _sections(JobConfig).items():
        if msg.rstrip().split(". value:")[0].endswith(f"subclass of {t.__name__}"):
            return name
    return None


def format_config(cfg: JobConfig) -> str:
    """The resolved config as YAML, printed once at start and saved with checkpoints."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
