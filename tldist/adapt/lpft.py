"""LP-FT (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution"): a linear probe, then full fine-tuning from the probe's best checkpoint at a lower
LR. It is nothing but two calls of :func:`tldist.train.main.run` with derived configs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

from tldist.artifacts.checkpoint import best_checkpoint, latest_checkpoint
from tldist.artifacts.layout import RunDir
from tldist.errors import ConfigError, UserError
from tldist.paths import make_output_dir
from tldist.train.main import run
from tldist.world import current_world

LPFT_SUMMARY = "lpft.json"
"""Both stages' results, written into the base ``output_dir``."""


def run_lpft(cfg, *, probe_epochs: int, lr_ft: Optional[float] = None, lr_probe: Optional[float] = None,
             probe_steps: int = 0) -> dict[str, Any]:
    """Linear probe then full fine-tuning (LP-FT), in this process (call on every rank).

    Stage 1 (``<output_dir>/probe``): ``transfer.strategy=linear_probe`` for ``probe_epochs`` epochs
    (or ``probe_steps`` steps) at ``lr_probe`` (default: ``optim.lr``). Stage 2
    (``<output_dir>/finetune``): ``transfer.strategy=full`` from the probe's best checkpoint (else its
    latest) - backbone *and* probed head - at ``lr_ft`` (default ``optim.lr / 10``), with the
    config's own epochs/steps. Writes ``<output_dir>/lpft.json`` and returns both stages' results.
    """
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

    probe_ckpts = RunDir.of(probe.output_dir).checkpoints
    start = best_checkpoint(probe_ckpts) or latest_checkpoint(probe_ckpts)
    if start is None:
        raise UserError(f"the linear-probe stage left no checkpoint in {probe_ckpts}")
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
    if current_world().is_main:
        make_output_dir(base, "output_dir")
        (base / LPFT_SUMMARY).write_text(json.dumps(summary, indent=1))
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
