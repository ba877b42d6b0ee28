"""``tldist export`` and ``tldist predict``: argument parsing and output lines (the library,
:mod:`tldist.export`, is imported when a command runs: start-up time, see :mod:`tldist.cli.main`)."""

from __future__ import annotations

import argparse
import sys

from tldist.cli.options import add_weights_flag


def _cmd_export(args: argparse.Namespace) -> int:
    from tldist.export import TIMM_CONFIG, export_model, push_to_hub, require_hub  # start-up time
    from tldist.artifacts.layout import MODEL_RECORD
    from tldist.paths import check_output_dir
    from tldist.safeload import read_json
    from tldist.train.job_runs import job_run

    if args.push_to_hub:
        require_hub()  # before any work: a missing huggingface_hub is one line
    check_output_dir(args.out, "output")  # before a W&B run is opened: an output under a file is one line

    with job_run("export", args.checkpoint, weights=args.weights,
                 config={"checkpoint": args.checkpoint, "out": args.out, "weights": args.weights}) as tracked:
        out = export_model(args.checkpoint, args.out, args.weights, repo_id=args.push_to_hub)
        tracked.log_output_model(out)
    meta = read_json(out / MODEL_RECORD, what="export metadata")
    step = f", step {meta['step']}" if meta.get("step") is not None else ""
    timm = f" + {TIMM_CONFIG} for timm.create_model('local-dir:{out}')" if (out / TIMM_CONFIG).is_file() else ""
    print(f"exported {out} (model.safetensors + model.json + README.md{timm}; weights: {meta.get('weights')}{step})")
    if args.push_to_hub:
        print(f"pushed to https://huggingface.co/{args.push_to_hub}: "
              f"{push_to_hub(out, args.push_to_hub, private=args.private)}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from tldist.artifacts.resolve import resolve  # start-up time
    from tldist.export import predict

    weights = resolve(args.model, weights=args.weights, flag="MODEL").describe()
    results = predict(args.model, args.images, args.top_k, weights=args.weights)
    print(weights, file=sys.stderr)  # once the model loaded: an error stays one line
    for r in results:
        for task, top in (r.get("tasks") or {None: r["top"]}).items():
            print(r["image"] + (f"  [{task}]" if task else "") + "  " + "  ".join(f"{c} {p:.3f}" for c, p in top))
    return 0


def add_parsers(sub) -> None:
    """Register ``export`` and ``predict`` on the ``tldist`` command."""
    p = sub.add_parser("export", help="write a fine-tuned model as a standalone directory")
    p.add_argument("checkpoint", help="checkpoint dir (step_*) or run output dir (uses its best checkpoint)")
    p.add_argument("out", help="export directory to create")
    add_weights_flag(p, "CHECKPOINT")
    p.add_argument("--push-to-hub", metavar="REPO", default=None,
                   help="then upload the export directory to this Hugging Face Hub model repo (ORG/NAME; created if "
                        "missing; needs huggingface_hub: pip install 'tldist[hub]', and a token: hf auth login)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.set_defaults(func=_cmd_export)
    p = sub.add_parser("predict", help="classify image files with a fine-tuned model")
    p.add_argument("model", help="export directory from 'tldist export', or a checkpoint or run directory")
    p.add_argument("images", nargs="+")
    p.add_argument("--top-k", type=int, default=3)
    add_weights_flag(p, "MODEL")
    p.set_defaults(func=_cmd_predict)
