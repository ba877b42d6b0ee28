"""Beyond fine-tuning on the demo data: pseudo-labelling, domain adaptation and multi-task heads.

Every stage is a real ``tldist`` command under ``accelerate launch`` (2 CPU processes by default),
with ``configs/adapt_digits.yaml`` (resnet18 from scratch, 32 px, AdamW) and the same step budget
for a method and its baseline:

(i)   digits with ``label_fraction`` 0.1: teacher trained on the labelled 10% -> ``tldist pseudo-label``
      on the other 90% (labels unused) -> student trained on ``data.train=[labelled, pseudo]``.
(ii)  shifted target (digits in another style, same classes): a model trained on plain digits, scored
      on the shifted val set as is (source-only), after ``tldist adapt adabn`` on the shifted train
      images (no labels), after full fine-tuning (FT) on the labelled shifted train set, and after
      ``tldist adapt lpft`` at the same total budget.
(iii) multi-task: the digits-10% job of (i) again, mixed with the letters set (``model.heads=separate``,
      one head each); digits top-1 of its own head vs. the digits-only teacher.

    .venv/bin/python bench/adapt_results.py --out /tmp/adapt_results   # prints the markdown table

Finished stages are reused when the script is run again with the same ``--out`` (delete it to redo).
Single seed: differences of a point or two are within run-to-run noise on sets of 539 images.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CONFIG = REPO / "configs" / "adapt_digits.yaml"


class Bench:
    def __init__(self, out: Path, processes: int):
        self.out, self.processes = out, processes
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def tldist(self, name: str, *args: str) -> str:
        """Run ``tldist ARGS`` under accelerate launch; returns stdout (log in ``out/logs/<name>.log``)."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs/accelerate/cpu.yaml"), "--num_processes", str(self.processes),
               "--main_process_port", str(port), "-m", "tldist.cli", *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        (self.out / "logs" / f"{name}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            sys.exit(f"stage {name} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
        print(f"[adapt-bench] {name}: {time.time() - t0:.0f} s", flush=True)
        return proc.stdout

    def train(self, name: str, *overrides: str, command: tuple[str, ...] = ("train",), extra: tuple = ()) -> dict:
        """A training job (reused when ``runs/<name>/result.json`` exists)."""
        run_dir = self.out / "runs" / name
        result = run_dir / ("lpft.json" if command[-1] == "lpft" else "result.json")
        if not result.is_file():
            self.tldist(name, *command, str(CONFIG), f"output_dir={run_dir}", *overrides, *extra)
        return json.loads(result.read_text())

    def best(self, name: str) -> Path:
        from tldist.artifacts.checkpoint import CheckpointManager

        ckpts = CheckpointManager(self.out / "runs" / name / "checkpoints", keep_last=1, is_main=False)
        return ckpts.best() or ckpts.latest()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/adapt_results", help="working directory (shards, runs, logs, results)")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of each from-scratch job")
    p.add_argument("--ft-steps", type=int, default=100, help="steps of FT, and of LP-FT's probe + fine-tune stages")
    p.add_argument("--threshold", type=float, default=0.9, help="pseudo-label confidence threshold")
    p.add_argument("--style", default="color+blur", help="demo style of the shifted target domain")
    p.add_argument("--skip-multitask", action="store_true")
    args = p.parse_args(argv)

    from tldist.data.demo import write_demo_shards

    out = Path(args.out).resolve()
    b = Bench(out, args.processes)
    few, full = out / "shards_10pct", out / "shards_full"
    write_demo_shards(few, source_per_class=40, source_val_per_class=10, label_fraction=0.1, unlabelled=True)
    write_demo_shards(full, source_per_class=4, source_val_per_class=1, shifted_styles=[args.style])
    steps = [f"train.max_steps={args.steps}"]
    res: dict = {"steps": args.steps, "ft_steps": args.ft_steps, "processes": args.processes, "style": args.style,
                 "threshold": args.threshold}

    # (i) pseudo-labelling ------------------------------------------------------------------
    digits = [f"data.train=[{few}/target/train]", f"data.val={few}/target/val"]
    teacher = b.train("teacher", *digits, *steps)
    pseudo = out / "pseudo"
    if not (pseudo / "manifest.json").is_file():
        b.tldist("pseudo-label", "pseudo-label", "--model", str(b.best("teacher")), "--unlabelled",
                 f"{few}/target/unlabelled", "--out", str(pseudo), "--threshold", str(args.threshold))
    from tldist.data.manifest import load_manifest

    pl = load_manifest(pseudo).meta["pseudo_label"]
    student = b.train("student", f"data.train=[{few}/target/train,{pseudo}]", "data.train_weights=[0.5,0.5]",
                      f"data.val={few}/target/val", *steps)
    res["pseudo"] = {"teacher_top1": teacher["eval/top1"], "student_top1": student["eval/top1"],
                     "labelled": load_manifest(f"{few}/target/train").num_samples, "kept": pl["kept"],
                     "scored": pl["scored"], "precision": pl["precision"],
                     "teacher_top1_unlabelled": pl["teacher_top1"]}

    # (ii) shifted target ---------------------------------------------------------------------
    shifted = f"{full}/shifted/{args.style}"
    source = b.train("source", f"data.train=[{full}/target/train]", f"data.val={full}/target/val",
                     f"data.val_sets=[{shifted}/val]", *steps)
    src_ckpt = b.best("source")
    adabn_dir = out / "adabn"
    if not (adabn_dir / "adabn.json").is_file():
        b.tldist("adabn", "adapt", "adabn", "--model", str(src_ckpt), "--target", f"{shifted}/train",
                 "--val", f"{shifted}/val", "--out", str(adabn_dir))
    ab = json.loads((adabn_dir / "adabn.json").read_text())
    lr_ft = 2e-4
    tgt = [f"data.train=[{shifted}/train]", f"data.val={shifted}/val", f"model.checkpoint={src_ckpt}"]
    ft = b.train("ft", *tgt, f"optim.lr={lr_ft}", f"train.max_steps={args.ft_steps}")
    half = args.ft_steps // 2
    lpft = b.train("lpft", *tgt, f"train.max_steps={args.ft_steps - half}", command=("adapt", "lpft"),
                   extra=("--probe-epochs", "1", "--probe-steps", str(half), "--lr-ft", str(lr_ft)))
    res["shift"] = {"source_plain_top1": source["eval/top1"], "source_only_top1": ab["before"]["top1"],
                    "adabn_top1": ab["after"]["top1"], "ft_top1": ft["eval/top1"],
                    "lpft_probe_top1": lpft["probe"]["eval/top1"], "lpft_top1": lpft["finetune"]["eval/top1"],
                    "target_labels": load_manifest(f"{shifted}/train").num_samples, "adabn_samples": ab["samples"]}

    # (iii) multi-task heads ------------------------------------------------------------------
    if not args.skip_multitask:
        mt = b.train("multitask", f"data.train=[{few}/target/train,{few}/source/train]", "data.train_weights=[0.5,0.5]",
                     "data.val=null", f"data.val_sets=[{few}/target/val,{few}/source/val]", "model.heads=separate",
                     *steps)
        res["multitask"] = {"digits_only_top1": teacher["eval/top1"], "digits_top1": mt["eval/target/val/top1"],
                            "letters_top1": mt["eval/source/val/top1"],
                            "letters_train": load_manifest(f"{few}/source/train").num_samples}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    print(table(res))
    return res


def table(r: dict) -> str:
    p, s = r["pseudo"], r["shift"]
    rows = [
        "| experiment | baseline | top-1 | with the method | top-1 |",
        "|---|---|---|---|---|",
        f"| (i) digits, {p['labelled']} labels (10%) + {p['scored']} unlabelled | teacher (labelled only) | "
        f"{p['teacher_top1']:.1f}% | student on labelled + {p['kept']} pseudo-labels (threshold {r['threshold']}, "
        f"precision {p['precision']:.1f}%) | {p['student_top1']:.1f}% |",
        f"| (ii) plain -> {r['style']} digits (plain val {s['source_plain_top1']:.1f}%) | source-only | "
        f"{s['source_only_top1']:.1f}% | AdaBN ({s['adabn_samples']} target images, no labels) | "
        f"{s['adabn_top1']:.1f}% |",
        f"| (ii) same, {s['target_labels']} target labels, {r['ft_steps']} steps | FT (full fine-tune) | "
        f"{s['ft_top1']:.1f}% | LP-FT (probe {s['lpft_probe_top1']:.1f}% -> full) | {s['lpft_top1']:.1f}% |",
    ]
    if "multitask" in r:
        m = r["multitask"]
        rows.append(f"| (iii) digits 10% + {m['letters_train']} letters, separate heads | digits only (= teacher) | "
                    f"{m['digits_only_top1']:.1f}% | multi-task, digits head (letters head {m['letters_top1']:.1f}%) | "
                    f"{m['digits_top1']:.1f}% |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
