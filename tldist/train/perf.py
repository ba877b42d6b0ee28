"""Throughput as the field reports it: FLOPs per image, TFLOP/s per device and model FLOPs utilisation.

- :func:`train_flops_per_image`: the FLOPs of one training step (forward + backward) per image, counted
  once at start with ``torch.utils.flop_counter.FlopCounterMode`` on a shape-only (``meta``) copy of the
  model's parameters, so nothing is computed or changed. Frozen parameters get no weight gradients
  and are not counted for them; activation checkpointing's recomputation is not counted (it is applied
  after the count): this is *model* FLOPs, the MFU numerator of PaLM (Chowdhery et al. 2022, app. B). The
  trained model's only: a distillation teacher's forward is not counted.
- :func:`peak_tflops`: the denominator, one device's dense peak at the run's precision: ``train.peak_tflops``
  when set, else :data:`PEAK_TFLOPS` for NVIDIA H100/H200/A100, else (a CPU) a matmul measured once at
  start (:func:`measure_matmul_tflops`). The log says which.
- The loop logs ``perf/tflops_per_device = flops_per_image x images/s per rank / 1e12``,
  ``perf/mfu = perf/tflops_per_device / peak``, ``perf/step_time_s`` (mean over ranks) and
  ``perf/step_time_max_s`` (the slowest rank's: the step time every rank waits for).
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import torch
import torch.nn as nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

log = logging.getLogger("tldist")

PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.0},
    "H200 SXM": {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0},
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
}
"""Dense peak TFLOP/s per GPU (Tensor Cores for bf16/fp16/tf32, CUDA cores for fp32), from NVIDIA's datasheets:

- "NVIDIA H100 Tensor Core GPU" datasheet (nvidia.com/en-us/data-center/h100): H100 SXM BF16/FP16 1,979,
  TF32 989 TFLOPS, H100 NVL 1,671 / 835, both "with sparsity"; FP32 67 (SXM) / 60 (NVL). H100 PCIe (the
  earlier edition of that datasheet): 1,513 / 756 with sparsity, FP32 51.
- "NVIDIA H200 Tensor Core GPU" datasheet (nvidia.com/en-us/data-center/h200): H200 SXM BF16/FP16 1,979,
  TF32 989 with sparsity, FP32 67; H200 NVL 1,671 / 835, FP32 60.
- "NVIDIA A100 Tensor Core GPU" datasheet (nvidia.com/en-us/data-center/a100): BF16/FP16 312 (624 with
  sparsity), TF32 156 (312), FP32 19.5; the same for the 40 GB / 80 GB, SXM / PCIe parts.

The dense figure is half the "with sparsity" one (2:4 structured sparsity doubles the datasheet's peak); MFU is
reported against dense peaks, as PaLM and torchtitan do. ``fp32`` training counts against ``tf32`` when PyTorch
lets matmuls use TF32 (``torch.backends.cuda.matmul.allow_tf32`` or ``set_float32_matmul_precision("high")``).
"""


def train_flops_per_image(model: nn.Module, image_size: int, *, channels: int = 3, batch: int = 2) -> float:
    """FLOPs of one training step (forward + backward) per image of ``channels x image_size x image_size``.

    Counted with ``FlopCounterMode`` on ``meta`` stand-ins of the parameters and buffers (``functional_call``):
    no arithmetic is done and the model (weights, BatchNorm statistics, gradients) is left as it is. Parameters
    with ``requires_grad=False`` get no weight gradient, so a linear probe counts the head's backward only.
    ``batch`` images (2: BatchNorm refuses one in training mode) are counted and divided. Returns 0.0 (with a
    warning) for a model whose forward cannot run on ``meta`` tensors (data-dependent Python control flow).
    """
    params = {k: torch.empty_like(v, device="meta").requires_grad_(v.requires_grad)
              for k, v in model.named_parameters()}
    buffers = {k: torch.empty_like(v, device="meta") for k, v in model.named_buffers()}
    x = torch.empty(batch, channels, image_size, image_size, device="meta")
    was_training = model.training
    model.train()
    try:
        with FlopCounterMode(display=False) as counter:
            out = functional_call(model, {**params, **buffers}, (x,))
            out = out[0] if isinstance(out, (tuple, list)) else out
            if out.requires_grad:
                out.float().sum().backward()
        return counter.get_total_flops() / batch
    except Exception as e:  # noqa: BLE001 - only the perf/* metrics depend on it
        log.warning("could not count the model's FLOPs on meta tensors (%s: %s): perf/mfu is not logged",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return 0.0
    finally:
        model.train(was_training)


def gpu_peak(device_name: str, precision: str) -> Optional[tuple[float, str]]:
    """``(dense peak TFLOP/s, table row)`` of a CUDA device name (``NVIDIA H100 80GB HBM3``) at ``precision``
    (``bf16``, ``fp16``, ``tf32`` or ``fp32``); None for a GPU not in :data:`PEAK_TFLOPS`."""
    name = device_name.upper()
    if "H200" in name:  # GH200 (Grace Hopper) has H100 SXM's compute: the same row figures
        row = "H200 NVL" if "NVL" in name else "H200 SXM"
    elif "H100" in name:
        row = "H100 NVL" if "NVL" in name else "H100 PCIe" if "PCIE" in name else "H100 SXM"
    elif "A100" in name:
        row = "A100"
    else:
        return None
    return PEAK_TFLOPS[row][precision], row


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, *, n: int = 1024, seconds: float = 0.3) -> float:
    """TFLOP/s of repeated ``n x n`` matmuls in ``dtype`` on ``device`` for about ``seconds`` (after one warm-up):
    a stated, reproducible peak for devices without a datasheet figure (CPUs). On a CPU it uses the threads
    this process has (``torch.get_num_threads()``), i.e. what one rank can reach."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)
    reps, t0 = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        reps += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return 2 * n ** 3 * reps / elapsed / 1e12


def peak_tflops(device: torch.device, mixed_precision: str, override: float = 0.0) -> tuple[float, str]:
    """``(peak TFLOP/s of one device, where the figure comes from)`` for MFU at ``mixed_precision``
    (``no``/``bf16``/``fp16``): ``override`` (``train.peak_tflops``) when > 0; a CUDA device in
    :data:`PEAK_TFLOPS`; otherwise a matmul measured now (:func:`measure_matmul_tflops`, in the autocast
    dtype). ``(0.0, reason)`` on a ``meta`` device (nothing to measure)."""
    precision = {"bf16": "bf16", "fp16": "fp16"}.get(mixed_precision, "fp32")
    if override > 0:
        return override, f"train.peak_tflops={override:g} ({precision})"
    if device.type == "cuda":
        if precision == "fp32" and (torch.backends.cuda.matmul.allow_tf32
                                    or torch.get_float32_matmul_precision() != "highest"):
            precision = "tf32"
        name = torch.cuda.get_device_name(device)
        found = gpu_peak(name, precision)
        if found is not None:
            return found[0], f"{found[1]} {precision} dense peak, NVIDIA datasheet ({name})"
    if device.type == "meta":
        return 0.0, "no peak on a meta device"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    measured = measure_matmul_tflops(device, dtype)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    return measured, (f"measured {precision} 1024x1024 matmul on this {device.type}{threads} (no datasheet figure; "
                      "set train.peak_tflops to state another)")
