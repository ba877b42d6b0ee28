"""``tldist pseudo-label`` and ``tldist adapt {adabn,lpft}``; also runnable as ``python -m tldist.adapt.cli``.

Every command works alone (1 process) or under ``accelerate launch``/``torchrun`` (call on every
rank); only the main process prints. LP-FT (linear probe, then full fine-tuning from the probe's
best checkpoint at a lower LR) lives here because it is nothing but two calls of
:func:`tldist.train.main.run` with derived configs.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from tldist.errors import ConfigError, UserError


# ---------------------------------------------------------------------------------------- LP-FT

def run_lpft(cfg, *, probe_epochs: int, lr_ft: Optional[float] = None, lr_probe: Optional[float] = None,
             probe_steps: int = 0) -> dict[str, Any]:
    """Linear probe then full fine-tuning (LP-FT), in this process (call on every rank).

    Stage 1 (``<output_dir>/probe``): ``transfer.strategy=linear_probe`` for ``probe_epochs`` epochs
    (or ``probe_steps`` steps) at ``lr_probe`` (default: ``optim.lr``). Stage 2
    (``<output_dir>/finetune``): ``transfer.strategy=full`` from the probe's best checkpoint (else its
    latest) - backbone *and* probed head - at ``lr_ft`` (default ``optim.lr / 10``), with the
    config's own epochs/steps. Writes ``<output_dir>/lpft.json`` and returns both stages' results.
    """
    from tldist.train.checkpoint import CheckpointManager
    from tldist.train.main import run

    if probe_epochs < 1 or probe_steps < 0:
        raise ConfigError(f"--probe-epochs {probe_epochs} must be >= 1 and --probe-steps {probe_steps} >= 0")
    for flag, value in (("--lr-ft", lr_ft), ("--lr-probe", lr_probe)):
        if value is not None and not value > 0:
            raise ConfigError(f"{flag} {value} must be > 0")
    base = Path(cfg.output_dir)
    probe = copy.deepcopy(cfg)
    probe.output_dir, probe.run_name = str(base / "probe"), f"{cfg.run_name or base.name}-probe"
    probe.transfer.strategy = "linear_probe"
    probe.train.epochs, probe.train.max_steps = probe_epochs, probe_steps
    probe.optim.lr = lr_probe or cfg.optim.lr
    probe_result = run(probe)

    ckpts = CheckpointManager(base / "probe" / "checkpoints", keep_last=1, is_main=False)
    start = ckpts.best() or ckpts.latest()
    if start is None:
        raise UserError(f"the linear-probe stage left no checkpoint in {ckpts.root}")
    ft = copy.deepcopy(cfg)
    ft.output_dir, ft.run_name = str(base / "finetune"), f"{cfg.run_name or base.name}-finetune"
    ft.transfer.strategy = "full"
    ft.model.checkpoint = str(start)
    ft.optim.lr = lr_ft or cfg.optim.lr / 10
    ft_result = run(ft)

    keep = lambda r: {k: v for k, v in r.items() if isinstance(v, (int, float, str, bool)) or v is None}  # noqa: E731
    summary = {"probe": {**keep(probe_result), "lr": probe.optim.lr, "output_dir": probe.output_dir},
               "finetune": {**keep(ft_result), "lr": ft.optim.lr, "output_dir": ft.output_dir,
                            "init_checkpoint": str(start)}}
    if _is_main():
        base.mkdir(parents=True, exist_ok=True)
        (base / "lpft.json").write_text(json.dumps(summary, indent=1))
    return summary


def format_lpft(s: dict[str, Any]) -> str:
    """Both stages' LR, steps and top-1 as a few lines."""
    rows = []
    for stage in ("probe", "finetune"):
        r = s[stage]
        rows.append(f"  {stage:<9} lr {r['lr']:<8.3g} steps {r.get('step', '?'):<5} "
                    f"best top-1 {r.get('best_top1', float('nan')):6.2f}%  "
                    f"final top-1 {r.get('eval/top1', float('nan')):6.2f}%  ({r['output_dir']})")
    return "LP-FT\n" + "\n".join(rows)


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# ---------------------------------------------------------------------------------------- commands

def _cmd_pseudo_label(args: argparse.Namespace) -> int:
    from tldist.adapt.pseudo_label import format_summary, pseudo_label

    summary = pseudo_label(args.model, args.unlabelled, args.out, threshold=args.threshold, balance=args.balance,
                           max_per_class=args.max_per_class, ignore_labels=args.ignore_labels,
                           batch_size=args.batch_size, num_workers=args.num_workers, shards=args.shards)
    if _is_main():
        print(format_summary(summary), flush=True)
    return 0


def _cmd_adabn(args: argparse.Namespace) -> int:
    from tldist.adapt.adabn import adabn, format_summary

    summary = adabn(args.model, args.target, args.out, mode=args.mode, batches=args.batches,
                    batch_size=args.batch_size, num_workers=args.num_workers, val=args.val)
    if _is_main():
        print(format_summary(summary), flush=True)
    return 0


def _cmd_lpft(args: argparse.Namespace) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tldist", description="tldist adaptation commands")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m tldist.adapt.cli`` (same error handling as ``tldist``)."""
    from tldist.cli import dispatch

    return dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
