"""int8 paths on torch 2.14.1 + torchao 0.18.0: FX static (tldist's default), PT2E static through
torchao, and dynamic int8 for Linear-heavy models (a ViT), each against fp32 on one CPU thread.

* ``--part pt2e``: resnet50 (random weights, 10 classes, 32 px). ``torch.export.export`` ->
  ``torchao.quantization.pt2e.quantize_pt2e.prepare_pt2e`` with ``X86InductorQuantizer`` ->
  calibration on random batches -> ``convert_pt2e``; run eager and under ``torch.compile``
  (inductor, the path that lowers to int8 kernels), saved with ``torch.export.save`` and read back
  with ``torch.export.load``. Prints the exact error of the plain flow, then retries with the
  workaround (see ``unshare_activation_partitions``).
* ``--part vit``: timm ``vit_small_patch16_224`` at 64 px (16 patches + cls token), fp32 vs
  ``torch.ao.quantization.quantize_dynamic`` on ``nn.Linear`` (tldist's ``--method dynamic``, also
  traced to TorchScript as ``compress quantize`` ships it) vs torchao
  ``quantize_(model, Int8DynamicActivationInt8WeightConfig())``.

Latency: all models of a part interleaved, median of ``--runs``, one thread, ratio to fp32 eager.

    python bench/int8_paths.py --part vit --out bench/results/int8_vit.json
    python bench/int8_paths.py --part pt2e --out bench/results/int8_pt2e.json
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn


def unshare_activation_partitions(gm: torch.fx.GraphModule, model: nn.Module) -> int:
    """Give every call of an activation module its own source partition (returns how many nodes).

    torch 2.14's ``torch.export`` no longer records ``source_fn_stack``, so
    ``get_source_partitions`` groups nodes by their innermost ``nn_module_stack`` entry; torchvision's
    ResNet blocks call one ``self.relu`` module two or three times, which becomes one partition with
    several outputs and makes ``X86InductorQuantizer`` raise "Input partition has more than one output
    node". Tagging each activation node with its own ``source_fn_stack`` entry restores one partition
    per call (node metadata only; the graph is unchanged)."""
    acts = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.GELU, nn.SiLU, nn.Hardswish)
    n_tagged = 0
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op != "call_function" or not stack or node.meta.get("source_fn_stack"):
            continue
        fqn, _ = list(stack.values())[-1]
        try:
            module = model.get_submodule(fqn)
        except AttributeError:
            continue
        if isinstance(module, acts):
            node.meta["source_fn_stack"] = [(f"{fqn}#{node.name}", type(module))]
            n_tagged += 1
    return n_tagged


def interleaved(models: dict, shape_of, runs: int, batch_sizes=(1, 32)) -> dict:
    from tldist.compress.measure import measure_latency

    return measure_latency(models, shape_of, batch_sizes=batch_sizes, runs=runs, warmup=2, threads=1)


def part_pt2e(args) -> dict:
    import torchvision
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    from tldist.compress.quantize import apply_static, to_torchscript

    torch.manual_seed(0)
    m = torchvision.models.resnet50(num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    batch = torch.export.Dim("batch", min=1, max=4096)
    calib = [torch.randn(16, 3, 32, 32) for _ in range(4)]
    out: dict = {"torch": torch.__version__}
    import torchao

    out["torchao"] = torchao.__version__

    def quantizer():
        q = xiq.X86InductorQuantizer()
        q.set_global(xiq.get_default_x86_inductor_quantization_config())
        return q

    gm = torch.export.export(m, (x,), dynamic_shapes=({0: batch},)).module()
    try:
        prepare_pt2e(gm, quantizer())
        out["plain_flow"] = "ok"
    except Exception as e:  # noqa: BLE001 - the failure text is the result
        out["plain_flow"] = f"{type(e).__name__}: {e}"
    gm = torch.export.export(m, (x,), dynamic_shapes=({0: batch},)).module()
    out["nodes_tagged"] = unshare_activation_partitions(gm, m)
    t = time.time()
    prepared = prepare_pt2e(gm, quantizer())
    with torch.no_grad():
        for c in calib:
            prepared(c)
    converted = convert_pt2e(prepared)
    out["quantize_s"] = round(time.time() - t, 1)
    ep = torch.export.export(converted, (x,), dynamic_shapes=({0: batch},))
    buf = io.BytesIO()
    torch.export.save(ep, buf, extra_files={"model.json": json.dumps({"format": "pt2e-int8"})})
    out["pt2_mb"] = round(len(buf.getvalue()) / 1e6, 2)
    buf.seek(0)
    extra = {"model.json": ""}
    loaded = torch.export.load(buf, extra_files=extra).module()
    out["pt2_extra_read_back"] = extra["model.json"]
    fx = to_torchscript(apply_static(m, calib), x)
    with torch.no_grad():
        ref = m(x)
        out["max_abs_diff_vs_fp32"] = {"pt2e": float((loaded(x) - ref).abs().max()), "fx": float((fx(x) - ref).abs().max()),
                                       "fp32_max_abs_logit": float(ref.abs().max())}
    models = {"fp32": m, "fx_static_torchscript": fx, "pt2e_eager": loaded}
    if args.compile:
        t = time.time()
        models["fp32_compiled"] = torch.compile(m)
        models["pt2e_compiled"] = torch.compile(loaded)
        with torch.no_grad():
            for name in ("fp32_compiled", "pt2e_compiled"):
                for bs in (1, 32):
                    models[name](torch.randn(bs, 3, 32, 32))
        out["compile_s"] = round(time.time() - t, 1)
    out["latency"] = interleaved(models, 32, args.runs)
    return out


def part_vit(args) -> dict:
    import timm
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    from tldist.compress.quantize import apply_dynamic, to_torchscript

    torch.manual_seed(0)
    m = timm.create_model("vit_small_patch16_224", img_size=64, num_classes=10).eval()
    x = torch.randn(8, 3, 64, 64)
    dyn = apply_dynamic(m)
    dyn_ts = to_torchscript(dyn, x[:2])
    ao = copy.deepcopy(m)
    quantize_(ao, Int8DynamicActivationInt8WeightConfig())
    out: dict = {"model": "timm vit_small_patch16_224 @64px", "params": sum(p.numel() for p in m.parameters())}
    with torch.no_grad():
        ref = m(x)
        out["max_abs_diff_vs_fp32"] = {"torch.ao dynamic": float((dyn(x) - ref).abs().max()),
                                       "torchao Int8DynamicActivationInt8Weight": float((ao(x) - ref).abs().max()),
                                       "fp32_max_abs_logit": float(ref.abs().max())}
        out["top1_agreement_vs_fp32"] = {"torch.ao dynamic": float((dyn(x).argmax(1) == ref.argmax(1)).float().mean()),
                                         "torchao": float((ao(x).argmax(1) == ref.argmax(1)).float().mean())}
    out["latency"] = interleaved({"fp32": m, "torch.ao dynamic (eager)": dyn, "torch.ao dynamic (TorchScript)": dyn_ts,
                                  "torchao int8 dyn act+weight": ao}, 64, args.runs)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("pt2e", "vit"), required=True)
    ap.add_argument("--out", "--json", dest="out", required=True)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="pt2e: also torch.compile fp32 and int8 (minutes)")
    args = ap.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = part_pt2e(args) if args.part == "pt2e" else part_vit(args)
    result["note"] = "shared 2-core machine (8 agents): latency interleaved, medians, 1 thread"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
