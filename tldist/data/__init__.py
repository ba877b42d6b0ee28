"""Image data as WebDataset shard sets: writing them, and streaming them into training and eval.

Write side: :mod:`~tldist.data.sources` (image folders, CSV lists, torchvision datasets),
:mod:`~tldist.data.writer` (one stream of samples -> shards + manifest), :mod:`~tldist.data.ingest`
(planned, parallel, restartable writes), :mod:`~tldist.data.subset`, :mod:`~tldist.data.verify`,
:mod:`~tldist.data.demo` and :mod:`~tldist.data.glyphs` (the embedded demo data).

Read side: :mod:`~tldist.data.manifest` (shard sets, class lists), :mod:`~tldist.data.stream`
(deterministic, seekable record streams), :mod:`~tldist.data.tar`, :mod:`~tldist.data.worker`
(decode + transform + batch in loader workers), :mod:`~tldist.data.transforms`,
:mod:`~tldist.data.augment`, :mod:`~tldist.data.device_decode` and :mod:`~tldist.data.pipeline`
(the loaders).
"""

from tldist.data.manifest import Manifest, ShardInfo, eval_sets, load_manifest, read_classes
from tldist.data.pipeline import EvalLoader, TrainLoader, build_eval_loader, build_train_loader, check_data_config
from tldist.data.sources import Sample, SampleSource
from tldist.data.transforms import Normalizer, decode_image
from tldist.data.writer import write_shards

__all__ = [
    "EvalLoader",
    "Manifest",
    "Normalizer",
    "Sample",
    "SampleSource",
    "ShardInfo",
    "TrainLoader",
    "build_eval_loader",
    "build_train_loader",
    "check_data_config",
    "decode_image",
    "eval_sets",
    "load_manifest",
    "read_classes",
    "write_shards",
]
