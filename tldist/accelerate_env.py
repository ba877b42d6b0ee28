"""What ``accelerate launch`` asked for, mapped onto tldist's own config keys.

``accelerate launch`` turns its flags and its config file (``--config_file``, or the default one that
``accelerate config`` writes) into environment variables of every process it starts
(accelerate 1.x: ``commands/launch.py:_validate_launch_command`` fills the flags from the file,
``utils/launch.py:prepare_simple_launcher_cmd_env`` / ``prepare_multi_gpu_env`` export them). tldist
places and wraps the model itself (:mod:`tldist.train.parallelize`), so each setting below is either
mapped onto the tldist key that does the same (honoured) or refused with one line
(:class:`~tldist.errors.ConfigError`, exit 2) - never silently ignored:

Honoured (accelerate config key / flag -> environment variable -> tldist key):

- ``mixed_precision`` -> ``ACCELERATE_MIXED_PRECISION`` -> ``train.mixed_precision`` (``bf16``/``fp16``; ``fp8``
  refused);
- ``gradient_accumulation_steps`` -> ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS`` -> ``train.grad_accum``;
- ``dynamo_config.dynamo_backend: INDUCTOR`` -> ``ACCELERATE_DYNAMO_BACKEND`` -> ``train.compile=true``, and
  ``dynamo_mode`` -> ``ACCELERATE_DYNAMO_MODE`` -> ``train.compile_mode``;
- ``distributed_type: FSDP`` -> ``ACCELERATE_USE_FSDP`` -> ``train.fsdp=true``;
- ``fsdp_version: 2`` -> ``FSDP_VERSION`` (tldist always shards with FSDP2's ``fully_shard``);
- ``fsdp_transformer_layer_cls_to_wrap`` -> ``FSDP_TRANSFORMER_CLS_TO_WRAP`` -> candidates for ``train.fsdp_block``
  (:func:`tldist.train.parallelize.fsdp_block_names`), with ``fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP``;
- ``fsdp_reshard_after_forward`` -> ``FSDP_RESHARD_AFTER_FORWARD`` -> ``train.fsdp_reshard_after_forward``;
- ``fsdp_activation_checkpointing`` -> ``FSDP_ACTIVATION_CHECKPOINTING`` -> ``train.grad_checkpointing``;
- ``fsdp_cpu_ram_efficient_loading: false`` and ``fsdp_sync_module_states`` (either value): what tldist does
  anyway (every rank builds the same model from the same seed and weights, then shards it).

Refused with one line: ``fp8``; any other dynamo backend; ``dynamo_use_fullgraph``, ``dynamo_use_dynamic``,
``dynamo_use_regional_compilation``; ``fsdp_state_dict_type`` (tldist writes its own sharded checkpoints),
``fsdp_offload_params``, ``fsdp_sharding_strategy`` other than ``FULL_SHARD``, ``fsdp_auto_wrap_policy`` other
than ``TRANSFORMER_BASED_WRAP``, ``fsdp_backward_prefetch`` other than ``BACKWARD_PRE``, ``fsdp_forward_prefetch``,
``fsdp_use_orig_params: false``, ``fsdp_min_num_params``, ``fsdp_ignored_modules``,
``fsdp_activation_checkpointing_offload``; ``distributed_type`` DEEPSPEED / MEGATRON_LM and ``parallelism_config``.

The rule, once: ``accelerate launch`` exports its *defaults* too (``ACCELERATE_MIXED_PRECISION=no`` when
nobody chose a precision, ``FSDP_RESHARD_AFTER_FORWARD=true``...), so a launcher value equal to
accelerate's own default counts as not chosen. A tldist key left unset (null) takes the launcher's
choice (else tldist's default); a key set in both places to different values is a
:class:`~tldist.errors.ConfigError` naming both (exit 2). :func:`apply_launcher_settings` writes the
outcome into the config before it is saved, so the run's ``config.yaml`` says what was used. One exception:
``train.fsdp`` is a plain boolean whose default (false) cannot be told from a choice, so an FSDP launch turns it on.
Settings a launcher passes that act without tldist's help (``num_processes``, ``gpu_ids`` ->
``CUDA_VISIBLE_DEVICES``, ``num_cpu_threads_per_process`` -> ``OMP_NUM_THREADS``, ``--cpu`` ->
``ACCELERATE_USE_CPU``, read by ``Accelerator``) are not listed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from tldist.config import COMPILE_MODES, JobConfig, TrainConfig
from tldist.errors import ConfigError

_TRUE = ("1", "true", "yes")
_FALSE = ("0", "false", "no")


@dataclass(frozen=True)
class LauncherSetting:
    """One setting the launcher chose (a value other than accelerate's default), as tldist applies it."""

    key: str
    """The tldist key it maps onto, e.g. ``train.mixed_precision``."""
    value: Any
    """The value in tldist's terms (``bf16``, ``True``, 4...)."""
    env: str
    """Where it came from: ``ACCELERATE_MIXED_PRECISION=bf16``."""
    accelerate: str
    """The accelerate config key / flag, for messages: ``mixed_precision``."""


def _flag(env: Mapping[str, str], name: str) -> Optional[bool]:
    """A boolean environment variable as accelerate writes it (``true``/``True``/``1``); None when absent."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(f"launcher setting {name}={raw!r} is not a boolean: use true or false")


def _refuse(what: str, env_text: str, hint: str) -> None:
    raise ConfigError(f"accelerate setting {what} ({env_text}) is not supported by tldist: {hint}")


def launcher_settings(env: Mapping[str, str] = os.environ) -> list[LauncherSetting]:
    """The settings of ``accelerate launch`` (read from ``env``) that tldist honours, each mapped onto its
    tldist key; only values other than accelerate's defaults are returned. Raises :class:`ConfigError`
    (one line naming the accelerate key, its environment variable and what to do) for a setting tldist
    does not honour (see the module docstring)."""
    out: list[LauncherSetting] = []

    def add(key: str, value: Any, var: str, accelerate: str) -> None:
        out.append(LauncherSetting(key, value, f"{var}={env[var]}", accelerate))

    for var, kind in (("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED"), ("ACCELERATE_USE_MEGATRON_LM", "MEGATRON_LM"),
                      ("ACCELERATE_USE_PARALLELISM_CONFIG", "parallelism_config")):
        if _flag(env, var):
            _refuse(f"distributed_type={kind}" if kind.isupper() else kind, f"{var}={env[var]}",
                    "tldist trains with DDP or FSDP2; use configs/accelerate/ddp.yaml or fsdp.yaml")

    # precision: accelerate launch always exports it ("no" when nobody chose)
    precision = env.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    if precision and precision != "no":
        if precision not in ("bf16", "fp16"):
            _refuse(f"mixed_precision={precision}", f"ACCELERATE_MIXED_PRECISION={env['ACCELERATE_MIXED_PRECISION']}",
                    "tldist trains in no, bf16 or fp16 precision (autocast); launch with --mixed_precision bf16")
        add("train.mixed_precision", precision, "ACCELERATE_MIXED_PRECISION", "mixed_precision")

    steps = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "").strip()
    if steps and steps != "auto":
        try:
            n = int(steps)
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError(f"launcher setting ACCELERATE_GRADIENT_ACCUMULATION_STEPS={steps!r} is not a positive "
                              "integer: unset it or set train.grad_accum")
        if n != 1:
            add("train.grad_accum", n, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "gradient_accumulation_steps")

    backend = env.get("ACCELERATE_DYNAMO_BACKEND", "").strip().upper()
    if backend and backend != "NO":
        if backend != "INDUCTOR":
            _refuse(f"dynamo_backend={backend.lower()}", f"ACCELERATE_DYNAMO_BACKEND={env['ACCELERATE_DYNAMO_BACKEND']}",
                    "tldist compiles with torch.compile's inductor only; use --dynamo_backend inductor or "
                    "train.compile=true")
        add("train.compile", True, "ACCELERATE_DYNAMO_BACKEND", "dynamo_backend")
        mode = env.get("ACCELERATE_DYNAMO_MODE", "default").strip() or "default"
        if mode != "default":
            if mode not in COMPILE_MODES:
                _refuse(f"dynamo_mode={mode}", f"ACCELERATE_DYNAMO_MODE={mode}", f"use one of {', '.join(COMPILE_MODES)}")
            add("train.compile_mode", mode, "ACCELERATE_DYNAMO_MODE", "dynamo_mode")
        for var, what, hint in (
                ("ACCELERATE_DYNAMO_USE_FULLGRAPH", "dynamo_use_fullgraph", "tldist compiles with graph breaks "
                 "allowed; set it to false"),
                ("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", "dynamo_use_regional_compilation", "tldist compiles "
                 "the whole model (per block under FSDP2); set it to false")):
            if _flag(env, var):
                _refuse(f"{what}=true", f"{var}={env[var]}", hint)
        if _flag(env, "ACCELERATE_DYNAMO_USE_DYNAMIC") is not None:
            _refuse("dynamo_use_dynamic", f"ACCELERATE_DYNAMO_USE_DYNAMIC={env['ACCELERATE_DYNAMO_USE_DYNAMIC']}",
                    "tldist lets torch.compile pick dynamic shapes (static per block under FSDP2); remove the key")

    if _flag(env, "ACCELERATE_USE_FSDP"):
        out.append(LauncherSetting("train.fsdp", True, f"ACCELERATE_USE_FSDP={env['ACCELERATE_USE_FSDP']}",
                                   "distributed_type: FSDP"))
        out.extend(_fsdp_settings(env))
    return out


def _fsdp_settings(env: Mapping[str, str]) -> list[LauncherSetting]:
    """The ``FSDP_*`` variables of an FSDP launch (accelerate's defaults in brackets: launch.py's flags)."""
    out: list[LauncherSetting] = []

    def text(var: str) -> str:
        return env.get(var, "").strip()

    version = text("FSDP_VERSION")
    if version not in ("", "1", "2"):
        _refuse(f"fsdp_version={version}", f"FSDP_VERSION={version}", "use fsdp_version: 2")
    # "1" is accelerate's default: tldist shards with FSDP2 (fully_shard) either way
    policy = text("FSDP_AUTO_WRAP_POLICY")
    if policy and policy != "TRANSFORMER_BASED_WRAP":
        _refuse(f"fsdp_auto_wrap_policy={policy}", f"FSDP_AUTO_WRAP_POLICY={policy}", "tldist wraps one FSDP2 unit "
                "per block class (TRANSFORMER_BASED_WRAP with fsdp_transformer_layer_cls_to_wrap, or train.fsdp_block)")
    strategy = text("FSDP_SHARDING_STRATEGY")
    if strategy and strategy.upper() not in ("FULL_SHARD", "1"):
        _refuse(f"fsdp_sharding_strategy={strategy}", f"FSDP_SHARDING_STRATEGY={strategy}", "tldist runs FSDP2 "
                "FULL_SHARD; for ZeRO-2 set fsdp_reshard_after_forward: false")
    reshard = _flag(env, "FSDP_RESHARD_AFTER_FORWARD")
    if reshard is False:  # true is accelerate's default
        out.append(LauncherSetting("train.fsdp_reshard_after_forward", False,
                                   f"FSDP_RESHARD_AFTER_FORWARD={env['FSDP_RESHARD_AFTER_FORWARD']}",
                                   "fsdp_reshard_after_forward"))
    if _flag(env, "FSDP_ACTIVATION_CHECKPOINTING"):  # false is accelerate's default
        out.append(LauncherSetting("train.grad_checkpointing", True,
                                   f"FSDP_ACTIVATION_CHECKPOINTING={env['FSDP_ACTIVATION_CHECKPOINTING']}",
                                   "fsdp_activation_checkpointing"))
    if text("FSDP_STATE_DICT_TYPE"):
        _refuse("fsdp_state_dict_type", f"FSDP_STATE_DICT_TYPE={text('FSDP_STATE_DICT_TYPE')}", "tldist writes its own "
                "sharded checkpoints (resumable on any number of ranks); remove the key, and set "
                "checkpoint.full_weights=true for a full model.safetensors in each")
    refused_when_true: list[tuple[str, str, str]] = [
        ("FSDP_OFFLOAD_PARAMS", "fsdp_offload_params", "tldist keeps parameters on the device; remove the key"),
        ("FSDP_FORWARD_PREFETCH", "fsdp_forward_prefetch", "FSDP2 prefetches by itself; remove the key"),
        ("FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD", "fsdp_activation_checkpointing_offload",
         "activation checkpointing recomputes, it does not offload; remove the key"),
    ]
    for var, what, hint in refused_when_true:
        if _flag(env, var):
            _refuse(f"{what}=true", f"{var}={env[var]}", hint)
    if _flag(env, "FSDP_USE_ORIG_PARAMS") is False:
        _refuse("fsdp_use_orig_params=false", f"FSDP_USE_ORIG_PARAMS={env['FSDP_USE_ORIG_PARAMS']}",
                "FSDP2 always keeps the original parameters; remove the key")
    prefetch = text("FSDP_BACKWARD_PREFETCH")
    if prefetch and prefetch.upper() != "BACKWARD_PRE":
        _refuse(f"fsdp_backward_prefetch={prefetch}", f"FSDP_BACKWARD_PREFETCH={prefetch}",
                "FSDP2 prefetches the previous block in the backward (BACKWARD_PRE); remove the key")
    min_params = text("FSDP_MIN_NUM_PARAMS")
    if min_params and min_params not in ("100000000", "1e8", "0"):
        _refuse(f"fsdp_min_num_params={min_params}", f"FSDP_MIN_NUM_PARAMS={min_params}",
                "tldist wraps by block class, not by size; remove the key")
    if text("FSDP_IGNORED_MODULES"):
        _refuse("fsdp_ignored_modules", f"FSDP_IGNORED_MODULES={text('FSDP_IGNORED_MODULES')}",
                "tldist shards every block with trainable parameters; remove the key")
    # FSDP_CPU_RAM_EFFICIENT_LOADING: true is accelerate's default, false is what tldist does (every rank builds
    # the same model, same seed and weights, then shards it); FSDP_SYNC_MODULE_STATES: either way the ranks start
    # identical. FSDP_TRANSFORMER_CLS_TO_WRAP is read by tldist.train.parallelize.fsdp_block_names.
    return out


_KEYS: dict[str, tuple[Callable[[TrainConfig], Any], Callable[[TrainConfig, Any], None]]] = {
    f"train.{name}": (lambda t, n=name: getattr(t, n), lambda t, v, n=name: setattr(t, n, v))
    for name in ("mixed_precision", "grad_accum", "compile", "compile_mode", "fsdp", "fsdp_reshard_after_forward",
                 "grad_checkpointing")
}
_DEFAULTS: dict[str, Any] = {"train.mixed_precision": "no", "train.grad_accum": 1, "train.compile": False,
                             "train.compile_mode": "default", "train.fsdp_reshard_after_forward": True,
                             "train.grad_checkpointing": False}
"""What an unset (null) key becomes when the launcher did not choose either."""


def apply_launcher_settings(cfg: JobConfig, env: Mapping[str, str] = os.environ) -> list[LauncherSetting]:
    """Merge the launcher's settings (:func:`launcher_settings`) into ``cfg.train`` in place and fill every
    still-unset key with tldist's default, so that the saved config says what the run used. Idempotent.

    Returns the launcher's settings (for the start-of-run log). Raises :class:`ConfigError` with one line
    when a key is set in the config and by the launcher to different values, or for a launcher setting
    tldist does not honour.
    """
    found = launcher_settings(env)
    t = cfg.train
    for s in found:
        get, put = _KEYS[s.key]
        mine = get(t)
        if s.key == "train.fsdp":  # a bool whose default (false) cannot be told from a choice: the launcher's wins
            put(t, True)
        elif mine is None:
            put(t, s.value)
        elif mine != s.value:
            raise ConfigError(f"config key '{s.key}' is {mine!r} but the launcher says {s.value!r} (accelerate "
                              f"{s.accelerate}, {s.env}): remove one of the two or make them agree")
    for key, default in _DEFAULTS.items():
        get, put = _KEYS[key]
        if get(t) is None:
            put(t, default)
    return found
