import pytest

from tldist.config import JobConfig, config_from_dict, format_config, load_config
from tldist.errors import ConfigError


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
    with pytest.raises(ConfigError, match=r"job.yaml.*optim.lrr"):
        load_config(p)


def test_unknown_key_on_cli():
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'"):
        load_config(None, ["train.epoch=3"])


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
    cfg = load_config(None, ["data.train=[a]", override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg.validate()


def test_empty_train_is_an_error():
    with pytest.raises(ConfigError, match="data.train"):
        JobConfig().validate()


def test_round_trip_through_checkpoint_dict():
    cfg = load_config(None, ["data.train=[x,y]", "optim.name=adamw"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    assert "adamw" in format_config(cfg)


def test_shipped_configs_load_and_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    for p in sorted(root.glob("*.yaml")):
        load_config(p).validate()
