"""``tldist compress``: make a fine-tuned model smaller or faster for deployment, and measure the cost.

Three jobs, each reading a model through the one resolver (:func:`tldist.artifacts.resolve.load_model`:
an export directory written by ``tldist export``, or a checkpoint or run directory with ``--weights``):

* :mod:`tldist.compress.prune` -- global unstructured magnitude pruning or structured (L1/L2)
  channel pruning (:mod:`tldist.compress.structured`), optional short recovery fine-tune; writes a new
  export directory.
* :mod:`tldist.compress.quantize` -- int8 post-training static quantization calibrated on shards
  (FX graph mode, x86 backend), Linear-only dynamic quantization as the fallback; writes an int8
  TorchScript file and reports size, CPU latency and top-1 against the fp32 model.
* :mod:`tldist.compress.export_formats` -- ONNX and TorchScript files, each checked against the
  eager model on the same inputs.

Accuracy is always measured with :func:`tldist.evaluate.evaluate_shards` (every rank scores its part
of the val split, counts are summed), so ``accelerate launch -m tldist.cli compress ...`` on N processes
gives the same numbers as one process; files are written by rank 0 only. Sizes and latency:
:mod:`tldist.compress.measure`.
"""

from tldist.compress.prune import prune_export
from tldist.compress.quantize import load_int8, quantize_export

__all__ = ["load_int8", "prune_export", "quantize_export"]
