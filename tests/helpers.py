"""Plain helpers shared by the tests under ``unit/`` and ``e2e/`` (fixtures live in ``conftest.py``).

Import them as ``from helpers import ...``: ``conftest.py`` puts this directory on ``sys.path``. tldist
itself is imported inside the functions, so importing this module imports no library code.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


# ============================================================== processes: tldist, accelerate launch, spawn

def env() -> dict[str, str]:
    """The environment of a tldist subprocess: one thread, no W&B, the checkout importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}


def run(cmd: list[str], timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the repository root; with ``check``, a non-zero exit fails the test with its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}")
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tldist_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tldist.cli", *args]


def accelerate_cmd(config: str, *args: str, processes: int = 2) -> list[str]:
    """``accelerate launch`` of ``tldist.cli`` with ``configs/accelerate/<config>``."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs/accelerate" / config),
            "--num_processes", str(processes), "--main_process_port", str(_free_port()), "-m", "tldist.cli", *args]


def cli(*args: str, processes: int = 1) -> list[str]:
    """``tldist <args>`` in one process, or under ``accelerate launch`` (CPU config) with ``processes`` ranks."""
    if processes == 1:
        return tldist_cmd(*args)
    return accelerate_cmd("cpu.yaml", *args, processes=processes)


def launch_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``tldist <args>`` run to its end (any exit status), with ``env`` added to the environment."""
    return subprocess.run([sys.executable, "-m", "tldist.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def run_shards_cli(argv: list[str]) -> int:
    """``tldist shards ...`` in this process (its parser and command function); the exit status."""
    from tldist.cli.shards import add_parser

    parser = argparse.ArgumentParser(prog="tldist")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def tldist_main(capsys, *args: str) -> tuple[int, str]:
    """``tldist.cli.main(args)`` in this process: (exit status, stripped stderr)."""
    from tldist.cli import main

    code = main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


def spawn_ranks(worker, nprocs: int = 2) -> dict:
    """Run ``worker(rank, port, out)`` in ``nprocs`` spawned processes (a free local port for their
    process group) and return what each put into the shared dict ``out`` (keyed by rank)."""
    import torch.multiprocessing as mp

    port = _free_port()
    out = mp.get_context("spawn").Manager().dict()
    mp.spawn(worker, args=(port, out), nprocs=nprocs, join=True)
    return dict(out)


@contextlib.contextmanager
def serve_http(directory: Path, handler=None) -> Iterator[str]:
    """A real HTTP server on loopback serving ``directory`` (in a thread) with ``handler`` (a
    ``SimpleHTTPRequestHandler`` subclass; default: Python's own, quiet); yields its base URL."""
    import functools
    import http.server
    import threading

    if handler is None:
        handler = type("QuietHandler", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# ============================================================== training runs: overrides, traces, kills

BASE = [
    "model.pretrained=false", "data.image_size=16", "data.batch_size=8",
    "data.num_workers=2", "data.shuffle_buffer=64", "data.hflip=false", "optim.lr=0.05", "optim.lr_ref_batch=16",
    "train.log_every_steps=2", "tracker.backend=none",
]
# a resnet18 at 16 px that learns the tiny shard sets in a few dozen steps
TINY = ["model.name=resnet18", "model.pretrained=false", "data.image_size=16", "data.batch_size=16",
        "data.num_workers=1",
        "data.shuffle_buffer=64", "data.hflip=false", "optim.name=adamw", "optim.lr=0.003", "optim.lr_ref_batch=16",
        "train.log_every_steps=5", "tracker.backend=none"]


def overrides(shards: Path, out: Path, *extra: str) -> list[str]:
    """A run on ``shards/train`` (eval on ``shards/val``) with :data:`BASE` into ``out``."""
    return [f"data.train=[{shards}/train]", f"data.val={shards}/val", f"output_dir={out}", *BASE, *extra]


def read_trace(out: Path, rank: int) -> dict[int, list[str]]:
    """``{step: sample keys}`` of ``rank`` from a run with ``train.trace_samples=true``."""
    steps: dict[int, list[str]] = {}
    for line in (out / "trace" / f"rank{rank}.jsonl").read_text().splitlines():
        rec = json.loads(line)
        steps[rec["step"]] = rec["keys"]  # a resumed run re-does steps after its checkpoint: last wins
    return steps


def trace_len(out: Path) -> int:
    f = out / "trace" / "rank0.jsonl"
    return len(f.read_text().splitlines()) if f.is_file() else 0


def kill_at_step(cmd: list[str], out: Path, steps: int, limit: float = 180) -> int:
    """Start ``cmd`` (a run writing ``out/trace/rank0.jsonl``, ``train.trace_samples=true``), SIGKILL its
    whole process group once rank 0 traced ``steps`` optimizer steps; the steps traced by then."""
    proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    trace = out / "trace" / "rank0.jsonl"
    deadline = time.time() + limit
    while time.time() < deadline and proc.poll() is None:
        if trace.is_file() and len(trace.read_text().splitlines()) >= steps:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return len(trace.read_text().splitlines())


# ---- tldist submit/sweep (tldist.launch): the reference job and the preempted one run the same steps
LAUNCH_CONFIG = "configs/test_tiny.yaml"
LAUNCH_TOTAL_STEPS = 40
LAUNCH_TRAIN = [
    "model.pretrained=false", "data.image_size=16", "data.batch_size=8", "data.num_workers=1",
    "data.shuffle_buffer=64", "data.hflip=false", "optim.lr=0.05", "optim.lr_ref_batch=16",
    "train.log_every_steps=5", f"train.max_steps={LAUNCH_TOTAL_STEPS}", "train.trace_samples=true",
    "checkpoint.every_steps=4", "checkpoint.keep_last=2",
]


def launch_overrides(shards: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.train=[{shards}/train]", f"data.val={shards}/val", f"output_dir={out}", *LAUNCH_TRAIN, *extra]


def job_logs(folder: Path, job_id: str) -> str:
    return "\n".join(p.read_text() for p in sorted((folder / job_id).glob("*_log.*")))


def wandb_runs(out: Path) -> list[tuple[str, str]]:
    """(run id, group) of every offline W&B run segment under ``out``."""
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb_offline import _records

    found = []
    for f in sorted(out.glob("wandb/offline-run-*/run-*.wandb")):
        for raw in _records(f):
            rec = pb.Record()
            rec.ParseFromString(raw)
            if rec.WhichOneof("record_type") == "run":
                found.append((rec.run.run_id, rec.run.run_group))
                break
    return found


# ---- tldist study
STUDY_CONFIG = str(REPO / "configs" / "test_tiny.yaml")


def study_overrides(data: Path, *extra: str) -> list[str]:
    """A study cell's data (the ``study_data`` fixture) and its saved backbone."""
    return [f"data.train=[{data}/train]", f"data.val={data}/val", f"model.checkpoint={data}/backbone.pt",
            "data.num_workers=0", "data.shuffle_buffer=32", "optim.lr_ref_batch=8", *extra]


# ============================================================== images, shard sets and image trees

def tiny_image(label: int, rng: np.random.Generator, size: int = 16, fmt: str = "PNG") -> bytes:
    """A learnable synthetic image: a bright square whose position and colour encode the class."""
    img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    q = size // 4
    r, c = divmod(label % 16, 4)
    img[r * q:(r + 1) * q, c * q:(c + 1) * q, label % 3] = 230
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def make_shard_set(out: Path, *, split: str, n: int, shards: int, num_classes: int = 4, seed: int = 0,
                   fmt: str = "PNG", prefix: str = "s"):
    """Write ``n`` samples in ``shards`` shards with the production writer; returns the Manifest."""
    from tldist.data.sources import Sample
    from tldist.data.writer import write_shards

    rng = np.random.default_rng(seed)
    ext = "png" if fmt == "PNG" else "jpg"
    samples = [Sample(key=f"{prefix}{split}{i:05d}", data=tiny_image(i % num_classes, rng, fmt=fmt), ext=ext,
                      label=i % num_classes) for i in range(n)]
    per_shard = -(-n // shards)
    return write_shards(samples, out, split, [f"c{i}" for i in range(num_classes)], max_count=per_shard,
                        max_size=None, check="none")


def samples_of(shard_dir: Path) -> list[tuple[str, bytes, str]]:
    """``(key, image bytes, class name)`` of every sample of a shard set, in manifest order."""
    from tldist.data.manifest import IMAGE_EXTS, load_manifest, resolve_shard_urls
    from tldist.data.stream import read_shard

    m = load_manifest(shard_dir)
    out = []
    for url, info in zip(resolve_shard_urls(m), m.shards):
        for rec in read_shard(url, 0, info.num_samples):
            ext = next(e for e in IMAGE_EXTS if e in rec.fields)
            out.append((rec.key, rec.fields[ext], m.classes[int(rec.fields["cls"])]))
    return out


def relabelled_copy(src: Path, out: Path, classes: list[str], keep: Optional[set[str]] = None,
                    shards: int = 3) -> int:
    """Write the samples of ``src`` (those whose class is in ``keep``) with the class list ``classes``
    (labels follow the names), like ``tldist shards --classes c3,c2,...``; returns the sample count."""
    from tldist.data.sources import Sample
    from tldist.data.writer import write_shards

    rows = [(k, d, c) for k, d, c in samples_of(src) if keep is None or c in keep]
    per_shard = -(-len(rows) // shards)
    write_shards([Sample(key=k, data=d, ext="png", label=classes.index(c)) for k, d, c in rows], out, "val",
                 classes, max_count=per_shard, max_size=None, check="none")
    return len(rows)


def shards_with_corrupt_rank1_shards(root: Path, corrupt_positions: list[int]) -> Path:
    """8 JPEG shards of 50 samples; the shards at ``corrupt_positions`` of epoch 0's shard order hold
    only undecodable images. With 2 ranks and data.num_workers=0, rank 1 reads positions 4..7."""
    from tldist.data.sources import Sample
    from tldist.data.stream import shard_order
    from tldist.data.writer import write_shards

    order = shard_order(8, 0, 0)  # data.seed=0, stream-epoch 0
    bad = {int(order[p]) for p in corrupt_positions}
    rng = np.random.default_rng(0)
    samples = [Sample(key=f"s{i:05d}", ext="jpg", label=i % 4,
                      data=b"\xff\xd8 not a jpeg" if i // 50 in bad else tiny_image(i % 4, rng, fmt="JPEG"))
               for i in range(400)]
    write_shards(samples, root / "train", "train", [f"c{i}" for i in range(4)], max_count=50, max_size=None,
                 check="none")
    return root / "train"


def exif_jpeg(w: int, h: int, seed: int, orientation: int = 1, mode: str = "RGB") -> bytes:
    """A blocky w x h JPEG (distinct 8 px blocks, so different crops give different pixels) with an EXIF orientation."""
    rng = np.random.default_rng(seed)
    arr = np.kron(rng.integers(0, 255, (-(-h // 8), -(-w // 8), 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
    img = Image.fromarray(arr[:h, :w]).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


# ---- loader inputs (tldist.data.pipeline / stream): hand-written shards, 3 classes
PIPELINE_SIZE = 16


def solid_jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 18), ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)).save(buf, "JPEG")
    return buf.getvalue()


def write_pipeline_set(root: Path, counts, classes=("a", "b", "c"), prefix="s", corrupt=()) -> dict[str, int]:
    """Shards ``train-00000N.tar`` with ``counts`` samples, a manifest; returns key -> label."""
    import webdataset as wds

    from tldist.data.manifest import Manifest, ShardInfo

    root.mkdir(parents=True, exist_ok=True)
    labels, shards = {}, []
    for s, n in enumerate(counts):
        name = f"train-{s:06d}.tar"
        with wds.TarWriter(str(root / name)) as w:
            for i in range(n):
                key = f"{prefix}{s}_{i:04d}"
                labels[key] = (s + i) % len(classes)
                w.write({"__key__": key, "jpg": b"\xff\xd8 not a jpeg" if key in corrupt else solid_jpeg(i),
                         "cls": str(labels[key])})
        shards.append(ShardInfo(name, n))
    Manifest("train", list(classes), shards).save(root)
    return labels


def pipeline_cfg(train, **kw):
    """A :class:`~tldist.config.DataConfig` reading ``train`` with 2 workers, batches of 8."""
    from tldist.config import DataConfig

    base = dict(train=[str(t) for t in train], batch_size=8, num_workers=2, shuffle_buffer=16, pin_memory=False)
    base.update(kw)
    return DataConfig(**base)


# ---- shard writing and checking (tldist shards, tldist.data.writer / ingest / verify)
def noise_jpeg(seed: int, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_jpeg_set(out, corrupt_key: str | None = None):
    """9 JPEG samples in 3 shards of 3 classes; ``corrupt_key``'s image cut in half (its header intact)."""
    from tldist.data.sources import Sample
    from tldist.data.writer import write_shards

    samples = []
    for i in range(9):
        data = noise_jpeg(i)
        if f"s{i}" == corrupt_key:
            data = data[: len(data) // 2]  # header intact, entropy data cut
        samples.append(Sample(f"s{i}", data, "jpg", i % 3))
    return write_shards(samples, out, "train", ["a", "b", "c"], max_count=3, check="none")


def image_bytes(seed: int, fmt: str = "JPEG", size: int = 12) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def make_image_tree(root: Path, per_class: int = 5, classes=("cat", "dog", "eel")) -> dict[Path, int]:
    """Class tree with mixed formats, upper-case extensions, a nested dir and a non-image file."""
    files = {}
    for c, name in enumerate(classes):
        for i in range(per_class):
            ext, fmt = [("jpg", "JPEG"), ("PNG", "PNG"), ("jpeg", "JPEG")][i % 3]
            sub = root / name / ("nested" if i == 4 else "")
            sub.mkdir(parents=True, exist_ok=True)
            path = sub / f"img.{i}.{ext}"
            path.write_bytes(image_bytes(100 * c + i, fmt))
            files[path] = c
        (root / name / "notes.txt").write_text("not an image")
    return files


def read_tar_samples(path: str | Path) -> dict[str, dict[str, bytes]]:
    """``{key: {extension: bytes}}`` of a shard, read with tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def photo(seed: int, size: int = 48, fmt: str = "JPEG", mode: str = "RGB", **save) -> bytes:
    """A smooth random image (decodes like a photo, unlike noise) in ``fmt``/``mode``."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
    img = Image.fromarray(np.kron(small, np.ones((8, 8, 1), dtype=np.uint8))).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def odd_files() -> dict[str, bytes]:
    """The corrupt and odd inputs of issue 18: name -> bytes (good ones must be kept at any check level)."""
    whole = photo(99, 64)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(np.tile(np.linspace(0, 65535, 40), (40, 1)).astype(np.uint16)).save(buf, "PNG")
    return {"truncated.jpg": whole[: len(whole) * 6 // 10], "garbage.jpg": b"\xff\xd8 not really a jpeg",
            "cut.png": photo(98, fmt="PNG")[:-20], "empty.png": b"",
            "gray16.png": buf.getvalue(), "cmyk.jpg": photo(97, mode="CMYK"), "exif6.jpg": photo(96, exif=exif.tobytes())}


BAD_ODD_FILES = {"truncated.jpg", "garbage.jpg", "cut.png", "empty.png"}  # the undecodable ones of odd_files()


def make_photo_tree(root: Path, per_class: int = 12, odd: bool = True) -> Path:
    """An image folder of 3 classes (ant, bee, cow) of photos; with ``odd``, :func:`odd_files` in bee."""
    for c, name in enumerate(("ant", "bee", "cow")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / name / f"{i:03d}.jpg").write_bytes(photo(100 * c + i))
    if odd:
        for fname, data in odd_files().items():
            (root / "bee" / fname).write_bytes(data)
    return root


def files_of(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


# ============================================================== models, checkpoints, exports

def exported(path, **kw):
    """``(model, record)`` of the model at ``path`` (an export, checkpoint or run dir), as every command loads it."""
    from tldist.artifacts.resolve import load_model

    loaded = load_model(path, **kw)
    return loaded.model, loaded.meta


def train_states(model, optimizer, scheduler, **extra) -> dict:
    """The checkpoint states of a run with this model, optimizer and scheduler (plus ``extra`` ones)."""
    from tldist.artifacts.checkpoint import ModelState, OptimizerState, RngState

    return {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer), "scheduler": scheduler,
            "rng": RngState(), **extra}


def checkpoint_manager(root, model, optimizer, scheduler, *, keep_last=2, config_yaml="", model_record=None,
                       **extra):
    """A :class:`~tldist.artifacts.checkpoint.CheckpointManager` on rank 0 of one process for these states."""
    from tldist.artifacts.checkpoint import CheckpointManager

    return CheckpointManager(root, states=train_states(model, optimizer, scheduler, **extra), keep_last=keep_last,
                             is_main=True, config_yaml=config_yaml, model_record=model_record)


def ema_checkpoint(root, best_metric: str, with_ema: bool = True):
    """A real checkpoint (mobilenet_v3_small, 4 classes) whose EMA differs from its weights (``with_ema=False``:
    the same checkpoint saved without its EMA, as a run with ``train.ema_decay=0`` writes it)."""
    from tldist.artifacts.export import model_record
    from tldist.config import JobConfig, format_config
    from tldist.models.factory import build_model
    from tldist.train.ema import WeightEma
    from tldist.train.optim import build_scheduler

    cfg = JobConfig()
    cfg.model.name, cfg.model.pretrained, cfg.data.image_size = "mobilenet_v3_small", False, 16
    cfg.train.ema_decay, cfg.checkpoint.best_metric = 0.9, best_metric
    model, info = build_model(cfg.model, 4, image_size=16)
    ema = WeightEma(model, model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    ema.update(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = build_scheduler(opt, warmup_steps=0, total_steps=2, min_ratio=0.0)
    record = model_record(info, classes=["c0", "c1", "c2", "c3"], image_size=16,
                          weights="ema" if best_metric.startswith("eval_ema/") else "raw")
    mgr = checkpoint_manager(root, model, opt, sched, config_yaml=format_config(cfg), model_record=record,
                             **({"ema": ema} if with_ema else {}))
    return mgr.save(2, trainer={"classes": ["c0", "c1", "c2", "c3"], "image_size": 16}, metric=50.0)


def evaluate_export(model, meta, val):
    """The eval metrics of ``model`` (with its export record ``meta``) on the shard set ``val``, one process."""
    from tldist.evaluate import evaluate_shards
    from tldist.world import World

    return evaluate_shards(model, meta, str(val), World(), batch_size=32)


def model_cfg(name="resnet18", **kw):
    """``ModelConfig(name)``, not pretrained unless ``pretrained=True`` is given."""
    from tldist.config import ModelConfig

    return ModelConfig(name=name, pretrained=kw.pop("pretrained", False), **kw)


def eval_forward(model, x):
    with torch.no_grad():
        return model.eval()(x)


def large_batch_optimizer(name, model, info, weight_decay=0.05, **kw):
    """LAMB or LARS (``name``) over the param groups tldist.train.main.build makes for ``model``."""
    from tldist.config import OptimConfig
    from tldist.models import build_param_groups
    from tldist.train.optim import build_optimizer

    groups = build_param_groups(model, info, weight_decay=weight_decay, layer_decay=0.5, head_lr_mult=10.0,
                                split_no_decay=name in ("lamb", "lars"))  # as tldist.train.main.build does
    return build_optimizer(OptimConfig(name=name, weight_decay=weight_decay, **kw), groups, lr=0.01)


# ---- torchvision's pretrained googlenet/inception_v3, without a download
AUX = ("googlenet", "inception_v3")
SIZES = {"googlenet": 64, "inception_v3": 75}  # small inputs these architectures accept
# What torchvision's googlenet/inception_v3 builders construct when given weights (googlenet.py, inception.py).
TV_WITH_WEIGHTS = {"transform_input": True, "aux_logits": True, "init_weights": False}


def hub_file(weights) -> str:
    return os.path.basename(weights.url)


def fake_download(monkeypatch, tmp_path, name, seed=0):
    """A fresh TORCH_HOME whose hub cache holds random weights for ``name``'s DEFAULT weights, in the
    format and architecture of the real file: what a download would have put there."""
    from torchvision.models import get_model, get_model_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    weights = get_model_weights(name).DEFAULT
    torch.manual_seed(seed)
    ref = get_model(name, num_classes=len(weights.meta["categories"]), **(TV_WITH_WEIGHTS if name in AUX else {}))
    calibrate_bn(ref, SIZES.get(name, 64))
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(ref.state_dict(), cache / hub_file(weights))
    return weights


def calibrate_bn(model, size):
    """Set BatchNorm running statistics from a few random batches, as training leaves them: with the
    init statistics (0, 1) a deep random net's output hardly depends on its input."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    aux = {n: getattr(model, n) for n in ("AuxLogits", "aux1", "aux2") if getattr(model, n, None) is not None}
    for n in aux:  # auxiliary heads (dropped after loading anyway) need larger inputs in training mode
        setattr(model, n, None)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, size, size))
    for m in bns:
        m.momentum = 0.1
    for n, m in aux.items():
        setattr(model, n, m)


# ---- run locks (tldist.artifacts.lock)
def write_lock(out: Path, **fields) -> Path:
    """A lock file in ``out`` as a holder with ``fields`` (defaults: this host and boot, pid 1) wrote it."""
    from tldist.artifacts.lock import LOCK_NAME, boot_id, pid_namespace

    info = {"host": socket.gethostname(), "pid": 1, "started": "2026-01-01 00:00:00 UTC", "start_time": 0.0,
            "job_id": None, "restart": 0, "heartbeat_s": 30.0, "boot_id": boot_id(), "pid_ns": pid_namespace(),
            "proc_start": None, "token": "t0"}
    info.update(fields)
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_NAME).write_text(json.dumps(info))
    return out / LOCK_NAME


def checkpoint_weights(ckpt: Path, weights: str = "raw") -> dict:
    """The full model state of a checkpoint directory (its sharded DCP part, read like ``tldist export`` reads it)."""
    from tldist.artifacts.resolve import read_weights, resolve

    return read_weights(resolve(ckpt, weights=weights))


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
"""Credentials and region for the local S3-protocol server (moto accepts any)."""


@contextlib.contextmanager
def moto_s3(*buckets: str) -> Iterator[tuple[str, object]]:
    """A real S3-protocol server: moto's standalone ``moto_server`` (the ``moto[server]`` package of the ``dev``
    extra) on a free loopback port, with ``buckets`` created; yields ``(endpoint URL, boto3 client)``."""
    import pytest

    pytest.importorskip("moto.server", reason="moto[server] (in the 'dev' extra) is not installed")
    boto3 = pytest.importorskip("boto3", reason="boto3 (the 's3' extra, in 'dev') is not installed")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **S3_ENV})
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
    try:
        for _ in range(200):
            try:
                client.list_buckets()
                break
            except Exception:  # not listening yet
                if proc.poll() is not None:
                    pytest.fail(f"moto_server exited with status {proc.returncode}")
                time.sleep(0.1)
        else:
            pytest.fail("moto_server did not answer within 20 s")
        for b in buckets:
            client.create_bucket(Bucket=b)
        yield endpoint, client
    finally:
        proc.terminate()
        proc.wait(timeout=10)
