import re

import pytest

from tldist.config import JobConfig, config_from_dict, format_config, load_config
from tldist.errors import ConfigError

from helpers import REPO


def write(tmp_path, text):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_precedence_defaults_file_cli(tmp_path):
    p = write(tmp_path, "optim:\n  lr: 0.5\n  weight_decay: 0.01\ndata:\n  train: [a]\n")
    cfg = load_config(p, ["optim.lr=0.03"])
    assert cfg.optim.lr == 0.03  # CLI beats file
    assert cfg.optim.weight_decay == 0.01  # file beats default
    assert cfg.optim.momentum == 0.9  # default
    assert cfg.data.train == ["a"]


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    p = write(tmp_path, "optim:\n  lrr: 0.5\n")
    with pytest.raises(ConfigError, match=r"job.yaml.*optim.lrr': did you mean 'optim.lr'\?$"):
        load_config(p)


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "unknown config key 'train.epoch': did you mean 'train.epochs'?"),
    ("optm.lr=0.1", "unknown config key 'optm': did you mean 'optim'?"),  # a misspelled section
    ("data.batchsize=4", "unknown config key 'data.batchsize': did you mean 'data.batch_size'?"),
    ("batch_size=4", "unknown config key 'batch_size': did you mean 'data.batch_size' (timm's --batch-size)?"),
    ("epoch=3", "unknown config key 'epoch': did you mean 'train.epochs'?"),  # no section, misspelled
    ("optim.opt=adamw", "unknown config key 'optim.opt': did you mean 'optim.name' (timm's --opt)?"),
    ("smoothing=0.1", "unknown config key 'smoothing': did you mean 'train.label_smoothing' (timm's --smoothing)?"),
    ("optim.zzzzzz=1", "unknown config key 'optim.zzzzzz' (check the spelling; see tldist/config.py for the keys)"),
])
def test_unknown_key_on_cli(override, message):
    with pytest.raises(ConfigError, match=f"^override '{re.escape(override)}': {re.escape(message)}$"):
        load_config(None, [override])


def test_suggested_keys_exist():
    """Every suggestion is a real key; every timm flag named in the metadata leads to its key."""
    from tldist.config import _leaf_fields, suggest_key, timm_flag_keys

    keys = {k for k, _ in _leaf_fields(JobConfig)}
    assert {"optim.lr", "data.batch_size", "checkpoint.resume"} <= keys
    for typo in ("optim.lrr", "data.image_sz", "train.epoch", "lr", "checkpoint.resum", "optm.lr", "workers"):
        assert suggest_key(typo) in keys
    flags = timm_flag_keys()
    assert flags["opt"] == "optim.name" and flags["img_size"] == "data.image_size" and set(flags.values()) <= keys
    sections = {k.split('.')[0] for k in keys if '.' in k}  # 'model' is a section and timm's --model
    assert all(suggest_key(flag) == key for flag, key in flags.items() if flag not in keys | sections)
    assert suggest_key("zzz.qqq") is None and suggest_key("optim.zzzzzz") is None


@pytest.mark.parametrize("override, example", [("model=resnet50", "'model.name' (timm's --model)"),
                                               ("optim=sgd", "'optim.name'")])
def test_value_given_to_a_section(tmp_path, override, example):
    message = f"config key '{override.split('=')[0]}' is a section, not a value: set one of its keys, e.g. {example}"
    with pytest.raises(ConfigError, match=f"^override '{override}': {re.escape(message)}$"):
        load_config(None, [override])
    p = write(tmp_path, override.replace("=", ": ") + "\n")
    with pytest.raises(ConfigError, match=f"job.yaml'?: {re.escape(message)}$"):
        load_config(p)


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs=many"])


def test_override_without_equals():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optim.lr"])


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("nope.yaml")


@pytest.mark.parametrize("override,key", [
    ("transfer.strategy=half", "transfer.strategy"),
    ("optim.lr=-1", "optim.lr"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("data.train_weights=[1,2]", "data.train_weights"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.resampled=true", "data.samples_per_epoch"),
])
def test_validate_names_key(override, key):
    from tldist.data.pipeline import check_data_config

    cfg = load_config(None, ["data.train=[a]", override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg.validate()
        check_data_config(cfg.data)  # the data keys' own rules, which training checks first


def test_empty_train_is_an_error():
    from tldist.data.pipeline import check_data_config

    with pytest.raises(ConfigError, match="data.train"):
        check_data_config(JobConfig().validate().data)


def test_round_trip_through_checkpoint_dict():
    cfg = load_config(None, ["data.train=[x,y]", "optim.name=adamw"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    assert "adamw" in format_config(cfg)


def test_shipped_configs_load_and_validate():

    root = REPO / "configs"
    for p in sorted(root.glob("*.yaml")):
        load_config(p).validate()


def test_later_overrides_win_and_merge():
    cfg = load_config(None, ["optim.lr=1", "optim={lr: 2, name: adamw}", "optim.lr=3", "data.train=[a]"])
    assert (cfg.optim.lr, cfg.optim.name, cfg.data.train) == (3, "adamw", ["a"])


# Every user mistake in the config or an override is one line naming the file/override (never a traceback).
@pytest.mark.parametrize("override,expected", [
    ("data.train=[a,", "override 'data.train=[a,': the value is not valid YAML"),
    ("data.train=[a", "override 'data.train=[a': the value is not valid YAML (did not find expected ',' or ']'"),
    ("optim.lr={x", "override 'optim.lr={x': the value is not valid YAML"),
    ("=3", "override '=3' has no key before '='"),
    ("output_dir=${nope", "override 'output_dir=${nope': config key 'output_dir'"),
    ("output_dir=${nope}", "config key 'output_dir': Interpolation key 'nope' not found (set in the overrides)"),
    ("data=3", "override 'data=3'"),
    ("optim.lr=abc", "override 'optim.lr=abc': config key 'optim.lr'"),
])
def test_bad_override_is_one_line_naming_it(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.train=[a]", override])
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("text,expected", [
    ("data:\n  train: [a\n  batch_size: 1\n", "is not valid YAML: line 3, column 13: "),
    ("output_dir: a\noutput_dir: b\n", "is not valid YAML: line 2, column 1: found duplicate key output_dir"),
    ("data:\n\ttrain: [a]\n", "is not valid YAML: line 2, column 1: found character '\\t'"),
    ("- a\n- b\n", "holds a list, not a mapping of config keys"),
    ("just words\n", "holds a single value, not a mapping of config keys"),
    ("output_dir: ${nope}\n", "Interpolation key 'nope' not found (set in config file '"),
    (b"output_dir: caf\xe9\n", "is not UTF-8 text (byte 15)"),
])
def test_bad_config_file_is_one_line_naming_it(tmp_path, text, expected):
    p = tmp_path / "job.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and expected in msg and "\n" not in msg, msg


def test_mixed_precision_no_unquoted_means_full_precision():
    """YAML 1.1 reads `no` as false; the documented `train.mixed_precision=no` must still mean fp32."""
    from tldist.config import load_config

    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"


# The recipe presets (configs/recipe_*.yaml) say where their settings come from and hold those settings.
def _configs_dir():

    return REPO / "configs"


_RECIPES = {
    "recipe_deit_vit_finetune.yaml": lambda c: (
        c.optim.name == "adamw" and 0.65 <= c.transfer.layer_decay <= 0.75 and c.model.drop_path_rate == 0.1
        and c.data.auto_augment.startswith("rand-m9-mstd0.5-inc1") and c.train.mixup_alpha == 0.8
        and c.train.cutmix_alpha == 1.0 and c.data.random_erasing == 0.25 and c.train.label_smoothing == 0.1
        and c.transfer.strategy == "full"),
    "recipe_torchvision_resnet.yaml": lambda c: (
        c.data.auto_augment == "trivialaugment" and c.data.random_erasing > 0 and c.train.mixup_alpha == 0.2
        and c.train.cutmix_alpha == 1.0 and c.train.label_smoothing == 0.1 and c.train.ema_decay > 0
        and c.transfer.strategy == "full"),
    "recipe_linear_probe_lars.yaml": lambda c: (
        c.optim.name == "lars" and c.transfer.strategy == "linear_probe" and c.optim.weight_decay == 0
        and not (c.data.auto_augment or c.train.mixup_alpha or c.train.cutmix_alpha or c.train.label_smoothing)),
}


@pytest.mark.parametrize("name", sorted(_RECIPES))
def test_recipe_preset_names_its_source_and_holds_its_settings(name):
    path = _configs_dir() / name
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    text = "\n".join(header)
    assert "Source:" in text and "Taken" in text, f"{name}: the header must name its source and what it took"
    cfg = load_config(path).validate()
    assert _RECIPES[name](cfg), f"{name} no longer holds the settings of its recipe"


def test_recipe_presets_are_all_listed():
    assert sorted(p.name for p in _configs_dir().glob("recipe_*.yaml")) == sorted(_RECIPES)


def test_vit_linear_probe_config_follows_the_lars_preset():
    """configs/vit_b16_linear_probe.yaml is the LARS preset on another backbone: the recipe may not drift apart."""
    lars = load_config(_configs_dir() / "recipe_linear_probe_lars.yaml").validate()
    vit = load_config(_configs_dir() / "vit_b16_linear_probe.yaml").validate()
    assert vit.optim == lars.optim and vit.transfer == lars.transfer
    assert (vit.train.epochs, vit.train.label_smoothing, vit.train.mixup_alpha, vit.data.auto_augment) == \
        (lars.train.epochs, lars.train.label_smoothing, lars.train.mixup_alpha, lars.data.auto_augment)
    assert vit.data.train_crop_scale == lars.data.train_crop_scale
