"""Classification metrics that stay exact across ranks.

Each rank accumulates integer counts over its (masked) samples; :meth:`EvalAccumulator.compute`
sums them across ranks, so padding batches and uneven splits never bias the result.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class EvalAccumulator:
    """Running sums of loss, top-1/top-5 hits and per-class counts for one eval pass."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        # [loss_sum, top1, top5, count] in float64 so large sets stay exact.
        self.totals = torch.zeros(4, dtype=torch.float64, device=device)
        self.class_hits = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.class_count = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add a batch; rows where ``mask`` is False (padding, undecodable samples) are ignored."""
        if mask is not None:
            logits, labels = logits[mask], labels[mask]
        if labels.numel() == 0:
            return
        logits = logits.float()
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hit = topk == labels[:, None]
        pred = topk[:, 0]
        self.totals += torch.stack([loss.double(), hit[:, 0].sum().double(), hit.any(1).sum().double(),
                                    torch.tensor(float(labels.numel()), dtype=torch.float64, device=labels.device)])
        ones = torch.ones_like(labels, dtype=torch.float64)
        self.class_count.index_add_(0, labels, ones)
        self.class_hits.index_add_(0, labels, hit[:, 0].double())
        self.confusion.index_put_((labels, pred), ones, accumulate=True)

    def compute(self) -> dict:
        """Sum over ranks (call on every rank) and return the metrics of the whole eval set.

        ``loss`` (mean cross-entropy, nats), ``top1``/``top5`` (in %), ``count`` (samples scored),
        ``per_class_acc`` (list of ``num_classes`` top-1 fractions in [0, 1]; ``nan`` for a class with
        no sample in the set: it was not measured, which is not 0) and ``confusion``
        (``[true][predicted]`` integer counts).
        """
        if dist.is_available() and dist.is_initialized():
            for t in (self.totals, self.class_hits, self.class_count, self.confusion):
                dist.all_reduce(t)
        loss_sum, top1, top5, n = self.totals.tolist()
        n_safe = max(n, 1.0)
        per_class = torch.where(self.class_count > 0, self.class_hits / self.class_count.clamp(min=1),
                                torch.full_like(self.class_hits, float("nan"))).tolist()
        return {"loss": loss_sum / n_safe, "top1": 100.0 * top1 / n_safe, "top5": 100.0 * top5 / n_safe,
                "count": int(n), "per_class_acc": per_class, "confusion": self.confusion.long().tolist()}
