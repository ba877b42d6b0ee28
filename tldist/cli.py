"""The ``tldist`` command: one subcommand per job, each a thin call into the library.

User mistakes (:class:`tldist.errors.UserError`) print one clear line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from tldist.errors import UserError


def _cmd_train(args: argparse.Namespace) -> int:
    from tldist.config import load_config
    from tldist.train.main import run

    overrides = [*args.overrides, *(["train.profile=true"] if args.profile else [])]
    result = run(load_config(args.config, overrides))
    return 0 if not result.get("stopped") else 3


def _cmd_distill(args: argparse.Namespace) -> int:
    from tldist.config import load_config
    from tldist.errors import ConfigError
    from tldist.train.main import run

    cfg = load_config(args.config, args.overrides)
    if not cfg.distill.teacher:
        raise ConfigError("tldist distill needs a teacher: add distill.teacher=PATH (a tldist export, checkpoint "
                          "or run dir) to the config or the overrides")
    return 0 if not run(cfg).get("stopped") else 3


def _cmd_eval(args: argparse.Namespace) -> int:
    from tldist.config import load_config
    from tldist.evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(load_config(args.config, args.overrides), args.checkpoint)
    if metrics.get("is_main", True):
        print(f"top1 {metrics['top1']:.2f}%  top5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}  "
              f"({metrics['count']} samples)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from tldist.quickstart import run_demo

    run_demo(args.out, processes=args.processes, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tldist", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    from tldist.data.shards_cli import add_parser as add_shards_parser

    add_shards_parser(sub)

    p = sub.add_parser("train", help="fine-tune a backbone on shards (run under accelerate launch or alone)")
    p.add_argument("config", help="YAML config, e.g. configs/demo_target.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 data.batch_size=64")
    p.add_argument("--profile", action="store_true",
                   help="write a torch profiler trace of steps 2-4 to OUTPUT_DIR/profile (= train.profile=true)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("distill", help="train a student on shards with a fine-tuned teacher's soft targets "
                       "(= train with distill.teacher=PATH)")
    p.add_argument("config", help="YAML config of the student's training, e.g. configs/demo_target.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. distill.teacher=runs/r50 distill.temperature=4")
    p.set_defaults(func=_cmd_distill)

    p = sub.add_parser("eval", help="evaluate a checkpoint on the config's val shards")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir (step_*), export dir or weights file")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("demo", help="embedded default: printed digits (fonts) -> handwritten digits transfer and a "
                       "label-budget study, on 2 CPU processes")
    p.add_argument("--out", default="demo_out", help="working directory for shards and runs")
    p.add_argument("--processes", type=int, default=2, help="training processes")
    p.add_argument("--quick", action="store_true", help="tiny budget (smoke test)")
    p.set_defaults(func=_cmd_demo)

    from tldist import export

    export.add_parsers(sub)
    from tldist.compress.cli import add_parsers as add_compress_parsers

    add_compress_parsers(sub)
    from tldist.launch import add_parsers as add_launch_parsers

    add_launch_parsers(sub)
    from tldist.study.cli import add_parser as add_study_parser

    add_study_parser(sub)
    from tldist.adapt import cli as adapt_cli

    adapt_cli.add_parsers(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    return dispatch(build_parser(), argv)


def dispatch(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; a :class:`UserError` becomes one line, exit 2.

    In a multi-process job an error that every rank raises alike (a config mistake, a data fault
    the ranks agreed on, a locked output directory) is printed by rank 0 only; an error of one
    rank is printed by that rank with its number. A rank whose collective failed because another
    rank died prints one line saying so (exit 1) instead of a backend traceback.
    Shared by every stand-alone entry point (``python -m tldist.launch``, ``tldist.adapt.cli``...).
    """
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        if not prefix or not getattr(e, "same_on_every_rank", False):
            print(f"tldist: error: {prefix}{e}", file=sys.stderr, flush=True)
            from tldist.launch.worker import report_to_launcher

            report_to_launcher(f"tldist: error: {prefix}{e}")  # names the cause in accelerate's failure summary
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        from tldist.train.distributed import is_peer_failure

        if not is_peer_failure(e):
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        print(f"tldist: error: [rank {rank or 0}] stopped because another process of this job failed or was lost "
              f"({type(e).__name__}: {first}); that process's own error is printed above", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
