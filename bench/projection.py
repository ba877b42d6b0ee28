"""Projected data-parallel scaling on N H100 GPUs: where data loading, compute and all-reduce bind.

Not a measurement: an arithmetic model whose every input is a named constant below, with its
source, and can be overridden on the command line. Parameter counts (hence gradient bytes) and
forward FLOPs are taken exactly from torchvision's model definitions and weight metadata.

Per model and GPU count N the model computes, per optimizer step of one GPU:

* compute      ``t_c = batch / compute_rate`` (one GPU alone, bf16 autocast);
* all-reduce   ring: every GPU sends and receives ``2 (N-1)/N x grad_bytes``, and with the ring laid
               out node by node so does each node's network: ``t_ar = 2 (N-1)/N x bytes / busbw +
               buckets x latency(N)`` with ``busbw`` = NVLink inside one 8-GPU node, and
               min(NVLink, the node's network x efficiency) across nodes;
* overlap      DDP reduces gradient buckets while backward runs (backward ~ 2/3 of ``t_c``); a
               fraction ``OVERLAP`` of backward can hide communication, the rest is exposed:
               ``t_step = t_c + max(0, t_ar - OVERLAP x 2/3 x t_c)``;
* data         each GPU's loader workers supply ``cores x per-core decode+augment rate x
               loader efficiency`` images/s (CPU decode); if that is below ``batch / t_step``
               the step waits for data.

Usage::

    python bench/projection.py [--resnet50-rate 3000] [--decode-rate 230] ...
"""

from __future__ import annotations

import argparse
import math

import common  # noqa: F401  (puts the repo on sys.path)
from common import table

# --------------------------------------------------------------------------------------------
# Assumptions (named, with sources). All rates are per GPU unless said otherwise.
# --------------------------------------------------------------------------------------------
RESNET50_IMG_S = 3000.0
"""ResNet-50 training images/s on one H100 SXM, bf16/AMP, channels_last, PyTorch, data already on
the GPU. NVIDIA DeepLearningExamples (PyTorch ResNet50 v1.5 README) lists about 2,600-2,800 img/s
per A100 80GB with AMP; convnets gain far less than the 3x tensor-core peak on H100 (Lambda's H100
analysis: ~2x for vision models). 3,000 is a deliberately conservative plain-PyTorch figure; a
fully tuned stack does much better (see MLPERF_RESNET50_IMG_S)."""
MLPERF_RESNET50_IMG_S = 6900.0
"""Upper bound for comparison: MLPerf Training v3.0 closed, 8x H100 SXM (MXNet + DALI, fully tuned)
reached 75.9% top-1 in 13.47 min (NVIDIA's published MLPerf 3.0 table); at ~35 epochs of 1.28 M
images, evaluation included, that is about 6,900 img/s per GPU."""
VIT_MFU = 0.25
"""Model FLOPs utilisation assumed for ViT-B/16 training in bf16 (attention with fused kernels).
Sanity check: timm-style training of ViT-B/16 on an A100 runs ~1,000 img/s, i.e. ~0.34 MFU of
312 TFLOP/s; 0.25 on H100 gives ~2,300 img/s, about 2.3x the A100 figure, in line with the
~2-3x H100/A100 gains reported for transformers with the same software."""
H100_BF16_DENSE_FLOPS = 989e12
"""H100 SXM dense BF16 tensor-core peak (NVIDIA H100 datasheet: 1,979 TFLOP/s with sparsity)."""
TRAIN_FLOPS_PER_FWD = 3.0
"""Training step ~ forward + backward (2x forward) = 3x forward FLOPs (standard estimate)."""
BACKWARD_FRACTION = 2.0 / 3.0
"""Share of the step's compute spent in backward, during which DDP can all-reduce."""
OVERLAP = 0.8
"""Fraction of backward that can hide communication: the first bucket is ready only after the
last layers' backward, and the last bucket's all-reduce starts when backward ends."""
NVLINK_BUSBW = 360e9
"""All-reduce bus bandwidth inside one 8x H100 NVSwitch node, bytes/s: NVLink 4 gives 450 GB/s
per direction per GPU (900 GB/s total, NVIDIA H100 datasheet); 80% of it is a typical NCCL
nccl-tests all_reduce busbw for large messages."""
IB_NODE_BW = 8 * 50e9
"""Inter-node bandwidth of one DGX H100 node, bytes/s per direction: 8 ConnectX-7 400 Gb/s NDR
InfiniBand NICs, one per GPU (NVIDIA DGX H100 user guide). NCCL runs one ring channel per NIC."""
ETHERNET_NODE_BW = 100e9 / 8
"""A commodity cluster for contrast: one 100 Gb/s Ethernet port per 8-GPU node."""
NET_EFFICIENCY = 0.8
"""Achieved fraction of the inter-node link rate (NCCL over IB/RoCE, large messages)."""
GPUS_PER_NODE = 8
BUCKET_BYTES = 25 * 2**20
"""DDP's default gradient bucket (``bucket_cap_mb=25``, torch.nn.parallel.DistributedDataParallel)."""
LATENCY_BASE_S = 20e-6
"""Fixed cost of one NCCL all-reduce call (kernel launch + protocol), seconds."""
LATENCY_HOP_S = 5e-6
"""Per-level latency of NCCL's tree/hierarchical algorithm, used at ``2 log2(N)`` levels (NCCL picks
trees for latency-bound sizes; a flat ring's latency would grow with N instead)."""
GRAD_BYTES_PER_PARAM = 4
"""DDP all-reduces gradients in the parameters' dtype: fp32 master weights under bf16 autocast.
A bf16 compression hook would halve it."""
CPU_CORES_PER_GPU = 12
"""Loader cores per GPU: DGX H100 has 2x 56-core Xeon 8480C = 112 cores for 8 GPUs (14 each), 2 of
them kept for the training process, the rest for loader workers."""
DECODE_IMG_S_PER_CORE = 230.0
"""PIL decode + RandomResizedCrop(224) + flip per core for ImageNet-sized JPEGs (~110 KB, ~400x350
px): DECODE_IMG_S_PER_CORE_SMALL / 2.5, since full-size ImageNet JPEGs carry ~2.5x the pixels of
256 px ones and decode time scales with pixels."""
DECODE_IMG_S_PER_CORE_SMALL = 580.0
"""The same for 256 px-short-side JPEGs (what ``tldist shards ... --max-side`` can write): measured
by bench/loader.py as the ceiling's images per CPU-second (581) on a 2-core AMD EPYC VM."""
LOADER_EFFICIENCY = 0.70
"""tldist's shard loader as a fraction of that ceiling, per CPU-second (bench/loader.py: 0.66-0.74)."""
BATCH = {"resnet50": 256, "vit_b_16": 128}
"""Per-GPU batch (NVIDIA's ResNet-50 recipe uses 256 per GPU with AMP; 128 is common for ViT-B/16)."""


def model_facts(name: str) -> tuple[int, float]:
    """(trainable parameters, forward GFLOPs per 224 px image) from torchvision itself."""
    import torchvision

    model = torchvision.models.get_model(name, weights=None)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights = torchvision.models.get_model_weights(name).DEFAULT
    gmacs = float(weights.meta["_ops"])  # torchvision reports multiply-accumulates as "GFLOPS"
    return params, 2.0 * gmacs


def allreduce_seconds(n: int, nbytes: float, nvlink: float, node_bw: float, net: str) -> tuple[float, str]:
    if n <= 1:
        return 0.0, "-"
    bw, link = (nvlink, "NVLink") if n <= GPUS_PER_NODE else (min(nvlink, node_bw * NET_EFFICIENCY), net)
    buckets = math.ceil(nbytes / BUCKET_BYTES)
    latency = buckets * (LATENCY_BASE_S + 2 * math.log2(n) * LATENCY_HOP_S)
    return 2 * (n - 1) / n * nbytes / bw + latency, link


def project(name: str, rate: float, n: int, a, node_bw: float, net: str) -> dict:
    params, _ = model_facts_cache[name]
    batch = BATCH[name]
    nbytes = params * GRAD_BYTES_PER_PARAM
    t_c = batch / rate
    t_ar, link = allreduce_seconds(n, nbytes, a.nvlink_busbw, node_bw, net)
    hide = a.overlap * BACKWARD_FRACTION / rate  # seconds of hiding per image of per-GPU batch
    exposed = max(0.0, t_ar - hide * batch)
    gpu_rate = batch / (t_c + exposed)  # GPU side only: compute + exposed communication
    supplies = {"full-size JPEG": a.cores * a.decode_rate * LOADER_EFFICIENCY,
                "256 px shards": a.cores * DECODE_IMG_S_PER_CORE_SMALL * LOADER_EFFICIENCY}
    bounds = {}
    for k, supply in supplies.items():
        if supply < gpu_rate:
            bounds[k] = f"data ({supply:.0f})"
        else:
            bounds[k] = "all-reduce" if exposed > 0.05 * t_c else "compute"
    return {"n": n, "batch": batch, "t_c": t_c, "mb": nbytes / 1e6, "t_ar": t_ar, "link": link,
            "exposed": exposed, "gpu_rate": gpu_rate, "eff": gpu_rate / rate,
            "min_batch": math.ceil(t_ar / hide) if t_ar else 0, "bounds": bounds}


model_facts_cache: dict[str, tuple[int, float]] = {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resnet50-rate", type=float, default=RESNET50_IMG_S, help="img/s per GPU, compute only")
    p.add_argument("--vit-mfu", type=float, default=VIT_MFU)
    p.add_argument("--nvlink-busbw", type=float, default=NVLINK_BUSBW, help="bytes/s")
    p.add_argument("--node-bw", type=float, default=IB_NODE_BW, help="inter-node bytes/s per node")
    p.add_argument("--overlap", type=float, default=OVERLAP)
    p.add_argument("--cores", type=int, default=CPU_CORES_PER_GPU, help="loader CPU cores per GPU")
    p.add_argument("--decode-rate", type=float, default=DECODE_IMG_S_PER_CORE, help="img/s per core")
    p.add_argument("--gpus", default="1,8,64,512")
    a = p.parse_args(argv)
    gpus = [int(x) for x in a.gpus.split(",")]
    for name in ("resnet50", "vit_b_16"):
        model_facts_cache[name] = model_facts(name)
    vit_gflops = model_facts_cache["vit_b_16"][1]
    vit_rate = a.vit_mfu * H100_BF16_DENSE_FLOPS / (TRAIN_FLOPS_PER_FWD * vit_gflops * 1e9)
    print("# Projection, not a measurement. Inputs: see the constants in bench/projection.py")
    for name, (params, gflops) in model_facts_cache.items():
        print(f"# {name}: {params:,} parameters -> {params * GRAD_BYTES_PER_PARAM / 1e6:.1f} MB of fp32 "
              f"gradients per step; {gflops:.2f} GFLOPs forward per 224 px image")
    print(f"# compute-only rate per H100: resnet50 {a.resnet50_rate:.0f} img/s (assumed), vit_b_16 "
          f"{vit_rate:.0f} img/s (MFU {a.vit_mfu}); loader supply per GPU {a.cores} cores x "
          f"{a.decode_rate:.0f} img/s x {LOADER_EFFICIENCY} = {a.cores * a.decode_rate * LOADER_EFFICIENCY:.0f} img/s")
    scenarios = [("resnet50", a.resnet50_rate, "ResNet-50, plain PyTorch rate"),
                 ("resnet50", MLPERF_RESNET50_IMG_S, "ResNet-50, MLPerf-tuned rate"),
                 ("vit_b_16", vit_rate, "ViT-B/16")]
    heads = ["GPUs", "batch/GPU", "global batch", "compute ms", "grad MB", "all-reduce ms", "exposed ms",
             "GPU-side img/s/GPU", "scaling eff.", "min batch/GPU to hide all-reduce", "bound, CPU decode of full-size JPEGs",
             "bound, CPU decode of 256 px shards"]
    for net, node_bw, short in (("8x 400 Gb/s InfiniBand per node", a.node_bw, "IB"),
                                ("100 Gb/s Ethernet per node", ETHERNET_NODE_BW, "Eth")):
        for name, rate, title in scenarios:
            if net.startswith("100") and "MLPerf" in title:
                continue
            rows = []
            for n in gpus:
                if net.startswith("100") and n <= GPUS_PER_NODE:
                    continue
                r = project(name, rate, n, a, node_bw, short)
                rows.append([n, r["batch"], f"{n * r['batch']:,}", f"{r['t_c'] * 1e3:.1f}", f"{r['mb']:.0f}",
                             f"{r['t_ar'] * 1e3:.2f} ({r['link']})", f"{r['exposed'] * 1e3:.2f}",
                             f"{r['gpu_rate']:.0f}", f"{r['eff']:.2f}", r["min_batch"] or "-",
                             r["bounds"]["full-size JPEG"], r["bounds"]["256 px shards"]])
            print(f"\n### {title}, {net} (compute-only {rate:.0f} img/s/GPU)\n")
            print(table(heads, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
