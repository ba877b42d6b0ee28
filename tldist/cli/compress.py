"""``tldist compress {prune,quantize,export}``: argument parsing and one-line summaries.

Each subcommand runs alone or under ``accelerate launch -m tldist.cli compress ...``; accuracy
is exact across ranks and only rank 0 prints and writes. Each command imports its library when it
runs (start-up time: see :mod:`tldist.cli.main`).
"""

from __future__ import annotations

import argparse
import os

from tldist.cli.options import add_weights_flag


def _main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _options(args: argparse.Namespace) -> dict:
    """The command's options for its W&B run's config."""
    return {k: v for k, v in vars(args).items() if k != "func"}


def _tracked(tracked, out: str, report: dict) -> dict:
    """Give a compress report to the job's W&B run (summary) with the output directory (a ``model`` artifact)."""
    tracked.summary(report)
    tracked.log_output_model(out)
    return report


def _cmd_prune(args: argparse.Namespace) -> int:
    from tldist.compress.prune import prune_export  # start-up time
    from tldist.train.job_runs import job_run

    with job_run("compress", args.model, weights=args.weights, config=_options(args)) as tracked:
        r = _tracked(tracked, args.out, prune_export(
            args.model, args.out, val=args.val, sparsity=args.sparsity, structured=args.structured, norm=args.norm,
            include_head=args.include_head, train=args.train, finetune_steps=args.finetune_steps, lr=args.lr,
            batch_size=args.batch_size, num_workers=args.num_workers, round_to=args.round_to, distill=args.distill,
            alpha=args.alpha, temperature=args.temperature, weights=args.weights))
    if _main():
        after = f"  recovered {r['recovered']['top1']:.2f}%" if r["recovered"] else ""
        amount = (f"params {r['params_before']} -> {r['params_after']}" if "params_after" in r
                  else f"sparsity {r['sparsity']:.4f}")
        print(f"{r['method']}: {amount}  top-1 {r['baseline']['top1']:.2f}% -> "
              f"{r['pruned']['top1']:.2f}%{after}  (delta {r['top1_delta']:+.2f})  -> {args.out}")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from tldist.compress.quantize import quantize_export  # start-up time
    from tldist.train.job_runs import job_run

    with job_run("compress", args.model, weights=args.weights, config=_options(args)) as tracked:
        r = _tracked(tracked, args.out, quantize_export(
            args.model, args.out, val=args.val, calib=args.calib, method=args.method, calib_batches=args.calib_batches,
            batch_size=args.batch_size, num_workers=args.num_workers, latency_runs=args.latency_runs,
            threads=args.threads, weights=args.weights))
    if _main():
        lat = r["latency"]["int8_vs_fp32"]
        print(f"int8 ({r['method']}): top-1 {r['fp32']['top1']:.2f}% -> {r['int8']['top1']:.2f}% "
              f"(delta {r['top1_delta']:+.2f})  size {r['size_mb']['fp32_torchscript']} -> "
              f"{r['size_mb']['int8_torchscript']} MB  latency int8/fp32 b1 {lat['b1']} b32 {lat['b32']}  -> {args.out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from tldist.compress.export_formats import export_formats  # start-up time
    from tldist.train.job_runs import job_run

    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    with job_run("compress", args.model, weights=args.weights, config=_options(args)) as tracked:
        r = export_formats(args.model, args.out, formats=formats, val=args.val, atol=args.atol,
                           num_workers=args.num_workers, weights=args.weights)
        tracked.summary(r)
    if _main():
        for fmt, c in r["formats"].items():
            print(f"{fmt}: {args.out}/{c['file']}  max |diff| {c['max_abs_diff']:.2e}  "
                  f"top-1 agreement {c['top1_agreement']:.3f}")
    return 0


def add_parsers(sub) -> None:
    """Register ``compress`` and its subcommands on the ``tldist`` command."""
    p = sub.add_parser("compress", help="prune, quantize (int8) or export (TorchScript/ONNX) an exported model")
    cs = p.add_subparsers(dest="compress_command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("model", help="export directory from 'tldist export', or a checkpoint or run directory")
        q.add_argument("--out", required=True, help="output directory to create")
        q.add_argument("--num-workers", type=int, default=1, help="loader processes per rank")
        add_weights_flag(q)

    q = cs.add_parser("prune", help="magnitude pruning (+ optional recovery fine-tune)")
    common(q)
    q.add_argument("--val", required=True, help="val shard set for the accuracy before/after")
    q.add_argument("--sparsity", "--ratio", type=float, required=True,
                   help="fraction of weights to zero, or with --structured of channels to remove")
    q.add_argument("--structured", action="store_true",
                   help="remove channels (torch-pruning dependency graph): a smaller, faster dense model")
    q.add_argument("--norm", type=int, default=2, help="channel importance norm for --structured: 1 or 2")
    q.add_argument("--round-to", type=int, default=8, help="--structured: keep channel counts multiples of this")
    q.add_argument("--distill", action="store_true", help="recovery fine-tune learns from the unpruned model too")
    q.add_argument("--alpha", type=float, default=0.5, help="--distill: weight of the soft (teacher) loss")
    q.add_argument("--temperature", type=float, default=4.0, help="--distill: softmax temperature")
    q.add_argument("--include-head", action="store_true", help="also prune the classification head")
    q.add_argument("--train", help="train shard set for the recovery fine-tune")
    q.add_argument("--finetune-steps", type=int, default=0, help="recovery steps (0: none)")
    q.add_argument("--lr", type=float, default=0.01, help="recovery learning rate (SGD, cosine)")
    q.add_argument("--batch-size", type=int, default=32)
    q.set_defaults(func=_cmd_prune)

    q = cs.add_parser("quantize", help="int8 post-training quantization; size, CPU latency and accuracy vs fp32")
    common(q)
    q.add_argument("--val", required=True, help="val shard set for fp32 vs int8 accuracy")
    q.add_argument("--calib", help="shard set to calibrate activation ranges on (static)")
    q.add_argument("--method", default="static",
                   help="static (FX, x86, calibrated; CNNs) or dynamic (Linear layers only: ViTs, MLPs)")
    q.add_argument("--calib-batches", type=int, default=8)
    q.add_argument("--batch-size", type=int, default=32)
    q.add_argument("--latency-runs", type=int, default=20, help="timed forward passes per model and batch size")
    q.add_argument("--threads", type=int, default=1, help="CPU threads for the latency measurement")
    q.set_defaults(func=_cmd_quantize)

    q = cs.add_parser("export", help="write TorchScript/ONNX files, each checked against the eager model")
    common(q)
    q.add_argument("--formats", default="torchscript", help="comma list of torchscript, onnx")
    q.add_argument("--val", help="val shard set whose images are the check inputs (default: seeded noise)")
    q.add_argument("--atol", type=float, default=1e-4, help="largest allowed |logit difference|")
    q.set_defaults(func=_cmd_export)
