"""Config: YAML layering, dotted overrides, unknown keys and wrong types rejected."""

from pathlib import Path

import pytest
import yaml

from mmfold.config import ConfigError, config_from_dict, diff, load_config, save_config


def test_defaults_data_yaml_and_overrides(project: Path) -> None:
    cfg = load_config("demo", None, ["train.epochs=7", "data.root=../elsewhere", "blend.max_labels=3"])
    assert cfg.data.name == "demo" and cfg.data.models  # from configs/data/demo.yaml
    assert cfg.train.epochs == 7 and cfg.data.root == "../elsewhere" and cfg.blend.max_labels == 3


def test_int_accepted_for_float_and_none_for_optional(project: Path) -> None:
    cfg = load_config("demo", None, ["train.lr=1", "data.caption_col=null", "data.image_dir="])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.data.caption_col is None and cfg.data.image_dir is None


def test_unknown_key_lists_valid_keys(project: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'train.epoch'.*valid keys: \[.*'epochs'"):
        load_config("demo", None, ["train.epoch=3"])
    with pytest.raises(ConfigError, match="unknown key 'nosection'"):
        load_config("demo", None, ["nosection.x=1"])


def test_wrong_type_and_malformed_override(project: Path) -> None:
    with pytest.raises(ConfigError, match="'train.epochs' must be int"):
        load_config("demo", None, ["train.epochs=three"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config("demo", None, ["train.epochs"])


def test_model_yaml_params_merge_and_unknown_in_file(project: Path) -> None:
    models = project / "configs" / "models"
    (models / "m.yaml").write_text(yaml.safe_dump({"model": {"kind": "image", "params": {"backbone": "a", "dropout": 0.1}}}))
    cfg = load_config("demo", "m", ["model.params.backbone=b"])
    assert cfg.model.params == {"backbone": "b", "dropout": 0.1}  # merged, not replaced
    assert cfg.model.name == "m"
    (models / "bad.yaml").write_text(yaml.safe_dump({"train": {"lr_typo": 1}}))
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'train.lr_typo'"):
        load_config("demo", "bad")
    with pytest.raises(ConfigError, match="no model config"):
        load_config("demo", "nope")


def test_missing_data_config_names_available(project: Path) -> None:
    with pytest.raises(ConfigError, match=r"available: \[.*'comp5329'"):
        load_config("nosuchdata")


def test_saved_config_round_trips_and_diff(project: Path) -> None:
    cfg = load_config("demo", None, ["train.epochs=2"])
    save_config(cfg, project / "c.yaml")
    again = config_from_dict(yaml.safe_load((project / "c.yaml").read_text()))
    assert again == cfg
    other = load_config("demo", None, ["train.epochs=5", "train.lr=0.5"])
    assert diff(cfg.to_dict(), other.to_dict(), frozenset({"train.epochs", "overrides"})) == {"train.lr": (0.001, 0.5)}
    assert again.overrides == ["train.epochs=2"] and again.source == "demo"


def test_a_run_saved_before_a_setting_existed_is_not_stale(project: Path) -> None:
    """Adding a config field must not make every older checkpoint or model look changed."""
    from mmfold.artifacts.manifest import learning_view, model_config_hash
    from mmfold.config import learned_settings, learning_diff, with_defaults

    cfg = load_config("demo", None, ["train.lr=0.01"])
    old = cfg.to_dict()
    del old["train"]["length_buckets"]  # as saved by a version without the field
    assert learning_diff(with_defaults(old), cfg.to_dict()) == {}
    assert learning_view(old) == learning_view(cfg.to_dict())
    assert model_config_hash(old) == model_config_hash(cfg)
    assert learned_settings(old) == learned_settings(cfg.to_dict())
