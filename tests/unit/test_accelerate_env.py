"""tldist.accelerate_env: every setting accelerate launch passes is honoured (mapped onto a tldist key) or refused
with one line; a launcher default is not a choice; a key set in both places to different values is an error.
The environments are the ones accelerate launch really exports (captured from a real launch where it matters)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from helpers import REPO, env

from tldist.accelerate_env import apply_launcher_settings, launcher_settings
from tldist.config import JobConfig, format_config, load_config
from tldist.errors import ConfigError

LAUNCH_DEFAULTS = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO",
                   "ACCELERATE_DYNAMO_MODE": "default", "ACCELERATE_DYNAMO_USE_FULLGRAPH": "False",
                   "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "False"}
"""What a plain ``accelerate launch`` exports (accelerate 1.x, checked in test_shipped_configs_are_honoured)."""

_DUMP = "import os, json; print(json.dumps({k: v for k, v in os.environ.items() if k.startswith(('ACCELERATE_', 'FSDP_'))}))"


def launched_env(*flags: str) -> dict[str, str]:
    """The ACCELERATE_*/FSDP_* variables a real ``accelerate launch <flags>`` gives its process."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "env_dump.py"
        script.write_text(_DUMP)
        proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_processes", "1",
                               str(script)], capture_output=True, text=True, timeout=120, env=env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cfg_with(*overrides: str) -> JobConfig:
    return load_config(None, list(overrides))


def test_unset_precision_takes_the_launchers_and_the_saved_config_says_so():
    cfg = cfg_with()
    assert cfg.train.mixed_precision is None
    found = apply_launcher_settings(cfg, {**LAUNCH_DEFAULTS, "ACCELERATE_MIXED_PRECISION": "bf16"})
    assert cfg.train.mixed_precision == "bf16"
    assert [s.key for s in found] == ["train.mixed_precision"]
    assert "mixed_precision: bf16" in format_config(cfg)


def test_the_launchers_default_no_is_not_a_choice():
    """accelerate launch exports ACCELERATE_MIXED_PRECISION=no when nobody chose: the config's bf16 stands,
    and an unset key falls back to tldist's default."""
    cfg = cfg_with("train.mixed_precision=bf16")
    assert apply_launcher_settings(cfg, LAUNCH_DEFAULTS) == []
    assert cfg.train.mixed_precision == "bf16"
    cfg = cfg_with()
    apply_launcher_settings(cfg, LAUNCH_DEFAULTS)
    t = cfg.train
    assert (t.mixed_precision, t.grad_accum, t.compile, t.compile_mode, t.grad_checkpointing,
            t.fsdp_reshard_after_forward) == ("no", 1, False, "default", False, True)


@pytest.mark.parametrize("mine,launcher", [("no", "bf16"), ("fp16", "bf16")])
def test_precision_conflict_is_one_line_naming_both(mine, launcher):
    cfg = cfg_with(f"train.mixed_precision={mine}")
    with pytest.raises(ConfigError) as e:
        apply_launcher_settings(cfg, {**LAUNCH_DEFAULTS, "ACCELERATE_MIXED_PRECISION": launcher})
    msg = str(e.value)
    assert "\n" not in msg and "train.mixed_precision" in msg and repr(mine) in msg and repr(launcher) in msg
    assert "ACCELERATE_MIXED_PRECISION" in msg


def test_agreeing_values_and_a_second_application_are_fine():
    cfg = cfg_with("train.mixed_precision=bf16", "train.grad_accum=4")
    launched = {**LAUNCH_DEFAULTS, "ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}
    first = apply_launcher_settings(cfg, launched)
    assert apply_launcher_settings(cfg, launched) == first  # idempotent: run() and build() both apply it
    assert (cfg.train.mixed_precision, cfg.train.grad_accum) == ("bf16", 4)


def test_gradient_accumulation_is_mapped_with_the_same_rule():
    cfg = cfg_with()
    apply_launcher_settings(cfg, {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"})
    assert cfg.train.grad_accum == 4
    with pytest.raises(ConfigError, match="train.grad_accum"):
        apply_launcher_settings(cfg_with("train.grad_accum=2"), {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"})
    with pytest.raises(ConfigError, match="positive integer"):
        launcher_settings({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "zero"})


def test_dynamo_inductor_means_compile_and_its_mode():
    cfg = cfg_with()
    apply_launcher_settings(cfg, {**LAUNCH_DEFAULTS, "ACCELERATE_DYNAMO_BACKEND": "INDUCTOR",
                                  "ACCELERATE_DYNAMO_MODE": "max-autotune"})
    assert cfg.train.compile is True and cfg.train.compile_mode == "max-autotune"
    with pytest.raises(ConfigError, match="train.compile"):
        apply_launcher_settings(cfg_with("train.compile=false"), {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"})


@pytest.mark.parametrize("extra,words", [
    ({"ACCELERATE_MIXED_PRECISION": "fp8"}, "mixed_precision=fp8"),
    ({"ACCELERATE_DYNAMO_BACKEND": "AOT_EAGER"}, "dynamo_backend=aot_eager"),
    ({"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR", "ACCELERATE_DYNAMO_USE_FULLGRAPH": "True"}, "dynamo_use_fullgraph"),
    ({"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR", "ACCELERATE_DYNAMO_USE_DYNAMIC": "True"}, "dynamo_use_dynamic"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DEEPSPEED"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"}, "fsdp_state_dict_type"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, "fsdp_auto_wrap_policy"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "HYBRID_SHARD"}, "fsdp_sharding_strategy"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_BACKWARD_PREFETCH": "BACKWARD_POST"}, "fsdp_backward_prefetch"),
])
def test_settings_tldist_does_not_honour_are_refused_in_one_line(extra, words):
    with pytest.raises(ConfigError) as e:
        apply_launcher_settings(cfg_with(), {**LAUNCH_DEFAULTS, **extra})
    assert words in str(e.value) and "\n" not in str(e.value)


def test_fsdp_settings_map_onto_tldist_keys():
    cfg = cfg_with()
    apply_launcher_settings(cfg, {**LAUNCH_DEFAULTS, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
                                  "FSDP_RESHARD_AFTER_FORWARD": "false", "FSDP_ACTIVATION_CHECKPOINTING": "true",
                                  "FSDP_CPU_RAM_EFFICIENT_LOADING": "false"})
    assert cfg.train.fsdp and cfg.train.fsdp_reshard_after_forward is False and cfg.train.grad_checkpointing is True
    with pytest.raises(ConfigError, match="train.grad_checkpointing"):
        apply_launcher_settings(cfg_with("train.grad_checkpointing=false"),
                                {"ACCELERATE_USE_FSDP": "true", "FSDP_ACTIVATION_CHECKPOINTING": "true"})


HONOURED_KEYS = {"compute_environment", "distributed_type", "num_processes", "num_machines", "machine_rank",
                 "same_network", "main_process_ip", "main_process_port", "gpu_ids", "mixed_precision", "fsdp_config"}
HONOURED_FSDP_KEYS = {"fsdp_version", "fsdp_transformer_layer_cls_to_wrap", "fsdp_reshard_after_forward",
                      "fsdp_activation_checkpointing"}


@pytest.mark.parametrize("name", ["cpu.yaml", "ddp.yaml", "fsdp.yaml"])
def test_shipped_configs_hold_only_keys_that_take_effect_and_are_honoured(name):
    """Each key of configs/accelerate/*.yaml either drives the launcher or is mapped by tldist; a real launch
    with the file exports nothing tldist refuses (the launcher's defaults included)."""
    doc = yaml.safe_load((REPO / "configs/accelerate" / name).read_text())
    assert set(doc) <= HONOURED_KEYS, set(doc) - HONOURED_KEYS
    assert set(doc.get("fsdp_config") or {}) <= HONOURED_FSDP_KEYS
    launched = launched_env("--config_file", str(REPO / "configs/accelerate" / name))
    assert {k: launched[k] for k in LAUNCH_DEFAULTS} == LAUNCH_DEFAULTS
    cfg = cfg_with()
    found = apply_launcher_settings(cfg, launched)
    assert [s.key for s in found] == (["train.fsdp"] if name == "fsdp.yaml" else [])
    assert cfg.train.mixed_precision == "no"


def test_a_real_launch_flag_reaches_the_config():
    launched = launched_env("--mixed_precision", "bf16", "--dynamo_backend", "inductor")
    cfg = cfg_with()
    apply_launcher_settings(cfg, launched)
    assert cfg.train.mixed_precision == "bf16" and cfg.train.compile is True
