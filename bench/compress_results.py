"""Compression on the demo's digits target: fp32 vs pruned (with/without recovery) vs int8.

Reproduces the ``## Compression`` table of BENCHMARKS.md::

    .venv/bin/python bench/compress_results.py --out /tmp/tldist_bench/compress

Without ``--export`` it first writes the demo shards and trains resnet18 on the digits target with
``configs/demo_target.yaml`` (``--epochs``, one process), then ``tldist export``s it. Each variant is
made with the library calls behind ``tldist compress prune/quantize``; top-1 is on the full digits
val split. CPU latency of all variants is measured side by side in one run (interleaved, 1 thread,
batch 1 and 32) and given as a ratio to the fp32 eager model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine_line  # noqa: E402


def prepare(out: Path, epochs: int) -> Path:
    """Demo shards -> resnet18 trained on digits -> export directory."""
    from tldist.data.demo import write_demo_shards

    shards = out / "shards"
    if not (shards / "target" / "val").is_dir():
        write_demo_shards(shards, source_per_class=40)
    export = out / "export"
    if not (export / "model.json").is_file():
        env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
        tl = [sys.executable, "-m", "tldist.cli"]
        subprocess.run([*tl, "train", str(REPO / "configs/demo_target.yaml"), f"output_dir={out}/run",
                        "model.name=resnet18", f"data.train=[{shards}/target/train]", f"data.val={shards}/target/val",
                        "tracker.backend=none", f"train.epochs={epochs}"], check=True, env=env, cwd=REPO)
        subprocess.run([*tl, "export", str(out / "run"), str(export)], check=True, env=env, cwd=REPO)
    return export



def load_export(path):
    """``(model, model record, head prefixes)`` of a model path, as tldist's commands load it."""
    from tldist.artifacts.resolve import load_model

    loaded = load_model(path)
    return loaded.model, loaded.meta, list(loaded.info.head)

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/tldist_bench/compress")
    ap.add_argument("--export", help="existing export directory (skips training)")
    ap.add_argument("--shards", help="demo shard root holding target/{train,val} (default OUT/shards)")
    ap.add_argument("--epochs", type=int, default=12, help="training budget when no --export is given")
    ap.add_argument("--recovery-steps", type=int, default=100)
    ap.add_argument("--runs", type=int, default=30, help="timed runs per model and batch size")
    args = ap.parse_args()

    import torch

    from tldist.compress.measure import compressed_mb, file_mb, measure_latency
    from tldist.compress.prune import prune_export
    from tldist.compress.quantize import load_int8, quantize_export, to_torchscript

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    export = Path(args.export) if args.export else prepare(out, args.epochs)
    shards = Path(args.shards) if args.shards else out / "shards"
    train, val = str(shards / "target" / "train"), str(shards / "target" / "val")
    torch.set_num_threads(1)

    variants = {
        "unstructured 50%": dict(sparsity=0.5),
        "unstructured 50% + recovery": dict(sparsity=0.5, finetune_steps=args.recovery_steps),
        "structured 30%": dict(sparsity=0.3, structured=True),
        "structured 30% + recovery": dict(sparsity=0.3, structured=True, finetune_steps=args.recovery_steps),
    }
    rows: dict[str, dict] = {}
    models: dict[str, object] = {}
    fp32, meta, _ = load_export(export)
    size = int(meta["preprocess"]["image_size"])
    models["fp32"] = fp32
    models["fp32 TorchScript"] = to_torchscript(fp32, torch.randn(2, 3, size, size))
    baseline = None
    for i, (name, kw) in enumerate(variants.items()):
        d = out / f"pruned_{i}"
        r = prune_export(str(export), str(d), val=val, train=train, lr=0.01, batch_size=32, **kw)
        baseline = r["baseline"]
        final = r["recovered"] or r["pruned"]
        w = d / "model.safetensors"
        # structured pruning removes channels: report the fraction of parameters removed as its "sparsity"
        removed = r["sparsity"] if "sparsity" in r else 1 - r["params_after"] / r["params_before"]
        rows[name] = {"top1": final["top1"], "sparsity": removed, "mb": file_mb(w), "zlib_mb": compressed_mb(w),
                      "recovery": (r["finetune"] or {}).get("steps", 0)}
        models[name] = load_export(d)[0]
        print(f"{name}: top-1 {final['top1']:.2f}% (pruned {r['pruned']['top1']:.2f}%), sparsity {removed:.3f}",
              flush=True)
    q = quantize_export(str(export), str(out / "int8"), val=val, calib=train, calib_batches=8, latency_runs=3)
    models["int8 static"] = load_int8(out / "int8")[0]
    w = Path(export) / "model.safetensors"
    rows = {"fp32": {"top1": baseline["top1"], "sparsity": 0.0, "mb": file_mb(w), "zlib_mb": compressed_mb(w),
                     "recovery": 0},
            "fp32 TorchScript": {"top1": q["fp32"]["top1"], "sparsity": 0.0, "mb": q["size_mb"]["fp32_torchscript"],
                                 "zlib_mb": None, "recovery": 0},
            **rows,
            "int8 static": {"top1": q["int8"]["top1"], "sparsity": None, "mb": q["size_mb"]["int8_torchscript"],
                            "zlib_mb": compressed_mb(out / "int8" / "model_int8.pt"), "recovery": 0}}

    print("measuring latency side by side ...", flush=True)
    lat = measure_latency(models, size, batch_sizes=(1, 32), runs=args.runs, threads=1)
    ms = lat["ms"]
    lines = [machine_line(),
             f"# resnet18 on digits ({meta['num_classes']} classes, {size} px), val {baseline['count']} images; "
             f"latency: median of {args.runs} interleaved runs, 1 thread; ratio = variant / fp32 eager",
             "",
             "| variant | top-1 % | Δ top-1 | sparsity | size MB | zlib MB | latency b1 | latency b32 |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        sp = "-" if r["sparsity"] is None else f"{r['sparsity']:.3f}"
        z = "-" if r["zlib_mb"] is None else f"{r['zlib_mb']:.2f}"
        lines.append(f"| {name} | {r['top1']:.2f} | {r['top1'] - baseline['top1']:+.2f} | {sp} | {r['mb']:.2f} | {z} | "
                     f"{ms[name]['b1'] / ms['fp32']['b1']:.2f} | {ms[name]['b32'] / ms['fp32']['b32']:.2f} |")
    lines.append("")
    lines.append(f"fp32 eager: {ms['fp32']['b1']:.2f} ms (batch 1), {ms['fp32']['b32']:.2f} ms (batch 32)")
    table = "\n".join(lines)
    print("\n" + table)
    (out / "compress_results.json").write_text(json.dumps({"rows": rows, "latency": lat}, indent=1))
    (out / "compress_results.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
