"""The ``tldist shards`` subcommand: write shard sets from image folders, CSV lists, torchvision
datasets, parquet files or the embedded demo, index shard sets other tools wrote (``index``: a manifest
only, the tars left in place), and verify existing shard sets. Each command imports its library when
it runs (start-up time: see :mod:`tldist.cli.main`).

Every writer puts each split in its own directory, ``OUT/<split>`` (``OUT/source/train``...
for the demo), and prints one summary line per split written. Image folders, CSVs and
torchvision datasets are written by the planned writer (:mod:`tldist.data.ingest`):
``--workers N`` processes, ``--part R/W`` for one of W nodes/array tasks, resume after a kill.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any, Callable

from tldist.errors import ConfigError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from ``'500000000'``, ``'500MB'``, ``'1.5G'`` or ``'256MiB'`` (k/M/G/T: 1000s, with 'i': 1024s)."""
    m = _SIZE.match(str(text))
    if not m:
        raise ConfigError(f"--max-size '{text}' is not a size; write e.g. 500MB, 1G or 250000000")
    num, unit, binary = float(m.group(1)), m.group(2).lower(), m.group(3).lower().startswith("i")
    power = "_kmgt".index(unit) if unit else 0
    return int(num * (1024 if binary else 1000) ** power)


def _summary(path: Path, m: Any) -> str:
    """One line per split written: counts, then every file or sample that did not become a plain sample,
    by reason (left out by the scan, unreadable, re-encoded to a standard format) and classes without one."""
    if m is None:
        return f"{path}: this part is written; run 'tldist shards merge {path}' once every part is done"
    line = f"{m.split}: {path}  {len(m.shards)} shards  {m.num_samples} samples  {m.num_classes} classes"
    notes = []
    left_out = (m.meta.get("source") or {}).get("left_out") or {}
    if left_out:
        notes.append(f"{sum(left_out.values())} files left out: "
                     + ", ".join(f"{n} {why}" for why, n in left_out.items()))
    skipped = m.meta.get("skipped", 0)
    if skipped:
        reasons = ", ".join(f"{n} {why}" for why, n in m.meta.get("skipped_reasons", {}).items())
        notes.append(f"{skipped} unreadable skipped" + (f": {reasons}; listed in {path / 'skipped.txt'}" if reasons else ""))
    reencoded = m.meta.get("reencoded") or {}
    if reencoded:
        notes.append("re-encoded to a standard format: " + ", ".join(f"{n} {how}" for how, n in reencoded.items()))
    counts = m.meta.get("class_counts")
    empty = [c for c, n in zip(m.classes, counts or []) if n == 0]
    if empty:
        notes.append(f"{len(empty)} class(es) with no sample: {', '.join(empty[:10])}"
                     + ("..." if len(empty) > 10 else ""))
    return line + "".join(f"\n  {note}" for note in notes)


def parse_part(text: str | None) -> tuple[int, int]:
    """``(rank, world)`` from ``--part R/W``, or for ``--part auto`` from the SLURM array task
    (``SLURM_ARRAY_TASK_ID``/``_COUNT``, ``_MIN``) or the launcher (``RANK``/``WORLD_SIZE``)."""
    if not text:
        return 0, 1
    env = os.environ
    if text == "auto":
        if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            return (int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0)),
                    int(env["SLURM_ARRAY_TASK_COUNT"]))
        if "RANK" in env and "WORLD_SIZE" in env:
            return int(env["RANK"]), int(env["WORLD_SIZE"])
        raise ConfigError("--part auto found neither SLURM_ARRAY_TASK_ID/_COUNT nor RANK/WORLD_SIZE; give --part R/W")
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise ConfigError(f"--part '{text}' must be R/W with 0 <= R < W (e.g. 0/4), or 'auto'")
    return int(m.group(1)), int(m.group(2))


def _show_data_log() -> None:
    """Print ``tldist.data``'s info and warning lines (resumes, skips, retries) as plain lines on stderr."""
    import logging

    from tldist.world import ConsoleHandler

    log = logging.getLogger("tldist.data")
    if not log.handlers:
        handler = ConsoleHandler("stderr")
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _write_kw(args: argparse.Namespace) -> dict[str, Any]:
    _show_data_log()  # show "resumed: kept K of N shards" and skip warnings
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1 processes, got {args.workers}")
    rank, world = parse_part(args.part)
    return {"max_count": args.max_count, "max_size": (parse_size(args.max_size) or None) if args.max_size else None,
            "min_shards": args.min_shards, "reencode": args.reencode, "quality": args.quality,
            "max_side": args.max_side, "check": args.check, "decoders": _decoders(args.decoder),
            "workers": args.workers, "rank": rank, "world": world, "progress": not args.no_progress}


def _decoders(choice: str) -> list[str]:
    """``--decoder`` value -> the data.decode values to check with."""
    return ["pil", "torchvision"] if choice == "both" else [choice]


def _read_classes(path: str | None) -> list[str] | None:
    if not path:
        return None
    try:
        names = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    except OSError as e:
        raise ConfigError(f"--classes '{path}' cannot be read: {e}") from None
    if not names:
        raise ConfigError(f"--classes '{path}' is empty; write one class name per line")
    return names


class IngestPart:
    """A picklable submitit job: part ``--part R/W`` of a ``tldist shards`` write (same arguments)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def __call__(self) -> str:
        rc = self.args.func(self.args)
        if rc:
            raise RuntimeError(f"part {self.args.part} of the shard write exited with status {rc}")
        return self.args.part


def submit_parts(args: argparse.Namespace) -> int:
    """``--submit --array N``: N SLURM array tasks (submitit) each write ``--part i/N``; this process
    waits for them and merges every split into its manifest."""
    import copy

    from tldist.data.ingest import PLAN_NAME, STAGE_DIR, merge  # start-up time
    from tldist.launch.slurm import JOB_NAME_PREFIX, Resources, job_folder, make_executor

    if args.part:
        raise ConfigError("--submit splits the write into --array parts itself; drop --part")
    if args.array < 1:
        raise ConfigError(f"--array must be >= 1 tasks, got {args.array}")
    out = Path(args.out)
    res = Resources(cpus_per_task=args.workers, partition=args.partition, time=args.time, cluster=args.cluster).check()
    folder = Path(args.folder) if args.folder else out / "submitit"
    executor = make_executor(job_folder(folder, args.cluster), res, f"{JOB_NAME_PREFIX}-shards")
    jobs = []
    with executor.batch():
        for r in range(args.array):
            part = copy.copy(args)
            part.submit, part.part, part.no_progress = False, f"{r}/{args.array}", True
            jobs.append(executor.submit(IngestPart(part)))
    print(f"submitted {len(jobs)} shard-writing tasks ({', '.join(j.job_id for j in jobs[:4])}"
          f"{'...' if len(jobs) > 4 else ''}); logs under {folder}; waiting (if stopped: rerun the same command "
          f"to resume, or 'tldist shards merge' once they are done)", flush=True)
    for j in jobs:
        j.result()  # raises with the task's error
    for plan in sorted(out.glob(f"**/{STAGE_DIR}/{PLAN_NAME}")):
        print(_summary(plan.parents[1], merge(plan.parents[1])))
    return 0


def cmd_imagefolder(args: argparse.Namespace) -> int:
    """``tldist shards imagefolder``: shard a class-subdirectory tree (and its val split)."""
    from tldist.data.ingest import write_imagefolder  # start-up time

    if args.submit:
        return submit_parts(args)

    out = Path(args.out)
    written = write_imagefolder(args.root, out, split=args.split, val_fraction=args.val_fraction, seed=args.seed,
                                shuffle=not args.no_shuffle, keep_empty_classes=args.keep_empty_classes,
                                **_write_kw(args))
    for split, m in written.items():
        print(_summary(out / split, m))
    return 0


def cmd_csv(args: argparse.Namespace) -> int:
    """``tldist shards csv``: shard the images listed in a ``path,label`` CSV/TSV file (and a val split)."""
    from tldist.data.ingest import write_csv  # start-up time

    if args.submit:
        return submit_parts(args)
    out = Path(args.out)
    written = write_csv(args.file, out, root=args.root, classes=_read_classes(args.classes), split=args.split,
                        val_fraction=args.val_fraction, seed=args.seed, shuffle=not args.no_shuffle,
                        **_write_kw(args))
    for split, m in written.items():
        print(_summary(out / split, m))
    return 0


def cmd_torchvision(args: argparse.Namespace) -> int:
    """``tldist shards torchvision``: shard a torchvision dataset already present under ROOT."""
    from tldist.data.ingest import write_planned  # start-up time
    from tldist.data.sources import samples_from_torchvision

    if args.submit:
        return submit_parts(args)
    classes, samples = samples_from_torchvision(args.name, args.root, train=args.split == "train",
                                                download=args.download, encode=args.encode, quality=args.quality,
                                                seed=args.seed, shuffle=not args.no_shuffle)
    out = Path(args.out) / args.split
    print(_summary(out, write_planned(samples, out, args.split, classes, **_write_kw(args))))
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    """``tldist shards index``: a manifest for WebDataset shards another tool wrote; the tars stay as they are."""
    from tldist.data.index import index_shards, summary  # start-up time

    _show_data_log()
    written = index_shards(args.sources, args.out, split=args.split, label=args.label, classes_file=args.classes,
                           workers=args.workers, recount=args.recount, check=args.check,
                           max_unusable=args.max_unusable)
    for path, (manifest, what) in written.items():
        print(summary(path, manifest, what))
    return 0


def cmd_parquet(args: argparse.Namespace) -> int:
    """``tldist shards parquet``: shard parquet files with an image column (the Hub's image datasets)."""
    from tldist.data.ingest import write_planned  # start-up time
    from tldist.data.parquet import parquet_source

    if args.submit:
        return submit_parts(args)
    classes, source = parquet_source(args.files, image_column=args.image_column, label_column=args.label_column,
                                     classes=_read_classes(args.classes))
    out = Path(args.out) / args.split
    print(_summary(out, write_planned(source, out, args.split, classes, **_write_kw(args))))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``tldist shards demo``: write (or reuse) the embedded printed digits -> handwritten digits demo shard sets."""
    from tldist.data.demo import write_demo_shards  # start-up time

    out = Path(args.out)
    sizes = {"source_per_class": args.source_per_class} if args.source_per_class else {}  # else the demo's own default
    written = write_demo_shards(out, seed=args.seed, label_fraction=args.label_fraction, target_style=args.style,
                                force=args.force, **sizes)
    for name, m in written.items():
        print(_summary(out / name, m))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """``tldist shards merge``: turn the parts of a split write (``--part``) into one shard set."""
    from tldist.data.ingest import merge  # start-up time

    for d in args.dirs:
        print(_summary(Path(d), merge(d)))
    return 0


def cmd_subset(args: argparse.Namespace) -> int:
    """``tldist shards subset``: a seeded, stratified k-labels-per-class subset as its own shard set."""
    from tldist.data.subset import write_label_subset  # start-up time

    if args.labels_per_class < 1:
        raise ConfigError(f"--labels-per-class must be >= 1, got {args.labels_per_class}")
    out = Path(args.out)
    print(_summary(out, write_label_subset(args.source, out, args.labels_per_class, args.seed)))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """``tldist shards verify``: check a shard set against its manifest; exit 1 on any problem."""
    from tldist.data.verify import verify_shards  # start-up time

    report = verify_shards(args.location, urls=args.urls, decode=not args.no_decode, decoders=_decoders(args.decoder))
    for name, n in report.found.items():
        expected = report.expected[name]
        print(f"  {name}: {n} samples" + ("" if n == expected else f" (manifest: {expected})"))
    for p in report.problems:
        print(f"PROBLEM {p}")
    print(report.summary())
    return 0 if report.ok else 1


def _add_write_options(p: argparse.ArgumentParser, split_choices: list[str] | None = None) -> None:
    g = p.add_argument_group("shard writing")
    g.add_argument("--max-count", type=int, default=10000, metavar="N", help="samples per shard at most (default 10000)")
    g.add_argument("--max-size", default="500MB", metavar="BYTES",
                   help="close a shard after about this many bytes: 500MB, 1G, 250000000 (default 500MB)")
    g.add_argument("--min-shards", type=int, default=16, metavar="N",
                   help="lower --max-count so each split has at least N shards, for ranks x workers (default 16)")
    g.add_argument("--reencode", choices=["jpg", "png"], default=None, help="re-encode every image (default: keep bytes)")
    g.add_argument("--quality", type=int, default=90, help="JPEG quality for --reencode jpg / --encode jpg (default 90)")
    g.add_argument("--max-side", type=int, default=0, metavar="PX",
                   help="downscale images whose longest side exceeds PX (re-encodes them; default 0: keep)")
    g.add_argument("--check", choices=["header", "decode", "verify", "none"], default="header",
                   help="how to test source images; bad ones are skipped, counted and listed. header (default): "
                        "read format, size and mode and check the file is complete (JPEG end marker, PNG IEND), "
                        "no pixel decoding; it finds truncated and garbage files like decode does at a fraction "
                        "of the cost, but not corrupt data inside a complete file. decode: decode every image "
                        "as training does (slowest, catches all the decoders reject). verify: PIL's structure "
                        "check. none: no check")
    _add_decoder_option(g, "--check decode tests with")
    g.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes writing shards; the output is byte-identical for any N (default 1)")
    g.add_argument("--part", default=None, metavar="R/W",
                   help="write only part R of W (shards k with k %% W == R), e.g. one SLURM array task; 'auto' "
                        "reads SLURM_ARRAY_TASK_ID/COUNT or RANK/WORLD_SIZE; then 'tldist shards merge' the split")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (images/s, ETA) on stderr")
    s = p.add_argument_group("writing on SLURM (submitit)")
    s.add_argument("--submit", action="store_true",
                   help="write with --array N SLURM tasks (each --part i/N, --workers CPUs), wait, then merge")
    s.add_argument("--array", type=int, default=4, metavar="N", help="array tasks for --submit (default 4)")
    s.add_argument("--partition", default=None, help="SLURM partition for --submit")
    s.add_argument("--time", default="4:00:00", help="time limit per task for --submit (default 4:00:00)")
    s.add_argument("--cluster", default="slurm", choices=["slurm", "local", "debug"],
                   help="submitit cluster for --submit (local: processes on this machine)")
    s.add_argument("--folder", default=None, help="submitit logs and pickles (default OUT/submitit)")
    g.add_argument("--seed", type=int, default=0, help="seed for the sample order and splits (default 0)")
    g.add_argument("--no-shuffle", action="store_true", help="keep the source order instead of a seeded shuffle")
    p.add_argument("--split", default="train", choices=split_choices, help="split name; output goes to OUT/<split>")


def _add_decoder_option(g: Any, what: str) -> None:
    g.add_argument("--decoder", choices=["pil", "torchvision", "both"], default="both",
                   help=f"the data.decode value(s) {what}: pil, torchvision or both (default both, "
                        "so the shards suit either setting)")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``shards`` and its subcommands on ``subparsers``; each sets ``func(args) -> int``."""
    p = subparsers.add_parser("shards", help="write or verify WebDataset shard sets",
                              description="Write WebDataset shard sets (OUT/<split>/<split>-000000.tar + manifest.json) "
                                          "or verify one.")
    sub = p.add_subparsers(dest="shards_command", metavar="{imagefolder,csv,torchvision,parquet,index,demo,merge,subset,verify}",
                           required=True)

    q = sub.add_parser("imagefolder", help="shard ROOT/<class>/<image> (or ROOT/{train,val}/<class>/<image>)")
    q.add_argument("root", metavar="ROOT")
    q.add_argument("out", metavar="OUT")
    q.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                   help="also write OUT/val from a seeded stratified fraction F of each class")
    q.add_argument("--keep-empty-classes", action="store_true",
                   help="keep class folders that hold no images as classes (default: refuse them)")
    _add_write_options(q)
    q.set_defaults(func=cmd_imagefolder)

    q = sub.add_parser("csv", help="shard the images listed in a path,label CSV/TSV file")
    q.add_argument("file", metavar="FILE")
    q.add_argument("out", metavar="OUT")
    q.add_argument("--root", default=None, metavar="DIR", help="base of relative paths (default: the CSV's directory)")
    q.add_argument("--classes", default=None, metavar="FILE", help="class names, one per line (fixes the class order)")
    q.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                   help="also write OUT/val from a seeded stratified fraction F of each class's rows")
    _add_write_options(q)
    q.set_defaults(func=cmd_csv)

    q = sub.add_parser("torchvision", help="shard a torchvision.datasets dataset (CIFAR10, MNIST...) found under ROOT")
    q.add_argument("name", metavar="NAME")
    q.add_argument("root", metavar="ROOT")
    q.add_argument("out", metavar="OUT")
    q.add_argument("--download", action="store_true", help="let torchvision download the dataset (needs internet)")
    q.add_argument("--encode", choices=["png", "jpg"], default="png", help="image encoding (default png)")
    _add_write_options(q, ["train", "val"])
    q.set_defaults(func=cmd_torchvision)

    q = sub.add_parser("index", help="write a manifest for existing WebDataset shards (wds.ShardWriter, img2dataset, "
                                     "timm *-wds...); the tars stay where and as they are")
    q.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="a shard directory (with _info.json or wids *.json splits, if any), a brace pattern "
                        "('/data/x-{000000..000999}.tar'), a glob, a list file (one shard a line), a wids index, "
                        "or URLs (http(s)://, pipe:, s3://)")
    q.add_argument("out", metavar="OUT", help="directory for manifest.json (OUT/<split>/ when the source names splits)")
    q.add_argument("--label", default="cls", metavar="RULE",
                   help="where labels are: cls (.cls index, default), json:KEY (field KEY of .json: index or class "
                        "name), txt (.txt is the class name), none (unlabelled, for pseudo-label)")
    q.add_argument("--classes", default=None, metavar="FILE",
                   help="class names, one per line; their order is the class order (default: _info.json's names, "
                        "else the sorted names found, or 0..max for indices)")
    q.add_argument("--split", default=None, help="split name (default train); picks one split of an _info.json/wids source")
    q.add_argument("--workers", type=int, default=1, metavar="N", help="processes counting shards (default 1)")
    q.add_argument("--recount", action="store_true",
                   help="count every shard even where _info.json or a wids index gives the counts")
    q.add_argument("--check", type=int, default=3, metavar="N",
                   help="shards counted to check the counts of an _info.json or wids index (default 3)")
    q.add_argument("--max-unusable", type=float, default=0.0, metavar="F",
                   help="index even when up to this fraction of samples lack an image or a label (default 0: "
                        "stop and name the first); training skips them like corrupt samples")
    q.set_defaults(func=cmd_index)

    q = sub.add_parser("parquet", help="shard parquet files with an image column (Hugging Face Hub image datasets)")
    q.add_argument("files", nargs="+", metavar="FILE", help="parquet files, read in this order")
    q.add_argument("out", metavar="OUT")
    q.add_argument("--image-column", default="image",
                   help="image bytes: binary, or the Hub's struct {bytes, path} (default image)")
    q.add_argument("--label-column", default="label",
                   help="class index (int; ClassLabel names from the file's metadata) or class name (default label)")
    q.add_argument("--classes", default=None, metavar="FILE", help="class names, one per line (fixes the class order)")
    _add_write_options(q)
    q.set_defaults(func=cmd_parquet)

    q = sub.add_parser("demo", help="write the embedded demo shards: printed digits (source) -> handwritten digits (target)")
    q.add_argument("out", metavar="OUT")
    q.add_argument("--source-per-class", type=int, default=0, metavar="N",
                   help="rendered printed digits per class (default: the demo's own, 500)")
    q.add_argument("--label-fraction", type=float, default=1.0, metavar="F",
                   help="keep a stratified fraction F of the target train labels (default 1.0)")
    q.add_argument("--style", default=None, choices=["invert", "color", "blur", "noise"],
                   help="shift the target domain's look (for domain adaptation)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--force", action="store_true", help="rewrite even if matching shards exist")
    q.set_defaults(func=cmd_demo)

    q = sub.add_parser("merge", help="merge the parts of a --part write into one shard set (manifest.json)")
    q.add_argument("dirs", nargs="+", metavar="DIR", help="split directories, e.g. OUT/train OUT/val")
    q.set_defaults(func=cmd_merge)

    q = sub.add_parser("subset", help="write a seeded, stratified subset of exactly K samples per class")
    q.add_argument("source", metavar="SOURCE", help="shard directory, manifest.json path or URL")
    q.add_argument("out", metavar="OUT", help="directory of the new shard set (reused when it holds this subset)")
    q.add_argument("--labels-per-class", "-k", type=int, required=True, metavar="K",
                   help="samples kept per class; refused when a class has fewer")
    q.add_argument("--seed", type=int, default=0, help="the same seed picks the same samples (default 0)")
    q.set_defaults(func=cmd_subset)

    q = sub.add_parser("verify", help="read every shard of a set and check it against its manifest")
    q.add_argument("location", metavar="LOCATION", help="shard directory, manifest.json path or URL")
    q.add_argument("--urls", default=None, help="brace pattern overriding the manifest's shard locations")
    q.add_argument("--no-decode", action="store_true", help="only count samples and check labels (faster)")
    _add_decoder_option(q, "to decode every image with")
    q.set_defaults(func=cmd_verify)
    return p


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "imagefolder": cmd_imagefolder, "csv": cmd_csv, "torchvision": cmd_torchvision, "demo": cmd_demo,
    "merge": cmd_merge, "subset": cmd_subset, "verify": cmd_verify, "index": cmd_index, "parquet": cmd_parquet,
}
