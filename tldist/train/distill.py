"""Knowledge distillation: a fine-tuned teacher's soft targets added to the training loss.

Distillation *is* the training loop with a teacher (``distill.teacher=PATH`` in any training config,
or ``tldist distill CONFIG``), so it inherits DDP/FSDP2, exact resume, W&B and ``tldist submit``.
Per micro-batch, the :class:`Distiller` runs the teacher on the student's own (augmented, possibly
mixed) images, in the same autocast region as the student's forward, without autograd, and returns

    loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * hard_loss

with ``s``/``t`` the student/teacher logits ``[B, C]``, the KL divergence averaged over the batch
(``batchmean``) and ``hard_loss`` the loop's own loss (cross-entropy with label smoothing, or the
mixup soft-target loss). Source: Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural
Network" (the T^2 factor keeps the soft gradients' scale independent of T). ``alpha`` weighs the soft
term as DeiT's ``distillation_alpha`` does (torchdistill's ``KDLoss`` and Keras' distiller put their
``alpha`` on the hard term: mind the convention when porting a recipe); the KL is averaged over the
batch (DeiT divides by batch x classes). No feature distillation: teacher and student may be
different architectures, and matching their features needs learned projections per layer pair.

The teacher is not wrapped by DDP/FSDP: every rank holds a full copy in eval mode (its memory is
not sharded). Its view of a batch is derived from the student's: the normalisation is undone and
redone with the teacher's mean/std, and the batch is resized on the device to the teacher's input
size (``torch.nn.functional.interpolate``, the teacher's interpolation, antialiased when shrinking).
That is an approximation of the teacher's own preprocessing: it sees the student's crop resampled,
which at a larger teacher size is blurrier than decoding the image at that size.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tldist.artifacts.resolve import load_model, require_model_record, resolve
from tldist.errors import ConfigError, UserError
from tldist.train.feature import TrainFeature
from tldist.world import all_reduce_sum

log = logging.getLogger("tldist")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, hard_loss: torch.Tensor, *,
                      alpha: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha * T^2 * KL + (1 - alpha) * hard_loss, T^2 * KL)`` for logits ``[B, C]`` (Hinton et al. 2015).

    KL is ``KL(softmax(teacher / T) || softmax(student / T))`` averaged over the batch, computed in
    float32 whatever the autocast dtype of the logits. Returns the total loss (a scalar on the
    logits' device) and the unweighted soft term (for logging).
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    soft = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)
    return alpha * soft + (1.0 - alpha) * hard_loss, soft


class TeacherView(nn.Module):
    """Student batch ``[B, 3, H, W]`` (normalised with the student's mean/std) -> the teacher's input
    ``[B, 3, S, S]``: re-normalised with the teacher's mean/std (``x * std_s / std_t + (mean_s - mean_t) /
    std_t``, a per-channel affine map) and resized to ``size`` with ``interpolation``
    (``bilinear``/``bicubic``, antialiased when shrinking). The identity when both agree."""

    def __init__(self, student_mean: Sequence[float], student_std: Sequence[float], teacher_mean: Sequence[float],
                 teacher_std: Sequence[float], size: int, interpolation: str = "bilinear", *, device: Any):
        super().__init__()
        ms, ss = torch.tensor(student_mean).view(1, 3, 1, 1), torch.tensor(student_std).view(1, 3, 1, 1)
        mt, st = torch.tensor(teacher_mean).view(1, 3, 1, 1), torch.tensor(teacher_std).view(1, 3, 1, 1)
        self.renormalise = not (torch.equal(ms, mt) and torch.equal(ss, st))
        self.register_buffer("scale", (ss / st).float(), persistent=False)
        self.register_buffer("shift", ((ms - mt) / st).float(), persistent=False)
        self.size = int(size)
        self.mode = interpolation if interpolation in ("bilinear", "bicubic") else "bilinear"
        self.to(device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        if self.renormalise:
            x = torch.addcmul(self.shift.to(x.dtype), x, self.scale.to(x.dtype))
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            shrink = x.shape[-1] > self.size or x.shape[-2] > self.size
            x = F.interpolate(x, size=(self.size, self.size), mode=self.mode, align_corners=False, antialias=shrink)
        return x


class Distiller(TrainFeature):
    """The teacher and the distillation loss, called once per micro-batch inside the student's autocast.

    ``teacher``: the teacher model (on the trainer's device, eval mode, no gradients); ``order``:
    for each training class, the index of the teacher output with its name (None when the orders
    agree); ``view``: :class:`TeacherView`. The soft term is summed on the device between log steps
    and read by :meth:`log_metrics` only there (no per-step host sync). As a
    :class:`~tldist.train.feature.TrainFeature` it adds its term to every micro-batch's loss and logs
    ``train/kd_loss``; its checkpoint state (``distill``) records the teacher and the loss weights.
    """

    name = "distill"

    def __init__(self, teacher: nn.Module, view: TeacherView, *, alpha: float, temperature: float,
                 order: Optional[list[int]], device: Any, source: str = "", teacher_weights: str = ""):
        self.teacher, self.view, self.alpha, self.temperature = teacher, view, float(alpha), float(temperature)
        self.teacher_weights = teacher_weights
        """Which weights of the teacher were used (:meth:`tldist.artifacts.resolve.Artifact.describe`)."""
        self.order = torch.tensor(order, dtype=torch.long, device=device) if order is not None else None
        self.source = source
        self._soft_sum = torch.zeros((), dtype=torch.float32, device=device)
        self._count = 0

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's logits ``[B, C]`` for the student's batch, columns in the training class order.
        No autograd; runs in whatever autocast region the caller is in."""
        with torch.no_grad():  # inference_mode tensors could not be saved for the student's backward
            logits = self.teacher(self.view(images))
        return logits.index_select(1, self.order) if self.order is not None else logits

    def __call__(self, student_logits: torch.Tensor, images: torch.Tensor, hard_loss: torch.Tensor) -> torch.Tensor:
        """The distillation loss (scalar) for student logits ``[B, C]`` of ``images`` ``[B, 3, H, W]``
        (the student's normalised input) and the loop's ``hard_loss`` (scalar)."""
        loss, soft = distillation_loss(student_logits, self.teacher_logits(images), hard_loss, alpha=self.alpha,
                                       temperature=self.temperature)
        self._soft_sum += soft.detach()
        self._count += 1
        return loss

    def loss(self, loss: torch.Tensor, logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """The loop hook: the teacher sees the same images in the same autocast (see :meth:`__call__`)."""
        return self(logits, images, loss)

    def log_metrics(self) -> dict[str, float]:
        """``train/kd_loss``: the soft term (``T^2 * KL``) averaged over the micro-batches of every rank
        since the last call; resets the window (call on every rank, at log steps only)."""
        window = torch.stack([self._soft_sum.double().cpu(), torch.tensor(float(self._count), dtype=torch.float64)])
        total, count = all_reduce_sum(window).tolist()
        self._soft_sum.zero_()
        self._count = 0
        return {"train/kd_loss": total / max(count, 1.0)}

    def state_dict(self) -> dict[str, Any]:
        """What the run was distilled from, saved with each checkpoint: the teacher's location and the
        loss weights (the teacher itself is read-only and not saved; the metric window restarts)."""
        return {"teacher": self.source, "alpha": self.alpha, "temperature": self.temperature}

    def record(self) -> dict[str, Any]:
        """``distill``: the model's lineage in every checkpoint's model record (teacher, its weights, loss weights)."""
        return {"distill": {**self.state_dict(), "teacher_weights": self.teacher_weights}}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Warn when a resumed run is distilled from another teacher or with other weights than before
        (the result then differs from an uninterrupted run's)."""
        if d and d != self.state_dict():
            log.warning("resumed distillation differs from the checkpoint's: was %s, now %s", d, self.state_dict())


def match_teacher_classes(teacher_classes: list[str], classes: list[str], source: str) -> Optional[list[int]]:
    """For each training class, the index of the teacher output of the same name; None when the
    orders already agree. Raises :class:`UserError` naming ``source`` and the classes that differ."""
    if teacher_classes == classes:
        return None
    if set(teacher_classes) != set(classes) or len(teacher_classes) != len(classes):
        only_t = [c for c in teacher_classes if c not in set(classes)]
        only_s = [c for c in classes if c not in set(teacher_classes)]
        err = UserError(
            f"distill.teacher '{source}' was trained on other classes than data.train: teacher only "
            f"{_names(only_t)}, data only {_names(only_s)} ({len(teacher_classes)} vs {len(classes)} classes); "
            "distil on shards with the teacher's classes, or fine-tune a teacher on these")
        err.same_on_every_rank = True
        raise err
    return [teacher_classes.index(c) for c in classes]


def _names(items: list[str], n: int = 5) -> str:
    return "[" + ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "") + "]"


def build_distiller(cfg, classes: list[str], device: Any, *, mean: Sequence[float], std: Sequence[float],
                    image_size: int) -> Optional[Distiller]:
    """The :class:`Distiller` of ``cfg`` (:class:`tldist.config.DistillConfig`), or None without
    ``cfg.teacher``. ``classes``: the training classes in output order; ``mean``/``std`` ([0, 1]
    units) and ``image_size`` (px): the student's input normalisation and size; ``device``: the
    trainer's device, where the teacher is placed. Reads the teacher pickle-free through the one
    resolver (:func:`tldist.artifacts.resolve.load_model`: the weights ``tldist export`` would write, or
    ``distill.teacher_weights``); no collectives. Raises :class:`ConfigError` when the teacher
    is a plain weights file or a multi-task model, :class:`UserError` when it does not exist or its
    classes differ from ``classes`` by name.
    """
    if not cfg.teacher:
        return None
    path = Path(cfg.teacher).expanduser()
    weights = getattr(cfg, "teacher_weights", None)
    try:  # a missing path: JobConfig.validate names distill.teacher first
        art = resolve(path, weights=weights, flag="distill.teacher")
    except UserError as e:
        raise ConfigError(f"config key 'distill.teacher': {e}") from None
    require_model_record(art, "distill.teacher")
    if art.tasks:
        raise ConfigError(f"config key 'distill.teacher' has bad value '{cfg.teacher}': a multi-task model "
                          f"({len(art.tasks)} heads); give a single-head teacher")
    order = match_teacher_classes(art.classes, list(classes), str(cfg.teacher))
    loaded = load_model(path, weights=weights, flag="distill.teacher")
    pre = loaded.meta["preprocess"]
    teacher = loaded.model.to(device).eval().requires_grad_(False)
    view = TeacherView(mean, std, pre["mean"], pre["std"], pre["image_size"], pre.get("interpolation", "bilinear"),
                       device=device)
    log.info("distill: teacher %s (%s, %d px, %s) -> student at %d px; alpha %.3g, temperature %.3g%s",
             loaded.path, loaded.meta["model"], pre["image_size"], loaded.artifact.describe(), image_size, cfg.alpha,
             cfg.temperature, "; teacher outputs reordered by class name" if order is not None else "")
    return Distiller(teacher, view, alpha=cfg.alpha, temperature=cfg.temperature, order=order, device=device,
                     source=loaded.path, teacher_weights=loaded.artifact.describe())
