from pathlib import Path

import pytest
import yaml

from vsam_train.config import DEFAULTS, ConfigError, load_config, parse_assignments, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_paper_yaml_is_the_paper_recipe_and_the_defaults():
    config = load_config(CONFIGS / "paper.yaml")
    # DEFAULTS are the recipe from scratch (usable offline); the paper's VGG16 started from ImageNet
    assert config == {**DEFAULTS, "model": {**DEFAULTS["model"], "pretrained": "imagenet"}}
    assert config["optim"] == {"lr": 1e-4, "decay": 1e-5, "weight_decay": 0.0}
    assert (config["train"]["batch_size"], config["train"]["epochs"], config["model"]["image_size"]) == (64, 40, 224)
    assert (config["loss"]["focal_gamma"], config["loss"]["focal_alpha"]) == (2.0, 0.6)
    assert config["data"]["augment"]["p"] == 0.33 and config["model"]["attention"] == "single"


def test_tiny_overrides_a_subset_and_overrides_win(tmp_path):
    config = load_config(CONFIGS / "tiny.yaml", {"train.epochs": "2", "loss.heatmap_loss.kind": "softmax_l2"})
    assert config["model"]["width"] == 0.0625 and config["model"]["image_size"] == 64
    assert config["train"]["epochs"] == 2 and config["loss"]["heatmap_loss"] == {"kind": "softmax_l2", "weight": 10.0}
    assert config["optim"]["decay"] == DEFAULTS["optim"]["decay"]
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config == yaml.safe_load((tmp_path / "config.yaml").read_text())


def test_typos_and_bad_values_are_errors_that_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'train.epoch'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown config key 'model.depth'"):
        load_config(None, {"model.depth": 3})
    with pytest.raises(ConfigError, match="model.name is 'vgg19'"):
        load_config(None, {"model.name": "vgg19"})
    with pytest.raises(ConfigError, match="multiple of 32"):
        load_config(None, {"model.image_size": 100})
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_set_assignments_become_overrides_and_a_malformed_one_is_named():
    overrides = parse_assignments(["train.epochs=3", " loss.heatmap_loss.kind =softmax_l2", "model.pretrained=a=b",
                                   "train.epochs=4"])
    assert overrides == {"train.epochs": "4", "loss.heatmap_loss.kind": "softmax_l2", "model.pretrained": "a=b"}
    assert load_config(None, overrides)["train"]["epochs"] == 4
    assert parse_assignments([]) == {}
    for bad in ("train.epochs", "=3", " =3"):
        with pytest.raises(ConfigError, match=f"{bad!r} is not KEY=VALUE"):
            parse_assignments(["train.epochs=3", bad])
