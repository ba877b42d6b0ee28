"""The ``tldist`` command: one subcommand per job, each a thin call into the library.

All argparse of tldist lives in this package (:mod:`tldist.cli`); the libraries never import it.
User mistakes (:class:`tldist.errors.UserError`) print one clear line and exit with status 2
(:mod:`tldist.cli.dispatch`).

Start-up time: each command imports its library when it runs (the one kind of function-local import
of tldist's own modules in the CLI), so that ``tldist --help`` and argument errors answer without
loading torch, timm and wandb (several seconds on a cold machine).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from tldist.cli import adapt as adapt_cli
from tldist.cli import compress as compress_cli
from tldist.cli import export as export_cli
from tldist.cli import launch as launch_cli
from tldist.cli import shards as shards_cli
from tldist.cli import study as study_cli
from tldist.cli.dispatch import Parser, dispatch
from tldist.cli.options import add_weights_flag
from tldist.config import timm_flags


def _cmd_train(args: argparse.Namespace) -> int:
    from tldist.config import load_config  # start-up time: see the module docstring
    from tldist.launch.signals import StopSignals
    from tldist.train.main import run

    overrides = [*args.overrides, *(["train.profile=true"] if args.profile else [])]
    cfg = load_config(args.config, overrides)
    if args.stop_on_signal:
        StopSignals().install()  # kept for the life of the process
    result = run(cfg)
    return 0 if not result.get("stopped") else 3


def _cmd_distill(args: argparse.Namespace) -> int:
    from tldist.config import load_config  # start-up time: see the module docstring
    from tldist.errors import ConfigError
    from tldist.train.main import run

    cfg = load_config(args.config, args.overrides)
    if not cfg.distill.teacher:
        raise ConfigError("tldist distill needs a teacher: add distill.teacher=PATH (a tldist export, checkpoint "
                          "or run dir) to the config or the overrides")
    return 0 if not run(cfg).get("stopped") else 3


def _cmd_eval(args: argparse.Namespace) -> int:
    from tldist.config import load_config  # start-up time: see the module docstring
    from tldist.data.pipeline import check_data_locations
    from tldist.evaluate import evaluate_checkpoint
    from tldist.train.job_runs import job_run

    cfg = load_config(args.config, args.overrides)
    check_data_locations(cfg.data, train=False)  # before a W&B run is opened: a bad path is one line
    with job_run("eval", args.checkpoint, cfg.tracker, config={"checkpoint": args.checkpoint, "weights": args.weights,
                                                               "job": cfg.to_dict()}) as tracked:
        metrics = evaluate_checkpoint(cfg, args.checkpoint, weights=args.weights)
        tracked.log_eval(metrics)
    if metrics.get("is_main", True):
        print(metrics["weights"])
        for name, m in metrics["sets"].items():
            where = f"{name}: " if len(metrics["sets"]) > 1 else ""
            print(f"{where}top1 {m['top1']:.2f}%  top5 {m['top5']:.2f}%  loss {m['loss']:.4f}  ({m['count']} samples)"
                  f"  balanced {m['balanced_acc']:.2f}%")
        if metrics.get("top_confused"):
            names = metrics["classes"] or [str(i) for i in range(len(metrics["per_class_acc"]))]
            pairs = ", ".join(f"{names[t]}->{names[p]} {n}" for t, p, n in metrics["top_confused"][:5])
            print(f"most confused (true->predicted count): {pairs}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from tldist.quickstart import run_demo  # start-up time: see the module docstring

    run_demo(args.out, processes=args.processes, quick=args.quick)
    return 0


def timm_flag_table() -> str:
    """The epilog of ``tldist train --help``: each config key next to the timm ``train.py`` flag it corresponds to,
    from the fields' ``metadata={"timm": ...}`` in :mod:`tldist.config` (the one source of the table)."""
    rows = timm_flags()
    width = max(len(k) for k, _ in rows)
    lines = ["config keys and the timm train.py flags they correspond to (set them as KEY=VALUE overrides;",
             "optim.lr is scaled by the global batch unless optim.lr_ref_batch=0, see tldist/config.py):", ""]
    lines += [f"  {key:<{width}}  {flag}" for key, flag in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The ``tldist`` parser with every subcommand (each sets ``func(args) -> exit status``)."""
    parser = Parser(prog="tldist", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    shards_cli.add_parser(sub)

    p = sub.add_parser("train", help="fine-tune a backbone on shards (run under accelerate launch or alone)",
                       epilog=timm_flag_table(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config, e.g. configs/demo_target.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 data.batch_size=64")
    p.add_argument("--profile", action="store_true",
                   help="write a torch profiler trace of steps 2-4 to OUTPUT_DIR/profile (= train.profile=true)")
    p.add_argument("--stop-on-signal", action="store_true",
                   help="SIGUSR2/SIGTERM make every rank checkpoint and exit with status 3 (for batch scripts that "
                        "requeue the job; slurm/*.sbatch and 'tldist submit' use it)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("distill", help="train a student on shards with a fine-tuned teacher's soft targets "
                       "(= train with distill.teacher=PATH)")
    p.add_argument("config", help="YAML config of the student's training, e.g. configs/demo_target.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. distill.teacher=runs/r50 distill.temperature=4")
    p.set_defaults(func=_cmd_distill)

    p = sub.add_parser("eval", help="evaluate a model on the config's val shards")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, anywhere on the line")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir (step_*), run dir, export dir or weights file")
    add_weights_flag(p, "--checkpoint")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("demo", help="embedded default: printed digits (fonts) -> handwritten digits transfer and a "
                       "label-budget study, on 2 CPU processes")
    p.add_argument("--out", default="demo_out", help="working directory for shards and runs")
    p.add_argument("--processes", type=int, default=2, help="training processes")
    p.add_argument("--quick", action="store_true", help="tiny budget (smoke test)")
    p.set_defaults(func=_cmd_demo)

    export_cli.add_parsers(sub)
    compress_cli.add_parsers(sub)
    launch_cli.add_parsers(sub)
    study_cli.add_parser(sub)
    adapt_cli.add_parsers(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``tldist`` and ``python -m tldist.cli``; returns the exit status."""
    return dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
