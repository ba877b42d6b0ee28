"""Beyond fine-tuning: pseudo-labelling, AdaBN and LP-FT on top of the training stack.

* :mod:`tldist.adapt.pseudo_label` - a teacher labels unlabelled shards; confident predictions
  become a new shard set to mix into the next fine-tuning round (``data.train=[labelled,pseudo]``).
* :mod:`tldist.adapt.adabn` - re-estimate BatchNorm statistics on target-domain shards (no labels).
* :mod:`tldist.adapt.lpft` - linear probe, then full fine-tuning from the probe (LP-FT).

Their command-line front end is :mod:`tldist.cli.adapt` (``tldist pseudo-label``, ``tldist adapt``).
"""

from tldist.adapt.adabn import adabn
from tldist.adapt.lpft import run_lpft
from tldist.adapt.pseudo_label import pseudo_label

__all__ = ["adabn", "pseudo_label", "run_lpft"]
