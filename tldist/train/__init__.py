"""Fine-tuning on many ranks: the entry point (:func:`run`), the loop and the pieces it plugs together.

:mod:`~tldist.train.main` (``build`` + ``run``), :mod:`~tldist.train.loop` (:class:`Trainer`),
:mod:`~tldist.train.parallelize` (placement, DDP, FSDP2, compile, precision), :mod:`~tldist.train.optim`
(optimizer, LR scaling, schedule), :mod:`~tldist.train.feature` (the plug-in interface) and its
features :mod:`~tldist.train.recipe` (Mixup/CutMix, the criterion), :mod:`~tldist.train.ema`,
:mod:`~tldist.train.distill`, :mod:`~tldist.train.multitask`; :mod:`~tldist.train.distributed`
(the ranks' stop vote, BatchNorm averaging) and :mod:`~tldist.train.tracking` (W&B).
"""

from tldist.train.loop import Trainer, request_stop
from tldist.train.main import build, run

__all__ = ["Trainer", "build", "request_stop", "run"]
