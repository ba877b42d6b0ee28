"""Throughput as the field reports it (issue 27, item 8): FLOPs per image counted once with FlopCounterMode,
perf/tflops_per_device and perf/mfu against a stated peak, the slowest rank's step time next to the mean."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tldist.train.perf import PEAK_TFLOPS, gpu_peak, peak_tflops, train_flops_per_image


def test_flops_of_a_linear_layer_by_hand():
    """Flatten + Linear(192 -> 10): forward 2*192*10 per image, the weight gradient as much again (no input
    gradient: the images need none); frozen weight: the forward only. Bias adds are not matmul FLOPs."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    assert train_flops_per_image(model, 8) == 2 * 2 * 192 * 10
    model[1].weight.requires_grad_(False)
    assert train_flops_per_image(model, 8) == 2 * 192 * 10


def test_resnet50_counts_three_forwards_and_leaves_the_model_alone():
    """torchvision records 4.089 G multiply-adds for a resnet50 forward at 224 px (weights meta ``_ops``): one
    training image is about 3 forwards (forward, input and weight gradients). A linear probe (frozen backbone)
    costs about one forward. Nothing of the model changes (meta tensors only)."""
    import torchvision

    model = torchvision.models.resnet50(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forward = 2 * 4.089e9
    full = train_flops_per_image(model, 224)
    assert 2.9 * forward < full < 3.05 * forward
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("fc."))
    probe = train_flops_per_image(model, 224)
    assert forward * 0.99 < probe < forward * 1.02
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name,precision,row,value", [
    ("NVIDIA H100 80GB HBM3", "bf16", "H100 SXM", 989.5), ("NVIDIA H100 PCIe", "bf16", "H100 PCIe", 756.5),
    ("NVIDIA H100 NVL", "fp16", "H100 NVL", 835.5), ("NVIDIA H200", "bf16", "H200 SXM", 989.5),
    ("NVIDIA H200 NVL", "tf32", "H200 NVL", 417.5), ("NVIDIA A100-SXM4-80GB", "fp32", "A100", 19.5),
    ("NVIDIA A100 80GB PCIe", "bf16", "A100", 312.0)])
def test_datasheet_peaks_by_device_name(name, precision, row, value):
    assert gpu_peak(name, precision) == (value, row)


def test_dense_peaks_are_half_the_sparsity_figures_of_the_datasheets():
    sparse_bf16 = {"H100 SXM": 1979, "H100 NVL": 1671, "H100 PCIe": 1513, "H200 SXM": 1979, "H200 NVL": 1671,
                   "A100": 624}
    for row, sparse in sparse_bf16.items():
        assert PEAK_TFLOPS[row]["bf16"] == sparse / 2 == PEAK_TFLOPS[row]["fp16"]
    assert gpu_peak("Tesla V100-SXM2-32GB", "bf16") is None


def test_cpu_peak_is_measured_or_stated_and_says_which():
    value, source = peak_tflops(torch.device("cpu"), "no", override=2.5)
    assert (value, source) == (2.5, "train.peak_tflops=2.5 (fp32)")
    value, source = peak_tflops(torch.device("cpu"), "no")
    assert value > 0 and source.startswith("measured fp32 1024x1024 matmul on this cpu")
