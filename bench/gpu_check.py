"""One-shot GPU check of tldist (issue 13): every GPU code path once, on data it makes itself, in < 6 min.

Written to be run ONCE on a lent single-GPU machine (H100/H200) with a hard 10-minute command limit
and no internet: each check runs in its own subprocess (its own process group, killed at its own
timeout), the whole run keeps to ``--budget-s`` (checks that no longer fit are marked
``skipped (budget)``), and the results table is rewritten after every check, so a kill from
outside still leaves the rows done so far. Nothing is downloaded: the data are synthetic JPEGs
(``bench/make_images.py``: crops of scikit-learn's two sample photographs and 1/f-noise images)
written as shards by tldist's own writer (``tldist.data.ingest.write_imagefolder``), every model
is built with ``model.pretrained=false`` and ``tracker.backend=none``.

Checks (``--device cuda``; estimated H100/H200 seconds, mostly process start-up, in brackets):

=====================  ===================================================================================
env           [8]      torch/torchvision/accelerate versions, GPU name, bf16 support, one nvjpeg decode
data          [15]     3,000 train JPEGs (256 px short side, 16 shards) + 256 val JPEGs, as shards
train-bf16    [20]     ``tldist train``: ResNet-50 at 224 px, batch 64, 12 steps, bf16, channels_last off;
                       also the checkpoint for eval/export/predict/quantize below
eval          [12]     ``tldist eval`` of that CUDA-trained checkpoint (its top-1 vs the run's own eval)
export        [8]      ``tldist export`` (best checkpoint -> model.safetensors + model.json)
predict       [8]      ``tldist predict`` on 3 JPEGs
quantize      [35]     ``tldist compress quantize`` (int8 static FX, x86, CPU: fp32 vs int8 top-1, latency)
train-fp32    [22]     as train-bf16 in fp32
train-fp16    [20]     as train-bf16 in fp16 (GradScaler; its loss scale read back from the checkpoint)
train-bf16-cl [20]     bf16 with ``train.channels_last=true``
train-compile [60]     bf16 + channels_last + ``train.compile=true`` (compile time included; no eval, which
                       would compile the eval graph too)
fsdp2         [25]     ``accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 1``
                       (FSDP2 needs a process group: plain ``tldist train train.fsdp=true`` has none), bf16;
                       should that fail, once more under ``torchrun --standalone --nproc_per_node 1``
loop-overhead [35]     ``bench/loop_overhead.py``: ResNet-50 bf16 224 px batch 128, the Trainer fed by the
                       real shards (12 workers, PIL) vs a synthetic in-memory batch: img/s, data-wait share
loader        [30]     ``bench/loader.py --device cuda``: uint8 batches on the GPU, ``data.decode=torchvision``
                       (CPU workers) vs ``nvjpeg`` (decoded on the GPU), same 6 workers
nvjpeg-pixels [12]     nvjpeg (GPU) vs libjpeg-turbo (CPU) batches of the same samples: mean/max |diff|
train-nvjpeg  [20]     bf16 + channels_last + ``data.decode=nvjpeg`` through the trainer
loop-nvjpeg   [25]     loop-overhead with ``--decode nvjpeg`` (2 repeats)
=====================  ===================================================================================

GPU memory: every train row reports ``torch.cuda.max_memory_allocated()`` (and reserved) of its training
process, read after ``tldist train`` returns (the child runs ``tldist.cli.main`` in-process for that).

Rows run in this order (most needed first). The estimates add up to ~375 s, so at the default budget
(345 s) the last rows (train-nvjpeg, loop-nvjpeg) are the ones left out if the estimates hold;
``--budget-s 420`` fits them all and still ends well inside a 10-minute command.

``--device cpu`` is the CI smoke test (``tests/e2e/test_gpu_check.py``; 1 min on 2 idle cores, 2-2.5 min
at load average 9): ResNet-18 at 32 px, 3 steps, 200 train / 32 val JPEGs, 1 loader worker;
train-fp16/-bf16-cl/-compile/-nvjpeg and loop-nvjpeg say ``skipped (cpu)``; fsdp2 runs over gloo in
fp32 and its step-1 loss must equal train-fp32's (4 decimals: same init, same batch); nvjpeg-pixels
must be exactly 0 (the device path on the CPU is bit-identical to ``data.decode=torchvision``).

Output: one table (check | status | key figures | seconds) on stdout and in ``OUT/gpu_check.txt``
(``gpu_check_cpu.txt`` for ``--device cpu``), the same as JSON next to it (with each check's command
and last log lines), and every check's full log in ``OUT/gpu_check_logs.tar.gz``. Exit status 1 when
any check failed, 3 when none failed but some did not fit in the budget, else 0. Usage::

    python bench/gpu_check.py --device cuda [--out bench/results] [--budget-s 345] [--only a,b] [--skip c]
    python bench/gpu_check.py --device cpu --out /tmp/gc        # smoke test, ~2 min on 2 cores

Tools only (``tldist`` need not be installed: children run ``python -m tldist.cli`` with the repo on
``PYTHONPATH``); the parent process imports no torch, so a crashing CUDA child cannot take the table with it.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


# ---------------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------------
@dataclass
class Sizes:
    """Everything that differs between the GPU run and the CPU smoke test."""

    model: str
    image_size: int
    batch: int
    steps: int
    log_every: int
    workers: int
    n_train: int
    n_val: int
    quant_threads: int
    quant_runs: int
    loop_args: list[str]
    loader_args: list[str]



def _median(values):
    """The middle value (upper median for an even count), as the benchmark scripts report."""
    return sorted(values)[len(values) // 2]

def sizes_for(device: str) -> Sizes:
    cores = os.cpu_count() or 2
    if device == "cuda":
        # n_train=3000 / default make_images parameters: bench/loop_overhead.py and bench/loader.py reuse the set
        return Sizes(model="resnet50", image_size=224, batch=64, steps=12, log_every=4,
                     workers=max(1, min(8, cores - 2)), n_train=3000, n_val=256,
                     quant_threads=max(1, min(8, cores)), quant_runs=3,
                     loop_args=["--model", "resnet50", "--size", "224", "--batch", "128", "--precision", "bf16",
                                "--workers", str(max(1, min(12, cores - 2))), "--threads", "2", "--steps", "15",
                                "--log-every", "5", "--repeats", "3"],
                     loader_args=["--workers", str(max(1, min(6, cores - 2))), "--batch", "64", "--warmup", "6",
                                  "--batches", "18", "--repeats", "3"])
    # n_train=200: the --quick set of make_images, reused by the --quick runs of the two bench scripts
    return Sizes(model="resnet18", image_size=32, batch=16, steps=3, log_every=1, workers=1, n_train=200, n_val=32,
                 quant_threads=1, quant_runs=1, loop_args=["--quick", "--model", "resnet18", "--workers", "1"],
                 loader_args=["--quick", "--workers", "1"])


# ---------------------------------------------------------------------------------------------
# running children
# ---------------------------------------------------------------------------------------------
class CheckFailed(Exception):
    """A check's own verdict (the status text says why)."""


@dataclass
class Result:
    name: str
    status: str = "not run"
    figures: str = ""
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)
    log_tail: str = ""

    @property
    def failed(self) -> bool:
        return self.status.startswith("FAIL")


class Runner:
    """Runs the checks' subprocesses: logs under WORK/logs, own process group, per-call timeout."""

    def __init__(self, work: Path, device: str, deadline: float):
        self.work, self.device, self.deadline = work, device, deadline
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.current: Optional[subprocess.Popen] = None
        self.last_log: Optional[Path] = None
        self.result: Optional[Result] = None
        self.check_deadline = deadline

    def env(self, threads: int = 1, **extra: str) -> dict[str, str]:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled", "WANDB_SILENT": "true",
               "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": os.pathsep.join([str(REPO), str(BENCH), *filter(None, [os.environ.get("PYTHONPATH")])])}
        if self.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke test is a CPU run even on a GPU machine
        env.update(extra)
        return env

    def __call__(self, cmd: list[str], timeout: float, threads: int = 1, ok_codes=(0,), **env: str) -> str:
        """Run ``cmd`` (cwd = repo); its stdout+stderr, or :class:`CheckFailed` on a bad exit or timeout."""
        res = self.result
        n = len(res.commands)
        log_path = self.logs / f"{res.name}{'-' + str(n) if n else ''}.log"
        res.commands.append(" ".join(cmd))
        self.last_log = log_path
        timeout = max(1.0, min(timeout, self.check_deadline - time.monotonic()))
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env(threads, **env), start_new_session=True)
            self.current = proc
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_group(proc)
                rc = None
            finally:
                self.current = None
            if rc is not None:
                kill_group(proc, grace_s=2)  # workers a finished child left behind, if any
        out = log_path.read_text(errors="replace")
        res.log_tail = "\n".join(out.splitlines()[-25:])
        if rc is None:
            raise CheckFailed(f"timeout after {timeout:.0f}s")
        if rc not in ok_codes:
            raise CheckFailed(f"exit {rc}: {last_error(out)}")
        return out


def kill_group(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM the child's whole process group (loader workers, launcher ranks), then SIGKILL what is left
    of it once the child is gone or after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass


def last_error(out: str) -> str:
    """The most telling line of a failed child's output (an exception or tldist's one-line error)."""
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    for ln in reversed(lines):  # tldist's own one-line error first (launchers repeat it inside their traceback)
        if ln.startswith("tldist: error:"):
            return ln[:240]
    for ln in reversed(lines):
        if "ChildFailedError" in ln or "CalledProcessError" in ln:  # a launcher's summary, not the cause
            continue
        if re.match(r"^(tldist: error:|[A-Za-z_.]*(Error|Exception|Interrupt)\b|AssertionError|RuntimeError|torch\.)",
                    ln):
            return ln[:240]
    return (lines[-1] if lines else "no output")[:240]


# ---------------------------------------------------------------------------------------------
# the checks
# ---------------------------------------------------------------------------------------------
@dataclass
class Ctx:
    args: argparse.Namespace
    device: str
    work: Path
    sizes: Sizes
    run: Runner
    py: str
    results: dict[str, Result] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    def need(self, *names: str) -> None:
        for n in names:
            r = self.results.get(n)
            if r is None or r.status != "ok":
                raise Skip(f"skipped (needs {n})")


class Skip(Exception):
    """Not a failure: the check does not apply (CPU run) or an earlier check it needs did not pass."""


def child(ctx: Ctx, kind: str, out_json: Path, *rest: str, timeout: float, threads: int = 1,
          launcher: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run this file in child mode ``kind`` (under ``launcher`` if given) and return the JSON it writes."""
    out_json.unlink(missing_ok=True)
    ctx.run([*(launcher or (ctx.py,)), str(Path(__file__)), "--child", kind, str(out_json), *rest],
            timeout=timeout, threads=threads)
    if not out_json.is_file():
        raise CheckFailed(f"child '{kind}' wrote no result")
    return json.loads(out_json.read_text())


def check_env(ctx: Ctx, res: Result) -> None:
    info = child(ctx, "env", ctx.work / "env.json", ctx.device, timeout=90)
    res.details = info
    ctx.data["env"] = info
    if ctx.device == "cuda":
        if not info.get("cuda"):
            raise CheckFailed("torch.cuda.is_available() is False")
        res.figures = (f"{info['gpu']} ({info['gpu_mem_gb']:.0f} GB, sm_{info['capability']}), torch {info['torch']}, "
                       f"tv {info['torchvision']}, CUDA {info['cuda_version']}, bf16 {info['bf16']}, "
                       f"nvjpeg {info['nvjpeg']}, triton {info['triton']}, {info['cores']} cores")
        if info["nvjpeg"] != "ok":
            raise CheckFailed(f"nvjpeg decode: {info['nvjpeg']}")
    else:
        res.figures = (f"cpu, torch {info['torch']}, tv {info['torchvision']}, accelerate {info['accelerate']}, "
                       f"{info['cores']} cores")


def check_data(ctx: Ctx, res: Result) -> None:
    s = ctx.sizes
    info = child(ctx, "data", ctx.work / "data.json", str(ctx.work), str(s.n_train), str(s.n_val), timeout=240)
    ctx.data.update(info)
    res.details = info
    res.figures = (f"{info['train']['n']} train JPEGs ({info['train']['mean_kb']} KB mean, "
                   f"{info['train']['shard_count']} shards) + {info['val']['n']} val, {info['seconds']:.0f}s to write")


def train_overrides(ctx: Ctx, name: str, extra: list[str]) -> tuple[Path, list[str]]:
    s, out = ctx.sizes, ctx.work / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    return out, [
        f"output_dir={out}", f"data.train=[{ctx.data['train']['shards']}]", f"data.val={ctx.data['val']['shards']}",
        f"model.name={s.model}", "model.pretrained=false", f"data.image_size={s.image_size}",
        f"data.batch_size={s.batch}", f"data.eval_batch_size={2 * s.batch}", f"data.num_workers={s.workers}",
        "data.shuffle_buffer=256", f"train.max_steps={s.steps}", f"train.log_every_steps={s.log_every}",
        "tracker.backend=none", "checkpoint.resume=none", *extra]


_STEP = re.compile(r"step (\d+)/(\d+)\s+loss (\S+)\s+lr \S+\s+([\d.]+) img/s\s+data-wait ([\d.]+)%")
_EVAL = re.compile(r"eval (\S+) @ step (\d+): top1 ([\d.]+)%")


def train_row(ctx: Ctx, res: Result, name: str, extra: list[str], *, launcher: tuple[str, ...] = (),
              timeout: float = 150, expect: Callable[[str, dict], Optional[str]] = lambda out, r: None) -> dict:
    """One ``tldist train`` in a child that reports peak GPU memory; checks steps and a finite loss."""
    ctx.need("data")
    out_dir, overrides = train_overrides(ctx, name, extra)
    cfg = ctx.work / "gpu_check.yaml"
    cfg.write_text("# written by bench/gpu_check.py; every value comes from its overrides\n{}\n")
    info = child(ctx, "train", ctx.work / f"{name}.json", "train", str(cfg), *overrides, timeout=timeout,
                 launcher=launcher)
    log = ctx.run.last_log.read_text(errors="replace")
    steps = _STEP.findall(log)
    result = json.loads((out_dir / "result.json").read_text()) if (out_dir / "result.json").is_file() else {}
    res.details = {"child": info, "result": result, "log_steps": steps}
    if info.get("rc") != 0:
        raise CheckFailed(f"tldist train returned {info.get('rc')}: {last_error(log)}")
    if result.get("step") != ctx.sizes.steps:
        raise CheckFailed(f"ran {result.get('step')} of {ctx.sizes.steps} steps")
    losses = [float(x[2]) for x in steps]
    if not losses or not all(math.isfinite(v) for v in losses):
        raise CheckFailed(f"loss not finite or not logged: {losses}")
    ips = float(steps[-1][3])
    evals = _EVAL.findall(log)
    figs = [f"{result['step']} steps", f"loss {losses[0]:.3f}->{losses[-1]:.3f}",
            f"{ips:.0f} img/s (last {ctx.sizes.log_every} steps)", f"data-wait {steps[-1][4]}%"]
    if info.get("max_mem_gb") is not None:
        figs.append(f"peak mem {info['max_mem_gb']:.2f} GB (reserved {info['max_reserved_gb']:.2f})")
    if evals:
        figs.append(f"val top-1 {evals[-1][2]}%")
    if info.get("scaler_scale") is not None:
        figs.append(f"loss scale {info['scaler_scale']:g}")
    res.figures = ", ".join(figs)
    res.details.update({"images_per_s": ips, "max_mem_gb": info.get("max_mem_gb")})
    problem = expect(log, result)
    if problem:
        raise CheckFailed(problem)
    return result


def _train(extra: list[str], cuda_only: bool = True, timeout: float = 150,
           expect: Callable[[str, dict], Optional[str]] = lambda out, r: None):
    def check(ctx: Ctx, res: Result) -> None:
        if cuda_only and ctx.device != "cuda" and not ctx.args.all_rows:
            raise Skip("skipped (cpu)")
        train_row(ctx, res, res.name, extra, timeout=timeout, expect=expect)
    return check


def _expect_compile(log: str, result: dict) -> Optional[str]:
    m = re.search(r"derived:.*", log)
    if m and "compile=True" not in m.group(0):
        return "train.compile=true but the derived line says otherwise: " + m.group(0)[-80:]
    return None


def _expect_fp16(log: str, result: dict) -> Optional[str]:
    return None if re.search(r"mixed_precision=fp16", log) else "derived line does not say mixed_precision=fp16"


def check_fsdp(ctx: Ctx, res: Result) -> None:
    """FSDP2 on one process, launched as the README says; if that fails, once more under torchrun, so the
    table tells a launcher/config problem from an FSDP2 one."""
    ctx.need("data")
    overrides = ["train.fsdp=true", *(["train.mixed_precision=bf16"] if ctx.device == "cuda" else [])]
    launchers = {
        "accelerate launch fsdp.yaml": (ctx.py, "-m", "accelerate.commands.launch", "--config_file",
                                        str(REPO / "configs/accelerate/fsdp.yaml"), "--num_processes", "1",
                                        "--num_machines", "1", "--main_process_port", str(free_port())),
        "torchrun": (ctx.py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1")}
    errors = []
    for how, launcher in launchers.items():
        try:
            result = train_row(ctx, res, res.name, overrides, launcher=launcher, timeout=180)
            if result.get("sharded_params") is not True or result.get("world_size") != 1:
                raise CheckFailed(f"not sharded: sharded_params={result.get('sharded_params')} "
                                  f"world_size={result.get('world_size')}")
        except CheckFailed as e:
            errors.append(f"{how}: {e}")
            if time.monotonic() > ctx.run.deadline - MIN_START_S:
                break
            continue
        res.figures = f"{how}: " + res.figures + ", params sharded (DTensor), world size 1"
        single = ctx.results["train-bf16" if ctx.device == "cuda" else "train-fp32"]
        if single.status == "ok" and single.details.get("log_steps") and res.details.get("log_steps"):
            mine, ref = (f"{float(r.details['log_steps'][0][2]):.4f}" for r in (res, single))
            res.figures += f"; first logged loss {mine} vs {ref} unsharded ({single.name})"
            if ctx.device == "cpu" and mine != ref:  # on a GPU kernels may differ run to run: reported only
                raise CheckFailed(f"step-1 loss {mine} differs from the unsharded run's {ref}")
        if errors:
            raise CheckFailed("; ".join(errors) + f" -- but {how} passed")
        return
    raise CheckFailed("; ".join(errors))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _source_run(ctx: Ctx) -> Path:
    ctx.need("train-bf16")
    return ctx.work / "runs" / "train-bf16"


def check_eval(ctx: Ctx, res: Result) -> None:
    run = _source_run(ctx)
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    if not ckpts:
        raise CheckFailed(f"no checkpoint under {run}/checkpoints")
    out = ctx.run([ctx.py, "-m", "tldist.cli", "eval", str(run / "config.yaml"), "--checkpoint", str(ckpts[-1])],
                  timeout=120)
    m = re.search(r"top1 ([\d.]+)%\s+top5 ([\d.]+)%\s+loss (\S+)\s+\((\d+) samples\)", out)
    if not m:
        raise CheckFailed("no 'top1 ... (N samples)' line")
    top1, count = float(m.group(1)), int(m.group(4))
    trained = json.loads((run / "result.json").read_text()).get("eval/top1")
    res.details = {"top1": top1, "top5": float(m.group(2)), "count": count, "train_run_top1": trained}
    res.figures = (f"{ckpts[-1].name} on {ctx.device}: top-1 {top1:.2f}% top-5 {float(m.group(2)):.2f}% over {count} "
                   f"samples (the run's own eval: {trained if trained is None else f'{trained:.2f}%'})")
    if count != ctx.data["val"]["n"]:
        raise CheckFailed(f"evaluated {count} samples, the val set has {ctx.data['val']['n']}")


def check_export(ctx: Ctx, res: Result) -> None:
    run = _source_run(ctx)
    out_dir = ctx.work / "export"
    shutil.rmtree(out_dir, ignore_errors=True)
    ctx.run([ctx.py, "-m", "tldist.cli", "export", str(run), str(out_dir)], timeout=90)
    files = {p.name: p.stat().st_size for p in out_dir.iterdir()} if out_dir.is_dir() else {}
    if "model.safetensors" not in files or "model.json" not in files:
        raise CheckFailed(f"export holds {sorted(files)}")
    res.figures = f"model.safetensors {files['model.safetensors'] / 2**20:.1f} MB + model.json"
    ctx.data["export"] = str(out_dir)


def check_predict(ctx: Ctx, res: Result) -> None:
    ctx.need("export")
    images = sorted(Path(ctx.data["val"]["images"]).rglob("*.jpg"))[:3]
    out = ctx.run([ctx.py, "-m", "tldist.cli", "predict", ctx.data["export"], *map(str, images)], timeout=90)
    lines = [ln for ln in out.splitlines() if any(ln.startswith(str(p)) for p in images)]
    if len(lines) != len(images):
        raise CheckFailed(f"{len(lines)} prediction lines for {len(images)} images")
    res.figures = f"{len(images)} images, e.g. " + lines[0].split("  ", 1)[-1][:60]


def check_quantize(ctx: Ctx, res: Result) -> None:
    ctx.need("export")
    out_dir = ctx.work / "int8"
    shutil.rmtree(out_dir, ignore_errors=True)
    t = ctx.sizes.quant_threads
    out = ctx.run([ctx.py, "-m", "tldist.cli", "compress", "quantize", ctx.data["export"], "--out", str(out_dir),
                   "--val", ctx.data["val"]["shards"], "--calib", ctx.data["train"]["shards"], "--calib-batches", "2",
                   "--batch-size", str(min(32, ctx.sizes.batch)), "--latency-runs", str(ctx.sizes.quant_runs),
                   "--threads", str(t),
                   "--num-workers", str(min(2, ctx.sizes.workers))], timeout=200, threads=t)
    m = re.search(r"int8 \((\w+)\): .*", out)
    if not m:
        raise CheckFailed("no 'int8 (...)' summary line")
    res.figures = m.group(0).split("  -> ")[0][:150] + f" ({t} CPU threads)"


def check_loop(decode: str, repeats: Optional[int] = None, cuda_only: bool = False):
    def check(ctx: Ctx, res: Result) -> None:
        if cuda_only and ctx.device != "cuda" and not ctx.args.all_rows:
            raise Skip("skipped (cpu)")
        ctx.need("data")
        js = ctx.work / f"{res.name}.json"
        js.unlink(missing_ok=True)
        args = list(ctx.sizes.loop_args)
        if repeats is not None and "--repeats" in args:  # (--quick fixes 1 repeat)
            args[args.index("--repeats") + 1] = str(repeats)
        ctx.run([ctx.py, str(BENCH / "loop_overhead.py"), "--data", ctx.data["train"]["root"], "--decode", decode,
                 "--json", str(js), *args], timeout=240, threads=1)
        r = json.loads(js.read_text())
        ips, wait = r["images_per_s"], r["data_wait_frac"]
        res.details = r
        res.figures = (f"{r['model']} {r['precision']} {r['size']}px b{r['batch']} {r['workers']} workers "
                       f"({decode}): real {_median(ips['real']):.0f} / synthetic {_median(ips['synthetic']):.0f} img/s = "
                       f"{_median(r['real_over_synthetic']):.3f}, data-wait real {_median(wait['real']):.1%}"
                       + (f", peak mem {r['gpu_mem_gb']:.1f} GB" if r.get("gpu_mem_gb") else ""))
    return check


def check_loader(ctx: Ctx, res: Result) -> None:
    ctx.need("data")
    js = ctx.work / "loader.json"
    js.unlink(missing_ok=True)
    ctx.run([ctx.py, str(BENCH / "loader.py"), "--data", ctx.data["train"]["root"],
             "--variants", "shard-tv,shard-nvjpeg", "--device", ctx.device, "--json", str(js),
             *ctx.sizes.loader_args], timeout=240, threads=1)
    r = json.loads(js.read_text())
    ips, cpu = r["images_per_s"], r["images_per_cpu_s"]
    res.details = r
    res.figures = (f"224px b{r['batch']} {r['workers']} workers -> {r['device']}: "
                   f"torchvision {_median(ips['shard-tv']):.0f} img/s, nvjpeg {_median(ips['shard-nvjpeg']):.0f} img/s "
                   f"(x{_median([a / b for a, b in zip(ips['shard-nvjpeg'], ips['shard-tv'])]):.2f}); per CPU-s "
                   f"{_median(cpu['shard-tv']):.0f} vs {_median(cpu['shard-nvjpeg']):.0f}")


def check_pixels(ctx: Ctx, res: Result) -> None:
    ctx.need("data")
    r = child(ctx, "pixels", ctx.work / "pixels.json", ctx.device, str(ctx.sizes.image_size),
              ctx.data["val"]["shards"], ctx.data["train"]["shards"], str(min(2, ctx.sizes.workers)), timeout=150)
    res.details = r
    res.figures = (f"{r['images']} images at {ctx.sizes.image_size}px, nvjpeg on {ctx.device} vs torchvision on CPU: "
                   f"mean |diff| {r['mean_abs']:.3f}, max {r['max_abs']}, {r['frac_gt8']:.2%} of values > 8 levels; "
                   f"same keys and crops: {r['same_keys']}")
    if not r["same_keys"]:
        raise CheckFailed("batches hold different samples")
    if ctx.device == "cpu" and r["max_abs"] != 0:
        raise CheckFailed("on the CPU the device path must be bit-identical to data.decode=torchvision")
    if r["mean_abs"] >= 3:
        raise CheckFailed("mean |diff| >= 3 levels (the PIL vs torchvision tolerance)")


# name, function, CPU-run policy is inside each function
CHECKS: list[tuple[str, Callable[[Ctx, Result], None]]] = [
    ("env", check_env),
    ("data", check_data),
    ("train-bf16", _train(["train.mixed_precision=bf16", "train.channels_last=false"], cuda_only=False)),
    ("eval", check_eval),
    ("export", check_export),
    ("predict", check_predict),
    ("quantize", check_quantize),
    # fp32 is the default: the override `train.mixed_precision=no` fails (YAML reads `no` as false)
    ("train-fp32", _train(["train.channels_last=false"], cuda_only=False)),
    ("train-fp16", _train(["train.mixed_precision=fp16", "train.channels_last=false"], expect=_expect_fp16)),
    ("train-bf16-cl", _train(["train.mixed_precision=bf16", "train.channels_last=true"])),
    ("train-compile", _train(["train.mixed_precision=bf16", "train.channels_last=true", "train.compile=true",
                              "data.val=null"], timeout=300, expect=_expect_compile)),
    ("fsdp2", check_fsdp),
    ("loop-overhead", check_loop("pil")),
    ("loader", check_loader),
    ("nvjpeg-pixels", check_pixels),
    ("train-nvjpeg", _train(["train.mixed_precision=bf16", "train.channels_last=true", "data.decode=nvjpeg"])),
    ("loop-nvjpeg", check_loop("nvjpeg", repeats=2, cuda_only=True)),
]
DEPS = {"eval": ["train-bf16"], "export": ["train-bf16"], "predict": ["export"], "quantize": ["export"]}
MIN_START_S = 20  # a check is not started with less budget left than this


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def render(ctx: Ctx, order: list[str], started: float, final: bool) -> str:
    from common import table  # bench/common.py: no torch at import time

    rows = [[n, ctx.results[n].status, ctx.results[n].figures, f"{ctx.results[n].seconds:.0f}"] for n in order]
    env = ctx.data.get("env", {})
    failed = [n for n in order if ctx.results[n].failed]
    head = [f"# tldist GPU check, --device {ctx.device}, {time.strftime('%Y-%m-%d %H:%M')}, "
            f"{env.get('gpu') or 'no GPU'}, torch {env.get('torch', '?')}, {os.cpu_count()} cores",
            f"# {'finished' if final else 'in progress'} after {time.monotonic() - started:.0f}s "
            f"(budget {ctx.args.budget_s:.0f}s); failed: {', '.join(failed) or 'none'}", ""]
    return "\n".join(head) + table(["check", "status", "key figures", "seconds"], rows) + "\n"


def write_outputs(ctx: Ctx, order: list[str], started: float, final: bool) -> str:
    text = render(ctx, order, started, final)
    out = Path(ctx.args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_check" if ctx.device == "cuda" else "gpu_check_cpu"
    tmp = out / f".{stem}.txt.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / f"{stem}.txt")
    doc = {"device": ctx.device, "final": final, "seconds": round(time.monotonic() - started, 1),
           "budget_s": ctx.args.budget_s, "env": ctx.data.get("env"),
           "checks": [{"name": n, "status": r.status, "figures": r.figures, "seconds": round(r.seconds, 1),
                       "commands": r.commands, "details": r.details, "log_tail": r.log_tail}
                      for n, r in ((n, ctx.results[n]) for n in order)]}
    tmp = out / f".{stem}.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, out / f"{stem}.json")
    if final:
        with tarfile.open(out / f"{stem}_logs.tar.gz", "w:gz") as tar:
            for p in sorted(ctx.run.logs.glob("*.log")):
                tar.add(p, arcname=f"logs/{p.name}")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--out", default=str(BENCH / "results"), help="where the table, JSON and logs go")
    p.add_argument("--work", default=None,
                   help="data, runs and logs (default: a fresh temp dir, removed unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--budget-s", type=float, default=None, help="whole-run budget (default cuda 345, cpu 240)")
    p.add_argument("--only", default="", help="comma list of checks to run (plus what they need)")
    p.add_argument("--skip", default="", help="comma list of checks to leave out")
    p.add_argument("--all-rows", action="store_true",
                   help="with --device cpu, run the CUDA rows on the CPU too (tests this script; compile takes minutes)")
    a = p.parse_args(argv)
    a.budget_s = a.budget_s or (345.0 if a.device == "cuda" else 240.0)
    names = [n for n, _ in CHECKS]
    only = {n for n in a.only.split(",") if n}
    skip = {n for n in a.skip.split(",") if n}
    unknown = (only | skip) - set(names)
    if unknown:
        p.error(f"unknown checks {sorted(unknown)}; choose from {', '.join(names)}")
    started = time.monotonic()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="tldist_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner(work, a.device, started + a.budget_s)
    ctx = Ctx(args=a, device=a.device, work=work, sizes=sizes_for(a.device), run=runner, py=sys.executable)
    for n in names:
        ctx.results[n] = Result(n)
    while only:  # what the selected checks need
        more = {d for n in only for d in DEPS.get(n, [])} - only
        if not more:
            break
        only |= more

    def on_term(signum, frame):  # killed from outside: stop the child, keep the table
        if runner.current is not None:
            kill_group(runner.current)
        if runner.result is not None:
            runner.result.status = f"FAIL (killed by signal {signum})"
        write_outputs(ctx, names, started, final=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    print(f"# gpu_check --device {a.device}: work dir {work}, budget {a.budget_s:.0f}s", flush=True)
    for name, fn in CHECKS:
        res = ctx.results[name]
        t0 = time.monotonic()
        left = runner.deadline - t0
        if (only and name not in only and name not in ("env", "data")) or name in skip:
            res.status = "skipped (not selected)"
        elif left < MIN_START_S:
            res.status = f"skipped (budget: {left:.0f}s left)"
        else:
            runner.result, runner.check_deadline = res, runner.deadline
            try:
                fn(ctx, res)
                res.status = "ok"
            except Skip as e:
                res.status = str(e)
            except CheckFailed as e:
                res.status = f"FAIL ({e})"
            except Exception as e:  # a bug in this script must not cost the other rows
                res.status = f"FAIL ({type(e).__name__}: {e})"[:300]
            finally:
                runner.result = None
        res.seconds = time.monotonic() - t0
        print(f"[{time.monotonic() - started:5.0f}s] {name:14s} {res.status}  {res.figures}", flush=True)
        write_outputs(ctx, names, started, final=False)
    text = write_outputs(ctx, names, started, final=True)
    print("\n" + text, flush=True)
    if not a.work and not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    if any(r.failed for r in ctx.results.values()):
        return 1
    return 3 if any(r.status.startswith("skipped (budget") for r in ctx.results.values()) else 0


# ---------------------------------------------------------------------------------------------
# child modes (each runs in its own process; they write one JSON file)
# ---------------------------------------------------------------------------------------------
def child_env(out: Path, device: str) -> int:
    import accelerate
    import torch
    import torchvision

    info: dict[str, Any] = {"torch": torch.__version__, "torchvision": torchvision.__version__,
                            "accelerate": accelerate.__version__, "cores": os.cpu_count(),
                            "cuda": torch.cuda.is_available(), "python": sys.version.split()[0]}
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_mem_gb=props.total_memory / 2**30, capability=f"{props.major}{props.minor}",
                    cuda_version=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    bf16=torch.cuda.is_bf16_supported())
        try:
            from PIL import Image
            from torchvision.io import decode_jpeg

            buf = io.BytesIO()
            Image.new("RGB", (64, 48), (200, 30, 90)).save(buf, "JPEG")
            img = decode_jpeg(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8), device="cuda")
            torch.cuda.synchronize()
            info["nvjpeg"] = "ok" if tuple(img.shape) == (3, 48, 64) and img.is_cuda else f"shape {tuple(img.shape)}"
        except Exception as e:  # noqa: BLE001
            info["nvjpeg"] = f"{type(e).__name__}: {e}"[:200]
        try:
            import triton

            info["triton"] = triton.__version__
        except Exception:  # noqa: BLE001
            info["triton"] = "missing"
    out.write_text(json.dumps(info, indent=1))
    return 0


def child_data(out: Path, work: str, n_train: str, n_val: str) -> int:
    sys.path.insert(0, str(BENCH))
    from make_images import make_images

    t0 = time.perf_counter()
    root = Path(work) / "data"
    # default parameters for the train set: bench/loop_overhead.py and bench/loader.py reuse it as is
    train = make_images(root / "train", int(n_train), verbose=False)
    val = make_images(root / "val", int(n_val), seed=1, min_shards=4, verbose=False)
    out.write_text(json.dumps({"seconds": time.perf_counter() - t0,
                               "train": {**train, "root": str(root / "train")},
                               "val": {**val, "root": str(root / "val")}}, indent=1, default=str))
    return 0


def child_train(out: Path, argv: list[str]) -> int:
    """``tldist <argv>`` in this process (as ``python -m tldist.cli``), then its peak GPU memory."""
    import torch

    from tldist.cli import main as tldist_main

    rc = tldist_main(argv)
    if os.environ.get("RANK", "0") != "0":
        return rc
    info: dict[str, Any] = {"rc": rc}
    if torch.cuda.is_available():
        info["max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        info["max_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
    out_dir = next((a.split("=", 1)[1] for a in argv if a.startswith("output_dir=")), None)
    ckpts = sorted(Path(out_dir, "checkpoints").glob("step_*")) if out_dir else []
    if ckpts and (ckpts[-1] / "state.pt").is_file():
        try:
            state = torch.load(ckpts[-1] / "state.pt", map_location="cpu", weights_only=True)
            scaler = state.get("scaler") if isinstance(state, dict) else None
            info["scaler_scale"] = float(scaler["scale"]) if scaler else None
        except Exception as e:  # noqa: BLE001
            info["scaler_error"] = f"{type(e).__name__}: {e}"[:200]
    out.write_text(json.dumps(info, indent=1))
    return rc


def child_pixels(out: Path, device: str, size: str, val: str, train: str, workers: str = "2") -> int:
    """The same samples through data.decode=nvjpeg (decoded on ``device``) and =torchvision (CPU workers)."""
    import torch

    from tldist.config import DataConfig
    from tldist.data.device_decode import images_on
    from tldist.data.pipeline import build_eval_loader, build_train_loader
    from tldist.world import World

    image_size, dev, workers = int(size), torch.device(device), int(workers)
    total, n, count, big, mx, same = 0.0, 0, 0, 0, 0, True

    def compare(d: dict, t: dict, mask=None) -> None:
        nonlocal total, n, count, big, mx, same
        same = same and list(d["key"]) == list(t["key"])
        a = images_on(d, dev).cpu().int()
        b = t["image"].int()
        if mask is not None:
            a, b = a[mask], b[mask]
        diff = (a - b).abs()
        total += float(diff.sum())
        n += diff.numel()
        count += a.shape[0]
        big += int((diff > 8).sum())
        mx = max(mx, int(diff.max()) if diff.numel() else 0)

    base = dict(val=val, batch_size=32, num_workers=workers)
    for d, t in zip(build_eval_loader(DataConfig(**base, decode="nvjpeg"), World(), image_size=image_size),
                    build_eval_loader(DataConfig(**base, decode="torchvision"), World(), image_size=image_size)):
        compare(d, t, t["mask"])
    loaders = [build_train_loader(DataConfig(train=[train], batch_size=32, num_workers=workers, seed=7, decode=dec),
                                  World(), image_size=image_size) for dec in ("nvjpeg", "torchvision")]
    try:
        for _, d, t in zip(range(3 if dev.type == "cuda" else 2), *loaders):
            compare(d, t)
    finally:
        for ld in loaders:
            ld.close()
    out.write_text(json.dumps({"images": count, "mean_abs": total / max(n, 1), "max_abs": mx,
                               "frac_gt8": big / max(n, 1), "same_keys": same}, indent=1))
    return 0


def child_main(argv: list[str]) -> int:
    kind, out, rest = argv[0], Path(argv[1]), argv[2:]
    fn = {"env": child_env, "data": child_data, "pixels": child_pixels}.get(kind)
    if kind == "train":
        return child_train(out, rest)
    if fn is None:
        raise SystemExit(f"unknown child mode {kind}")
    return fn(out, *rest)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.path.insert(0, str(REPO))
        raise SystemExit(child_main(sys.argv[2:]))
    sys.path.insert(0, str(BENCH))
    raise SystemExit(main())
