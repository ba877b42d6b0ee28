"""``tldist pseudo-label`` and ``tldist adapt {adabn,lpft}``: argument parsing and summaries.

Every command works alone (1 process) or under ``accelerate launch``/``torchrun`` (call on every
rank); only the main process prints. Each command imports its library when it runs (start-up time:
see :mod:`tldist.cli.main`).
"""

from __future__ import annotations

import argparse
import os

from tldist.cli.options import add_weights_flag


# ---------------------------------------------------------------------------------------- commands

def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _options(args: argparse.Namespace) -> dict:
    """The command's options for its W&B run's config."""
    return {k: v for k, v in vars(args).items() if k != "func"}


def _cmd_pseudo_label(args: argparse.Namespace) -> int:
    from tldist.adapt.pseudo_label import format_summary, pseudo_label  # start-up time
    from tldist.train.job_runs import job_run

    with job_run("pseudo-label", args.model, weights=args.weights, config=_options(args)) as tracked:
        summary = pseudo_label(args.model, args.unlabelled, args.out, threshold=args.threshold, balance=args.balance,
                               max_per_class=args.max_per_class, ignore_labels=args.ignore_labels,
                               batch_size=args.batch_size, num_workers=args.num_workers, shards=args.shards,
                               weights=args.weights)
        tracked.summary(summary)
        tracked.log_output_dataset(args.out)
    if _is_main():
        print(format_summary(summary), flush=True)
    return 0


def _cmd_adabn(args: argparse.Namespace) -> int:
    from tldist.adapt.adabn import adabn, format_summary  # start-up time
    from tldist.train.job_runs import job_run

    with job_run("adapt", args.model, weights=args.weights, config={"method": "adabn", **_options(args)}) as tracked:
        summary = adabn(args.model, args.target, args.out, mode=args.mode, batches=args.batches,
                        batch_size=args.batch_size, num_workers=args.num_workers, val=args.val, weights=args.weights)
        tracked.summary(summary)
        tracked.log_output_model(args.out)
    if _is_main():
        print(format_summary(summary), flush=True)
    return 0


def _cmd_lpft(args: argparse.Namespace) -> int:
    from tldist.adapt.lpft import format_lpft, run_lpft  # start-up time
    from tldist.config import load_config

    summary = run_lpft(load_config(args.config, args.overrides), probe_epochs=args.probe_epochs, lr_ft=args.lr_ft,
                       lr_probe=args.lr_probe, probe_steps=args.probe_steps)
    if _is_main():
        print(format_lpft(summary), flush=True)
    return 0


def _data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass and process (default 64)")
    p.add_argument("--num-workers", type=int, default=1, help="loader worker processes per rank (default 1)")


def add_parsers(sub) -> None:
    """Register ``pseudo-label`` and ``adapt`` (``adabn``, ``lpft``) on the ``tldist`` command."""
    p = sub.add_parser("pseudo-label",
                       help="label unlabelled shards with a teacher; write the confident ones as shards",
                       description="Score --unlabelled with --model on every rank, keep predictions whose max softmax "
                                   ">= --threshold and write them (image bytes copied, pseudo-label as .cls) to --out. "
                                   "Fine-tune on them with data.train=[LABELLED,OUT] data.train_weights=[w1,w2].")
    p.add_argument("--model", required=True, help="teacher: export dir, checkpoint dir (step_*) or run dir (its best)")
    p.add_argument("--unlabelled", required=True, help="shard set to label (dir with manifest.json)")
    p.add_argument("--out", required=True, help="new shard set directory to write (split 'train')")
    p.add_argument("--threshold", type=float, default=0.9,
                   help="min max-softmax confidence to keep, in (0, 1] (default 0.9)")
    p.add_argument("--balance", action="store_true",
                   help="keep the same number per class: the smallest non-zero count")
    p.add_argument("--max-per-class", type=int, default=0,
                   help="keep at most N per class, most confident first (0: no cap)")
    p.add_argument("--ignore-labels", action="store_true",
                   help="the unlabelled shards' .cls are placeholders: skip the precision report and class check")
    p.add_argument("--shards", type=int, default=0, help="shards to write (default: as many as the unlabelled set)")
    add_weights_flag(p, "--model")
    _data_flags(p)
    p.set_defaults(func=_cmd_pseudo_label)

    adapt = sub.add_parser("adapt", help="domain adaptation: AdaBN, LP-FT")
    asub = adapt.add_subparsers(dest="adapt_command", required=True)
    p = asub.add_parser("adabn", help="re-estimate BatchNorm statistics on target-domain shards (no labels)",
                        description="AdaBN: replace every BatchNorm layer's running statistics by those of the target "
                                    "domain and write a new export dir. Exact and identical on every rank.")
    p.add_argument("--model", required=True, help="export dir, checkpoint dir (step_*) or run dir (its best)")
    p.add_argument("--target", required=True, help="target-domain shard set (labels unused)")
    p.add_argument("--out", required=True, help="export directory to write")
    p.add_argument("--batches", type=int, default=0,
                   help="use only the first N*batch-size target samples (manifest order; 0: all)")
    p.add_argument("--mode", choices=("population", "batch"), default="population",
                   help="population: exact, layer by layer (~K/2 forwards for K BN layers; default); "
                        "batch: one pass with per-batch normalisation")
    p.add_argument("--val", default=None, help="labelled shard set to report top-1 before and after")
    add_weights_flag(p, "--model")
    _data_flags(p)
    p.set_defaults(func=_cmd_adabn)

    p = asub.add_parser("lpft", help="linear probe, then full fine-tuning from the probe (LP-FT)",
                        description="Stage 1: transfer.strategy=linear_probe for --probe-epochs into OUTPUT_DIR/probe. "
                                    "Stage 2: transfer.strategy=full from the probe's best checkpoint at --lr-ft into "
                                    "OUTPUT_DIR/finetune with the config's epochs.")
    p.add_argument("config", help="YAML config of the fine-tuning job")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.1 train.epochs=5")
    p.add_argument("--probe-epochs", type=int, required=True, help="epochs of the linear-probe stage")
    p.add_argument("--probe-steps", type=int, default=0, help="cap the probe stage at N optimizer steps (0: epochs)")
    p.add_argument("--lr-ft", type=float, default=None, help="base LR of the full stage (default optim.lr / 10)")
    p.add_argument("--lr-probe", type=float, default=None, help="base LR of the probe stage (default optim.lr)")
    p.set_defaults(func=_cmd_lpft)
