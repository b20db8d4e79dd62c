import importlib
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from cli import main as vsam
from vsam_train.checkpoint import load_checkpoint
from vsam_train.config import (CHOICES, DEFAULTS, RANGES, ConfigError, leaf_keys, load_config, parse_assignments,
                               save_config, schema_type)
from vsam_train.train import resolve_run_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def test_paper_yaml_is_the_paper_recipe_and_the_defaults():
    config = load_config(CONFIGS / "paper.yaml")
    # DEFAULTS are the recipe from scratch (usable offline); the paper's VGG16 started from ImageNet
    assert config == {**DEFAULTS, "model": {**DEFAULTS["model"], "pretrained": "imagenet"}}
    assert config["optim"] == {"lr": 1e-4, "decay": 1e-5, "schedule": "inverse_time", "weight_decay": 0.0}
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
    assert overrides == {"train.epochs": 4, "loss.heatmap_loss.kind": "softmax_l2", "model.pretrained": "a=b"}
    assert load_config(None, overrides)["train"]["epochs"] == 4
    assert parse_assignments([]) == {}
    for bad in ("train.epochs", "=3", " =3"):
        with pytest.raises(ConfigError, match=f"{bad!r} is not KEY=VALUE"):
            parse_assignments(["train.epochs=3", bad])


def _no_traceback(result) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output


def test_numbers_written_any_way_are_numbers_where_the_schema_has_a_number(tmp_path):
    """YAML reads 1e-3 as text (its floats need a dot and a signed exponent): the schema decides."""
    for text in ("1e-3", "1.0e-3", "1E-3", " 0.001 ", "1e-03"):
        assert parse_assignments([f"optim.lr={text}"]) == {"optim.lr": 0.001}, text
    assert parse_assignments(["model.width=1"]) == {"model.width": 1.0}
    assert type(parse_assignments(["model.width=1"])["model.width"]) is float
    assert parse_assignments(["train.epochs=3", "train.amp=false", "data.val_split=null", "model.pretrained=none",
                              "data.augment.crop_scale=[0.5, 1]"]) == {
        "train.epochs": 3, "train.amp": False, "data.val_split": None, "model.pretrained": "none",
        "data.augment.crop_scale": [0.5, 1.0]}
    assert parse_assignments(["optim={lr: 1e-3, decay: 0}"]) == {"optim.lr": 0.001, "optim.decay": 0.0}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("optim:\n  lr: 1e-3\n  decay: 0\nmodel:\n  width: 1\n")
    config = load_config(recipe)
    assert config["optim"]["lr"] == 0.001 and type(config["optim"]["decay"]) is float
    assert type(config["model"]["width"]) is float
    (tmp_path / "empty.yaml").write_text("# nothing set: the defaults\n")
    assert load_config(tmp_path / "empty.yaml") == DEFAULTS


def test_set_optim_lr_1e_3_trains_through_the_cli(df_shards, tmp_path):
    """`--set optim.lr=1e-3` died with a TypeError inside Adam (the rate was the text '1e-3')."""
    previous = torch.get_num_threads()
    try:
        result = CliRunner().invoke(vsam, ["train", "--shards", str(df_shards), "--out", str(tmp_path / "run"),
                                           "--config", str(CONFIGS / "tiny.yaml"), "--epochs", "1", "--workers", "0",
                                           "--batch-size", "8", "--set", "optim.lr=1e-3",
                                           "--set", "train.max_steps_per_epoch=1", "--set", "data.max_val_batches=1"])
    finally:
        torch.set_num_threads(previous)
    assert result.exit_code == 0, result.output
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["config"]["optim"]["lr"] == 0.001
    # --resume with the same text: the typed value equals the saved one (no "differs in optim.lr").
    config = resolve_run_config(tmp_path / "run", None, parse_assignments(["optim.lr=1e-3", "train.epochs=2"]),
                                resume=True)
    assert config["optim"]["lr"] == 0.001 and config["train"]["epochs"] == 2


BAD_SETTINGS = [
    ("optim=3", "optim is a section (lr, decay, schedule, weight_decay)"),
    ("model.group_joints=3", "model.group_joints is a mapping"),
    ("optim.lr=-1e-3", "optim.lr must be a number > 0, got '-1e-3'"),
    ("optim.lr=0", "optim.lr must be a number > 0"),
    ("optim.lr=fast", "optim.lr must be a number > 0, got 'fast'"),
    ("optim.lr=nan", "optim.lr must be a number > 0, got 'nan'"),
    ("optim.lr=", "optim.lr must be a number > 0, got null"),
    ("optim.lr.x=1", "unknown config key 'optim.lr.x'"),
    ("data.num_workers=-1", "data.num_workers must be an integer >= 0, got '-1'"),
    ("train.batch_size=0", "train.batch_size must be an integer >= 1"),
    ("train.epochs=2.5", "train.epochs must be an integer >= 1, got '2.5'"),
    ("train.seed=-1", "train.seed must be an integer in [0, 4294967295]"),
    ("train.amp=1", "train.amp must be true or false, got '1'"),
    ("model.dropout=1", "model.dropout must be a number in [0, 1), got '1'"),
    ("model.image_size=100", "model.image_size must be an integer in [32, 1024] and a multiple of 32, got '100'"),
    ("model.image_size=4096000", "model.image_size must be an integer in [32, 1024] and a multiple of 32"),
    ("model.width=0", "model.width must be a number in (0, 4]"),
    ("data.augment.p=1.5", "data.augment.p must be a number in [0, 1]"),
    ("data.augment.crop_scale=[1.0, 0.5]", "data.augment.crop_scale must be a list [low, high]"),
    ("data.augment.crop_scale=0.5", "data.augment.crop_scale must be a list [low, high]"),
    ("data.val_split=vall", "data.val_split is 'vall'; choose one of train, val, test, none (or null)"),
    ("data.heatmap_sigma=0", "data.heatmap_sigma must be a number in [0.1, 100] or null"),
    ("data.heatmap_sigma=1e-300", "data.heatmap_sigma must be a number in [0.1, 100] or null, got '1e-300'"),
    ("data.heatmap_sigma=1000", "data.heatmap_sigma must be a number in [0.1, 100] or null"),
    ("train.cpu_threads=100000", "train.cpu_threads must be an integer in [1, 1024] or null, got '100000'"),
    ("train.cpu_threads=0", "train.cpu_threads must be an integer in [1, 1024] or null"),
    ("data.heatmap_joints=hands", "data.heatmap_joints: 'hands' is neither"),
    ("model.group_joints.collar=[elbow]", "model.group_joints.collar: 'elbow' is neither"),
]


@pytest.mark.parametrize("setting, message", BAD_SETTINGS, ids=[s for s, _ in BAD_SETTINGS])
def test_a_bad_set_value_is_exit_2_naming_the_key_and_what_it_expects(setting, message, tmp_path):
    result = CliRunner().invoke(vsam, ["train", "--shards", str(tmp_path), "--out", str(tmp_path / "run"),
                                       "--set", setting])
    _no_traceback(result)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "run").exists()


def test_vsam_experiment_and_the_benchmarks_refuse_the_same_values_with_exit_2(tmp_path, capsys):
    result = CliRunner().invoke(vsam, ["experiment", "label-noise", "--shards", str(tmp_path), "--attribute", "floral",
                                       "--out", str(tmp_path / "noise"), "--set", "optim.lr=-1"])
    _no_traceback(result)
    assert result.exit_code == 2 and "optim.lr must be a number > 0" in result.output
    listed = tmp_path / "listed.yaml"
    listed.write_text("- optim\n")
    required = {"bench_train": ["--shards", str(tmp_path)],
                "gpu_experiment": ["--shards", str(tmp_path), "--out", str(tmp_path / "b")],
                "compare": ["--shards", str(tmp_path), "--out", str(tmp_path / "b")],
                "group_attention_stability": ["--shards", str(tmp_path)]}
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        for script, argv in required.items():
            module = importlib.import_module(script)
            parse = module.main if script == "group_attention_stability" else module.parse_args
            cases = [(["--set", "optim.lr=-1"], "optim.lr must be a number > 0")]
            if script != "compare":      # compare's runs read the file in their own processes (exit 2 there)
                cases.append((["--config", str(listed)], f"{listed}: a config is a mapping of sections, got list"))
            for extra, message in cases:
                with pytest.raises(SystemExit) as exit:
                    parse([*argv, *extra])
                assert exit.value.code == 2, (script, extra)
                assert message in capsys.readouterr().err, (script, extra)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


@pytest.mark.parametrize("text, message", [
    ("model: [1, 2\n", "not valid YAML"),
    ("- model\n- optim\n", "a config is a mapping of sections, got list"),
    ("just text\n", "a config is a mapping of sections, got str"),
    ("optim: 3\n", "optim is a section (lr, decay, schedule, weight_decay)"),
    ("optim:\n  lr: -1e-3\n", "optim.lr must be a number > 0, got '-1e-3'"),
    ("train:\n  epochs: many\n", "train.epochs must be an integer >= 1, got 'many'"),
    ("model:\n  width: {a: 1}\n", "model.width must be a number in (0, 4], got {'a': 1}"),
    ("data:\n  num_workers: -2\n", "data.num_workers must be an integer >= 0, got -2"),
    ("optim: !!python/object:os.system {}\n", "not valid YAML"),
    (b"optim:\n  lr: 0.001 # caf\xe9\n", "not UTF-8 text"),
])
def test_a_config_file_that_cannot_be_used_is_exit_2_naming_the_file(text, message, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(text if isinstance(text, bytes) else text.encode())
    result = CliRunner().invoke(vsam, ["train", "--shards", str(tmp_path), "--out", str(tmp_path / "run"),
                                       "--config", str(recipe)])
    _no_traceback(result)
    assert result.exit_code == 2 and f"{recipe}: " in result.output and message in result.output, result.output


def test_every_key_is_typed_and_every_number_has_a_range():
    """A wrong type for any key of the schema is refused naming it; a new numeric key needs a RANGES entry."""
    keys_seen = list(leaf_keys())
    assert ("optim", "lr") in keys_seen and ("model", "group_joints", "sleeve") in keys_seen
    for keys in keys_seen:
        where = ".".join(keys)
        with pytest.raises(ConfigError, match=f"^{where}"):
            load_config(None, {where: {"not": "a value"}})
        if schema_type(keys) in (int, float):
            assert keys in RANGES, where
    from pose_prep.shard_format import SPLITS
    assert CHOICES[("data", "train_split")] == CHOICES[("data", "val_split")] == SPLITS
