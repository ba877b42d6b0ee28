"""Fixtures shared by ``unit/`` and ``e2e/``: tiny real shard sets written with tldist's own writer, a
briefly trained export, the dev SLURM cluster. Plain helpers are in ``helpers.py``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
sys.path.insert(0, str(Path(__file__).parent))

from helpers import STUDY_CONFIG, exif_jpeg, make_shard_set, tiny_image  # noqa: E402
from slurm_cluster import slurm_cluster, slurm_multinode  # noqa: E402,F401  (session-scoped dev SLURM clusters)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """5 train shards (uneven over 2 ranks x 2 workers) and 3 val shards, 4 classes, 16 px."""
    root = tmp_path_factory.mktemp("tiny_shards")
    make_shard_set(root / "train", split="train", n=300, shards=5)
    make_shard_set(root / "val", split="val", n=101, shards=3, seed=1)
    return root


@pytest.fixture(scope="session")
def tiny_export(tiny_shards, tmp_path_factory):
    """A briefly trained resnet18 (4 classes, 16 px) as an export directory (``tldist compress`` input).
    Shared by every module that takes it: tests only read it."""
    import torch

    from tldist.artifacts.export import write_export
    from tldist.compress.prune import finetune
    from tldist.config import ModelConfig
    from tldist.models.factory import build_model

    torch.manual_seed(0)
    model, info = build_model(ModelConfig(name="resnet18", pretrained=False), 4, image_size=16)
    meta = {"model": "resnet18", "num_classes": 4, "classes": ["c0", "c1", "c2", "c3"],
            "preprocess": {"image_size": 16, "resize": 18, "mean": list(info.mean), "std": list(info.std),
                           "interpolation": "bilinear"}}
    finetune(model, meta, str(tiny_shards / "train"), steps=60, lr=0.05, batch_size=16, num_workers=1)
    out = tmp_path_factory.mktemp("export") / "tiny"
    write_export(model, meta, out)
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """96 train samples in 3 shards and 20 val samples (the augmentation tests)."""
    root = tmp_path_factory.mktemp("aug_shards")
    make_shard_set(root / "train", split="train", n=96, shards=3)
    make_shard_set(root / "val", split="val", n=20, shards=1, seed=1)
    return root


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory):
    """Real JPEG shards from the project's writer, plus a mixed set (JPEG sizes/orientations, PNG)."""
    from tldist.data.sources import Sample
    from tldist.data.writer import write_shards

    root = tmp_path_factory.mktemp("jpeg_shards")
    make_shard_set(root / "train", split="train", n=96, shards=3, fmt="JPEG")
    make_shard_set(root / "val", split="val", n=37, shards=2, fmt="JPEG", seed=1)
    rng = np.random.default_rng(2)
    samples = []
    for i in range(64):
        kind = i % 4
        data = (tiny_image(i % 4, rng, size=32, fmt="PNG") if kind == 0 else
                exif_jpeg(int(rng.integers(20, 90)), int(rng.integers(20, 90)), i, orientation=1 + i % 8))
        samples.append(Sample(key=f"m{i:04d}", data=data, ext="png" if kind == 0 else "jpg", label=i % 4))
    write_shards(samples, root / "mixed", "train", [f"c{i}" for i in range(4)], max_count=20, max_size=None,
                 check="none")
    return root


@pytest.fixture(scope="module")
def study_data(tmp_path_factory):
    """4 classes: 120 train samples (30 each) in 3 shards, 40 val; a saved mobilenet_v3_small state dict
    as the "pretrained" backbone of the finetune and probe arms."""
    import torch

    from tldist.config import load_config
    from tldist.models.factory import build_model

    root = tmp_path_factory.mktemp("study_data")
    make_shard_set(root / "train", split="train", n=120, shards=3)
    make_shard_set(root / "val", split="val", n=40, shards=1, seed=1)
    model, _ = build_model(load_config(STUDY_CONFIG).model, 4, image_size=16)
    torch.save(model.state_dict(), root / "backbone.pt")
    return root
