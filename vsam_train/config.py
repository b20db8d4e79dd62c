"""Training configuration: one nested dict of every hyperparameter, read from YAML.

`DEFAULTS` is the paper's recipe from scratch (configs/paper.yaml spells it out, with
model.pretrained: imagenet as in the paper, which needs torchvision's weights file); a YAML file overrides any
subset of it; command-line options override the file (`overrides`, dotted keys). Unknown keys are
errors (a typo must not silently train with a default). The resolved config is saved in the run
folder as config.yaml and inside every checkpoint.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from pose_prep.atomic import atomic_write_text

DEFAULTS: dict = {
    "model": {
        "name": "vsam",            # vsam | vgg16 | resnet50
        "width": 1.0,              # channel multiplier (1.0 = the paper's VGG16)
        "image_size": 224,
        "batch_norm": False,       # torchvision's vgg16_bn layout
        "pretrained": None,        # null (or "none") | imagenet (configs/paper.yaml) | path of a state_dict
        "dropout": 0.5,
        "attention": "single",     # single: the paper's one Ŝ | groups: one map per attribute group
        "attention_scale": 20.0,   # × the pooled attended features added to block4_pool
        # attention: groups only (README "Attribute-group attention"). Joints that supervise each
        # group's map: a pose_prep.heatmaps.JOINT_GROUPS name, a list of COCO-18 joint names or
        # indices, or [] (no heatmap loss). Groups of the vocabulary not listed: the whole body.
        "group_joints": {
            # the DeepFashion attribute subset (texture, sleeve, length, neckline, fabric, fit) ...
            "texture": "torso", "sleeve": "arms", "length": "lower", "neckline": "neckline",
            "fabric": "torso", "fit": "torso",
            # ... and the full benchmark (texture, fabric, shape, part, style)
            "shape": "body", "part": "body", "style": "body",
        },
        "group_channels": 64,      # × width: each group's 1×1 projection of the combined features
        "group_warmup_steps": 0,   # steps over which attribute pooling moves from uniform to the maps (0: off)
    },
    "loss": {
        "category_weight": 1.0,
        "attribute_weight": 1.0,
        "focal_gamma": 2.0,
        "focal_alpha": 0.6,
        "heatmap_loss": {"kind": "l2", "weight": 10.0},   # l2 (paper) | softmax_l2 (released code)
        "group_heatmap_reduction": "sum",   # attention: groups: sum (each map weighted by λ) | mean of the maps' terms
    },
    "optim": {
        "lr": 1.0e-4,              # Adam
        "decay": 1.0e-5,           # Keras inverse-time decay per step: lr / (1 + decay · step)
        "weight_decay": 0.0,
    },
    "train": {
        "epochs": 40,
        "batch_size": 64,          # per process
        "max_steps_per_epoch": None,
        "seed": 0,
        "deterministic": False,
        "compile": False,
        "amp": True,               # bf16 autocast on CUDA (ignored on CPU)
        "channels_last": True,     # on CUDA
        "log_every": 20,           # steps between steps.jsonl lines and TensorBoard step scalars
        "log_items": False,        # each rank writes the paths it trained on to items/rank-R.jsonl
        "keep_epoch_checkpoints": True,
        "cpu_threads": None,       # torch intra-op threads (null: torch's default)
    },
    "data": {
        "train_split": "train",
        "val_split": "val",        # null: no validation
        "num_workers": 4,
        "shuffle_buffer": 512,
        "decode": "cpu",           # cpu | gpu (nvjpeg, needs CUDA)
        "eval_batch_size": None,   # default: train.batch_size
        "max_val_batches": None,
        # The attention target. null: the heatmap prep-pose stored. Set either to render it in the
        # loader from the stored keypoints instead (README "Heatmap target"): heatmap_joints is the
        # joint subset (a pose_prep.heatmaps.JOINT_GROUPS name or a list of COCO-18 joints) for
        # items whose category type has no subset of its own; heatmap_sigma the Gaussian's σ in
        # heatmap pixels.
        "heatmap_joints": None,
        "heatmap_sigma": None,
        "augment": {"p": 0.33, "flip": 0.5, "crop_scale": [0.6, 1.0], "crop_ratio": [0.75, 1.3333],
                    "jitter": 0.2},
    },
}

CHOICES = {
    ("model", "name"): ("vsam", "vgg16", "resnet50"),
    ("model", "attention"): ("single", "groups"),
    ("loss", "heatmap_loss", "kind"): ("l2", "softmax_l2"),
    ("loss", "group_heatmap_reduction"): ("sum", "mean"),
    ("data", "decode"): ("cpu", "gpu"),
}


# Mappings whose keys are data (group names), not settings: a file or --set may add keys to them.
OPEN_MAPPINGS = (("model", "group_joints"),)

# Model names that `vsam experiment` / the GPU comparison accept beyond model.name, as overrides.
MODEL_VARIANTS = {
    "vsam": {"model.name": "vsam", "model.attention": "single"},
    "vsam-groups": {"model.name": "vsam", "model.attention": "groups"},
    "vgg16": {"model.name": "vgg16", "model.attention": "single"},
    "resnet50": {"model.name": "resnet50", "model.attention": "single"},
}


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file or key."""


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """DEFAULTS, updated by the YAML file at `path`, then by `overrides` ({"train.epochs": 3, ...})."""
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except OSError as error:
            raise ConfigError(f"{path}: cannot read config ({error.strerror or error})") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({error})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config is a mapping of sections, got {type(loaded).__name__}")
        _merge(config, loaded, str(path), ())
    for key, value in (overrides or {}).items():
        set_key(config, key, value)
    validate(config)
    return config


def _merge(into: dict, update: dict, source: str, prefix: tuple) -> None:
    for key, value in update.items():
        where = ".".join(prefix + (str(key),))
        if key not in into:
            raise ConfigError(f"{source}: unknown config key {where!r}")
        if prefix + (key,) in OPEN_MAPPINGS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {where} must be a mapping")
            into[key].update(value)
        elif isinstance(into[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {where} must be a mapping")
            _merge(into[key], value, source, prefix + (key,))
        else:
            into[key] = value


def parse_assignments(assignments) -> dict:
    """`--set` options ["train.epochs=3", ...] as overrides {"train.epochs": "3", ...} for `load_config`."""
    overrides = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{assignment!r} is not KEY=VALUE (e.g. train.epochs=3)")
        overrides[key.strip()] = value
    return overrides


def set_key(config: dict, dotted: str, value) -> None:
    """Set `section.key[.subkey]` to `value`; a string value is parsed as YAML ("3" → 3)."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    *parents, last = dotted.split(".")
    node = config
    for part in parents:
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"unknown config key {dotted!r}")
        node = node[part]
    if last not in node and tuple(parents) not in OPEN_MAPPINGS:
        raise ConfigError(f"unknown config key {dotted!r}")
    node[last] = value


def get_key(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def validate(config: dict) -> None:
    for keys, allowed in CHOICES.items():
        value = get_key(config, ".".join(keys))
        if value not in allowed:
            raise ConfigError(f"{'.'.join(keys)} is {value!r}; choose one of {', '.join(allowed)}")
    model, train = config["model"], config["train"]
    if model["image_size"] % 32:
        raise ConfigError(f"model.image_size must be a multiple of 32, got {model['image_size']}")
    if not 0 < model["width"] <= 4:
        raise ConfigError(f"model.width must lie in (0, 4], got {model['width']}")
    for key in ("epochs", "batch_size"):
        if not isinstance(train[key], int) or train[key] < 1:
            raise ConfigError(f"train.{key} must be a positive integer, got {train[key]!r}")
    if not 0 <= config["data"]["augment"]["p"] <= 1:
        raise ConfigError("data.augment.p must lie in [0, 1]")
    if model["attention"] == "groups":
        _validate_groups(model)


def _validate_groups(model: dict) -> None:
    from .groups import GroupPlanError, check_group_joints

    if model["name"] != "vsam":
        raise ConfigError(f"model.attention: groups applies to model.name vsam, not {model['name']!r} "
                          "(the baselines have no attention branch)")
    try:
        check_group_joints(model["group_joints"])
    except GroupPlanError as error:
        raise ConfigError(str(error)) from None
    for key in ("group_channels", "group_warmup_steps"):
        if not isinstance(model[key], int) or model[key] < (1 if key == "group_channels" else 0):
            raise ConfigError(f"model.{key} must be a {'positive' if key == 'group_channels' else 'non-negative'} "
                              f"integer, got {model[key]!r}")


def save_config(config: dict, path: str | Path) -> None:
    """Write atomically: other DDP ranks may be reading the previous one (resume)."""
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
