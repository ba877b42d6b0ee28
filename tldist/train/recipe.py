"""Training-recipe pieces around the loss: Mixup/CutMix on the device batch and the criterion.

Mixup (Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization") and CutMix (Yun et al. 2019,
"CutMix: Regularization Strategy to Train Strong Classifiers with Localizable Features") are timm's
:class:`timm.data.Mixup` in ``batch`` mode: each batch is mixed with its own reverse
(``x.flip(0)``), one ``lam ~ Beta(alpha, alpha)`` per batch, CutMix boxes with timm's lambda
correction, label smoothing folded into the soft targets. The loss is then timm's
:class:`timm.loss.SoftTargetCrossEntropy`; without mixing it is ``nn.CrossEntropyLoss(label_smoothing=...)``.

Determinism: timm draws from numpy's global RNG. :class:`DeterministicMixup` seeds that RNG for
each micro-batch from ``(train.seed, rank, optimizer step, micro-batch index)`` and puts the global
state back afterwards, so the draws are a pure function of the position in training: every rank
draws its own, a resumed run continues the same draws (the step is restored), and nothing else in
the process that uses ``np.random`` shifts them or is shifted by them. There is no state to save.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from tldist.config import TrainConfig
from tldist.train.feature import TrainFeature

_STREAM = 0x6D697875  # "mixu": keeps these seeds apart from other users of (seed, rank)


def mixup_enabled(cfg: TrainConfig) -> bool:
    """Whether ``cfg`` turns Mixup or CutMix on (an alpha > 0 and ``mixup_prob`` > 0)."""
    return (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0) and cfg.mixup_prob > 0


class DeterministicMixup(TrainFeature):
    """timm's ``Mixup`` whose draws depend only on ``(seed, rank, step, micro)``.

    Call as ``images, targets = mixup(images, labels, step=s, micro=m)``: ``images`` is a float
    ``(B, C, H, W)`` device batch with ``B`` even (mixed in place and returned), ``labels`` int64
    ``(B,)`` class indices; ``targets`` is float32 ``(B, num_classes)`` on the images' device, each
    row summing to 1 (smoothed one-hot of the sample and of its partner ``B - 1 - i``, weighted
    ``lam`` and ``1 - lam``). The lam/box draw is host-side numpy: no device synchronisation.
    Raises ``AssertionError`` (timm's) for an odd batch; the config check refuses odd
    ``data.batch_size`` first.
    """

    def __init__(self, *, num_classes: int, mixup_alpha: float, cutmix_alpha: float, prob: float,
                 switch_prob: float, label_smoothing: float, seed: int, rank: int):
        from timm.data import Mixup

        self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob,
                           mode="batch", label_smoothing=label_smoothing, num_classes=num_classes)
        self.seed, self.rank = int(seed), int(rank)

    def _seed_words(self, step: int, micro: int) -> np.ndarray:
        parts = [_STREAM, self.seed % 2**63, self.rank, int(step), int(micro)]
        return np.random.SeedSequence(parts).generate_state(4)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, *, step: int,
                 micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        saved = np.random.get_state()
        try:
            np.random.seed(self._seed_words(step, micro))
            return self.mixup(images, labels)
        finally:
            np.random.set_state(saved)

    def batch(self, images: torch.Tensor, labels: torch.Tensor, *, step: int,
              micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The loop hook: the micro-batch mixed, labels as ``(B, num_classes)`` soft targets. Nothing is
        saved in checkpoints: the draws are a function of the position in training, restored with the step."""
        return self(images, labels, step=step, micro=micro)


def build_mixup(cfg: TrainConfig, num_classes: int, *, rank: int) -> Optional[DeterministicMixup]:
    """A :class:`DeterministicMixup` from ``train.mixup_alpha``, ``cutmix_alpha``, ``mixup_prob``,
    ``mixup_switch_prob`` and ``label_smoothing`` for this ``rank``, or None when both alphas are 0."""
    if not mixup_enabled(cfg):
        return None
    return DeterministicMixup(num_classes=num_classes, mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha,
                              prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob,
                              label_smoothing=cfg.label_smoothing, seed=cfg.seed, rank=rank)


def build_criterion(cfg: TrainConfig, mixup: Optional[DeterministicMixup], tasks: Any = None) -> Callable[..., torch.Tensor]:
    """The training loss ``criterion(logits, labels, batch) -> 0-d tensor`` (the batch mean): with
    ``model.heads=separate`` the :class:`~tldist.train.multitask.TaskHeads`' per-task cross-entropy
    (``batch["source"]`` says each sample's task); with Mixup/CutMix timm's ``SoftTargetCrossEntropy`` over
    ``(B, K)`` soft targets (label smoothing is already in the targets); else
    ``nn.CrossEntropyLoss(label_smoothing=...)`` over ``(B,)`` class indices."""
    if tasks is not None:
        return lambda logits, labels, batch: tasks.loss(logits, labels, batch["source"], cfg.label_smoothing)
    from timm.loss import SoftTargetCrossEntropy

    loss = SoftTargetCrossEntropy() if mixup is not None else nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    return lambda logits, labels, batch: loss(logits, labels)
