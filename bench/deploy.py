"""Deployment trade-offs: fp32 vs distilled student vs structured pruning vs int8, on one fine-tuned model.

Trains a resnet50 (from scratch: no pretrained weights can be downloaded here) on the demo's
handwritten-digits target at 32 px, then builds every variant with tldist's own code, each saved
and reloaded through its deployment format:

* ``fp32``          the resnet50 export (``model.safetensors`` + ``model.json``), eager
* ``student``       a resnet18 trained on the same shards with the resnet50's soft targets
                    (:func:`tldist.compress.prune.finetune` with ``teacher=``, i.e.
                    :func:`tldist.train.distill.distillation_loss`)
* ``pruned30/50``   torch-pruning channel removal at ratio 0.3 / 0.5 + plain recovery fine-tune,
                    written as an export and rebuilt from it (:mod:`tldist.compress.structured`)
* ``int8``, ``pruned50+int8``, ``student+int8``  FX static int8 (x86), calibrated on train
                    shards, frozen TorchScript (:mod:`tldist.compress.quantize`)

For each: top-1 on the val split (Δ vs fp32), parameters, file size, CPU latency at batch 1 and
32 on one thread (all variants interleaved, median of ``--runs``), ratios to fp32.

    python bench/deploy.py --out bench/results/deploy.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch



def load_export(path):
    """``(model, model record, head prefixes)`` of a model path, as tldist's commands load it."""
    from tldist.artifacts.resolve import load_model

    loaded = load_model(path)
    return loaded.model, loaded.meta, list(loaded.info.head)

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/tldist_deploy_work",
                    help="shards and exports, outside the repository (reused when present)")
    ap.add_argument("--out", "--json", dest="out", default="bench/results/deploy.json")
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--student", default="resnet18")
    ap.add_argument("--steps", type=int, default=200, help="training steps of the fp32 model (batch 32)")
    ap.add_argument("--lr", type=float, default=0.05, help="SGD learning rate of the fp32 model and the student")
    ap.add_argument("--recovery-steps", type=int, default=80)
    ap.add_argument("--student-steps", type=int, default=200)
    ap.add_argument("--runs", type=int, default=15, help="timed forward passes per variant and batch size")
    ap.add_argument("--threads", type=int, default=2, help="threads for training (latency always uses 1)")
    args = ap.parse_args()

    from tldist.artifacts.export import write_export
    from tldist.compress.measure import file_mb, measure_latency, script_bytes
    from tldist.evaluate import evaluate_shards as evaluate
    from tldist.compress.prune import finetune
    from tldist.compress.quantize import apply_static, calibration_batches, to_torchscript
    from tldist.compress.structured import PRUNED_KEY as META_KEY, apply_channel_pruning, count_params, pruning_record
    from tldist.config import ModelConfig
    from tldist.data.demo import write_demo_shards
    from tldist.models.factory import build_model
    from tldist.world import World

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    t_start = time.time()
    manifests = write_demo_shards(work / "shards", source_per_class=4, source_val_per_class=2)
    train, val = str(work / "shards/target/train"), str(work / "shards/target/val")
    classes = list(manifests["target/train"].classes)
    times: dict[str, float] = {}

    def export_of(name: str, arch: str, steps: int, teacher=None) -> Path:
        out = work / name
        if (out / "model.json").is_file():
            return out
        torch.manual_seed(0)
        model, info = build_model(ModelConfig(name=arch, pretrained=False), len(classes), image_size=32)
        meta = {"model": arch, "num_classes": len(classes), "classes": classes, "model_kwargs": info.model_kwargs,
                "preprocess": {"image_size": 32, "resize": 32, "crop_pct": 1.0, "mean": list(info.mean),
                               "std": list(info.std), "interpolation": "bilinear"}}
        t = time.time()
        finetune(model, meta, train, steps=steps, lr=args.lr, batch_size=32, num_workers=1, teacher=teacher)
        times[f"train_{name}_s"] = round(time.time() - t, 1)
        write_export(model, meta, out)
        return out

    fp32_dir = export_of("fp32", args.model, args.steps)
    fp32, meta, head = load_export(fp32_dir)
    student_dir = export_of("student", args.student, args.student_steps, teacher=copy.deepcopy(fp32))

    def pruned_of(ratio: float) -> Path:
        out = work / f"pruned{int(ratio * 100)}"
        if (out / "model.json").is_file():
            return out
        model, m, h = load_export(fp32_dir)
        t = time.time()
        stats = apply_channel_pruning(model, h, torch.randn(1, 3, 32, 32), ratio=ratio, norm=2, round_to=8,
                                      name=args.model)
        finetune(model, m, train, steps=args.recovery_steps, lr=0.02, batch_size=32, num_workers=1)
        times[f"prune_recover_{int(ratio * 100)}_s"] = round(time.time() - t, 1)
        write_export(model, {**m, META_KEY: pruning_record(stats, ratio=ratio, norm=2, round_to=8)}, out)
        return out

    dirs = {"fp32": fp32_dir, "student": student_dir, "pruned30": pruned_of(0.3), "pruned50": pruned_of(0.5)}
    models = {name: load_export(d)[0] for name, d in dirs.items()}  # every variant rebuilt from its export
    files = {name: file_mb(Path(d) / "model.safetensors") for name, d in dirs.items()}
    params = {name: count_params(m) for name, m in models.items()}
    calib = calibration_batches(train, meta, batches=8, batch_size=32, num_workers=1)
    example = torch.randn(2, 3, 32, 32)
    for src in ("fp32", "pruned50", "student"):
        name = "int8" if src == "fp32" else f"{src}+int8"
        torch.manual_seed(0)
        data = script_bytes(to_torchscript(apply_static(models[src], calib), example))
        path = work / f"{name.replace('+', '_')}.pt"
        path.write_bytes(data)
        from tldist.compress.measure import load_script

        models[name] = load_script(data)
        files[name] = round(len(data) / 1e6, 3)
        params[name] = params[src]
    fp32_ts = to_torchscript(models["fp32"], example)
    models["fp32 (TorchScript)"] = fp32_ts
    files["fp32 (TorchScript)"] = round(len(script_bytes(fp32_ts)) / 1e6, 3)
    params["fp32 (TorchScript)"] = params["fp32"]
    top1 = {name: evaluate(m, meta, val, World(), batch_size=64, num_workers=1)["top1"] for name, m in models.items()}
    lat = measure_latency(models, 32, batch_sizes=(1, 32), runs=args.runs, warmup=3, threads=1)
    rows = []
    for name in models:
        ms = lat["ms"][name]
        rows.append({"variant": name, "top1": top1[name], "delta": round(top1[name] - top1["fp32"], 2),
                     "params": params[name], "file_mb": files[name], "b1_ms": ms["b1"], "b32_ms": ms["b32"],
                     "b1_speedup": round(lat["ms"]["fp32"]["b1"] / ms["b1"], 2),
                     "b32_speedup": round(lat["ms"]["fp32"]["b32"] / ms["b32"], 2)})
    result = {"model": args.model, "student": args.student, "image_size": 32, "val": val, "val_count": None,
              "steps": args.steps, "lr": args.lr, "recovery_steps": args.recovery_steps, "student_steps": args.student_steps,
              "latency_runs": args.runs, "latency_threads": 1, "torch": torch.__version__, "rows": rows,
              "times_s": times, "total_s": round(time.time() - t_start, 1),
              "note": "shared 2-core machine (8 agents): latency interleaved across variants, medians"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("| variant | top-1 % (Δ) | params | file MB | b1 ms (x fp32) | b32 ms (x fp32) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['variant']} | {r['top1']:.2f} ({r['delta']:+.2f}) | {r['params'] / 1e6:.2f}M | {r['file_mb']:.1f} | "
              f"{r['b1_ms']:.1f} ({r['b1_speedup']:.2f}x) | {r['b32_ms']:.1f} ({r['b32_speedup']:.2f}x) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
