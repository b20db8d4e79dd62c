"""Training configuration: one nested dict of every hyperparameter, read from YAML.

`DEFAULTS` is the paper's recipe from scratch (configs/paper.yaml spells it out, with
model.pretrained: imagenet as in the paper, which needs torchvision's weights file); a YAML file overrides any
subset of it; command-line options override the file (`overrides`, dotted keys). Unknown keys are
errors (a typo must not silently train with a default). The resolved config is saved in the run
folder as config.yaml and inside every checkpoint.

Typing. `DEFAULTS` is also the schema: each value is typed as its default is (a float default takes a
number, an int default an integer, a bool true or false, a string a string, a [low, high] list two
numbers, a section a mapping), and three tables say what a default cannot: RANGES (the interval of
each number), NULL_DEFAULT_TYPES (the type of the keys whose default is null) and NULLABLE (keys that
may be set to null although their default is not), beside CHOICES. Every value goes through the one
function `typed_value`, whether it comes from a file, a `--set` option or code, so `1e-3` (text for
YAML, whose floats need a dot and a signed exponent), `1.0e-3` and `3` are numbers where a number is
expected, and a wrong type, a section replaced by a scalar or a value out of range is a ConfigError
that names the key and what it expects (the CLI exits 2). Why not OmegaConf or pydantic: neither is
installed, and either would make a second description of the same keys (a structured-config dataclass
or a model class) that must be kept equal to DEFAULTS; the rules here are a page of code, and DEFAULTS
stays the single schema.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from pose_prep.atomic import atomic_write_text

from .model_registry import architectures, architectures_with, attentions, config_overrides, list_models

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
        # attention: groups only (docs/attention-groups.md). Joints that supervise each
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
        "schedule": "inverse_time",  # inverse_time (the paper's, with decay) | cosine: to 0 over train.epochs
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
        # loader from the stored keypoints instead (docs/config.md, "Keys"): heatmap_joints is the
        # joint subset (a pose_prep.heatmaps.JOINT_GROUPS name or a list of COCO-18 joints) for
        # items whose category type has no subset of its own; heatmap_sigma the Gaussian's σ in
        # heatmap pixels, of the attribute-group maps (model.attention: groups) too.
        "heatmap_joints": None,
        "heatmap_sigma": None,
        "augment": {"p": 0.33, "flip": 0.5, "crop_scale": [0.6, 1.0], "crop_ratio": [0.75, 1.3333],
                    "jitter": 0.2},
    },
}

CHOICES = {
    ("model", "name"): architectures(),      # vsam, vgg16, resnet50 (vsam_train/model_registry.py)
    ("model", "attention"): attentions(),    # single, groups
    ("loss", "heatmap_loss", "kind"): ("l2", "softmax_l2"),
    ("loss", "group_heatmap_reduction"): ("sum", "mean"),
    ("data", "decode"): ("cpu", "gpu"),
    ("optim", "schedule"): ("inverse_time", "cosine"),
    # pose_prep.shard_format.SPLITS (not imported here: it loads h5py; tests/test_config.py checks they agree)
    ("data", "train_split"): ("train", "val", "test", "none"),
    ("data", "val_split"): ("train", "val", "test", "none"),
}


@dataclass(frozen=True)
class Range:
    """The values a number may take: low and high bounds (None: unbounded), each closed or open."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    multiple_of: int | None = None

    def __contains__(self, value: float) -> bool:
        return ((self.low is None or value > self.low or (value == self.low and not self.low_open))
                and (self.high is None or value < self.high or (value == self.high and not self.high_open))
                and (self.multiple_of is None or value % self.multiple_of == 0))

    def __str__(self) -> str:
        low, high = (f"{b:g}" if isinstance(b, float) else str(b) for b in (self.low, self.high))
        if self.high is None:
            text = f"{'>' if self.low_open else '>='} {low}"
        else:
            text = f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        return text + (f" and a multiple of {self.multiple_of}" if self.multiple_of else "")


# The interval of every number of the schema (tests/test_config.py checks that none is missing). For a
# [low, high] list: the interval of each bound.
RANGES = {
    ("model", "width"): Range(0, 4, low_open=True),
    # Five stride-2 poolings need a multiple of 32. Above 1024 (21× the paper's 224² pixels) a full-width
    # VGG16 needs over a GB of activations per image, and a typo (224000) terabytes: refused before allocating.
    ("model", "image_size"): Range(32, 1024, multiple_of=32),
    ("model", "dropout"): Range(0, 1, high_open=True),
    ("model", "attention_scale"): Range(0),
    ("model", "group_channels"): Range(1),
    ("model", "group_warmup_steps"): Range(0),
    ("loss", "category_weight"): Range(0),
    ("loss", "attribute_weight"): Range(0),
    ("loss", "focal_gamma"): Range(0),
    ("loss", "focal_alpha"): Range(0, 1),
    ("loss", "heatmap_loss", "weight"): Range(0),
    ("optim", "lr"): Range(0, low_open=True),
    ("optim", "decay"): Range(0),
    ("optim", "weight_decay"): Range(0),
    ("train", "epochs"): Range(1),
    ("train", "batch_size"): Range(1),
    ("train", "max_steps_per_epoch"): Range(1),
    ("train", "seed"): Range(0, 2**32 - 1),                 # numpy's seeds
    ("train", "log_every"): Range(1),
    # torch allocates per thread up front: 100000 was a MemoryError. 1024 is above any CPU's cores.
    ("train", "cpu_threads"): Range(1, 1024),
    ("data", "num_workers"): Range(0),
    ("data", "shuffle_buffer"): Range(0),
    ("data", "eval_batch_size"): Range(1),
    ("data", "max_val_batches"): Range(1),
    # In heatmap pixels (1.5 stored by prep, 3 in docs/experiments.md). Below 0.1 the Gaussian lights
    # no cell (1e-300 squared is 0: a ZeroDivisionError in the loader); above 100 it covers any heatmap flat.
    ("data", "heatmap_sigma"): Range(0.1, 100),
    ("data", "augment", "p"): Range(0, 1),
    ("data", "augment", "flip"): Range(0, 1),
    ("data", "augment", "jitter"): Range(0, 1),             # factors drawn in [1 - jitter, 1 + jitter]
    ("data", "augment", "crop_scale"): Range(0, 1, low_open=True),
    ("data", "augment", "crop_ratio"): Range(0, low_open=True),
}

JOINTS = "joints"     # a pose_prep.heatmaps.JOINT_GROUPS name or a list of COCO-18 joints (groups.resolve_joints)
PAIR = "pair"         # [low, high]

# Keys whose default is null: the type of their other values.
NULL_DEFAULT_TYPES = {
    ("model", "pretrained"): str,
    ("train", "max_steps_per_epoch"): int,
    ("train", "cpu_threads"): int,
    ("data", "eval_batch_size"): int,
    ("data", "max_val_batches"): int,
    ("data", "heatmap_joints"): JOINTS,
    ("data", "heatmap_sigma"): float,
}
# Keys that may be null although their default is not.
NULLABLE = {("data", "val_split")}
# How a --set text (or a YAML string) says null.
_NULL_TEXTS = ("", "~", "null", "Null", "NULL")


# Mappings whose keys are data (group names), not settings: a file or --set may add keys to them.
OPEN_MAPPINGS = (("model", "group_joints"),)

# Model names that `vsam experiment` / the GPU comparison accept beyond model.name, as overrides:
# every name of the model registry (vsam-groups = model.name vsam, model.attention groups).
MODEL_VARIANTS = {name: config_overrides(name) for name in list_models()}


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file or key."""


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """DEFAULTS, updated by the YAML file at `path`, then by `overrides` ({"train.epochs": 3, ...}),
    every value typed and checked (see the module docstring)."""
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as error:
            raise ConfigError(f"{path}: cannot read config ({error.strerror or error})") from None
        except UnicodeDecodeError as error:
            raise ConfigError(f"{path}: not UTF-8 text (byte {error.start})") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({error})") from None
        if loaded is None:    # empty, or only comments: the defaults
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config is a mapping of sections, got {type(loaded).__name__}")
        try:
            _merge(config, loaded, ())
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
    for key, value in (overrides or {}).items():
        set_key(config, key, value)
    validate(config)
    return config


def differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two configs (a key only one of them has included)."""
    keys = []
    for key in [*a, *(k for k in b if k not in a)]:    # b may add keys to an open mapping (group_joints)
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            keys += differences(a[key], b[key], f"{prefix}{key}.")
        elif a.get(key) != b.get(key):
            keys.append(prefix + key)
    return keys


def _merge(into: dict, update: dict, prefix: tuple) -> None:
    for key, value in update.items():
        keys = prefix + (key,)
        if key not in into and prefix not in OPEN_MAPPINGS:
            raise ConfigError(f"unknown config key {'.'.join(map(str, keys))!r}")
        if isinstance(into.get(key), dict) or keys in OPEN_MAPPINGS:
            _merge(into[key], _section(keys, value), keys)
        else:
            into[key] = typed_value(keys, value)


def parse_assignments(assignments) -> dict:
    """`--set` options ["optim.lr=1e-3", ...] as typed overrides {"optim.lr": 0.001, ...} for
    `load_config`. Each key is checked and each value typed here, so that every tool taking --set
    (vsam train, vsam experiment, the benchmarks) refuses a bad one before any work. `optim={lr: 1e-3}`
    sets the keys of a section it names."""
    overrides = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{assignment!r} is not KEY=VALUE (e.g. train.epochs=3)")
        overrides.update(_typed_assignment(_known_keys(key.strip()), value))
    return overrides


def set_key(config: dict, dotted: str, value) -> None:
    """Set `section.key[.subkey]` to `value`, typed (a text as --set reads it); a mapping given for a
    section sets its keys."""
    for keys, typed in _typed_assignment(_known_keys(dotted), value).items():
        *parents, last = keys.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[last] = typed


def get_key(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def leaf_keys(node: dict = DEFAULTS, prefix: tuple = ()):
    """Every key of the schema that holds a value (the defaults' entries of open mappings included)."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from leaf_keys(value, prefix + (key,))
        else:
            yield prefix + (key,)


def schema_type(keys: tuple):
    """bool, int, float, str, PAIR, JOINTS, or dict (a section or an open mapping) for the key `keys`."""
    if keys in NULL_DEFAULT_TYPES:
        return NULL_DEFAULT_TYPES[keys]
    if keys[:-1] in OPEN_MAPPINGS:
        return JOINTS
    default = _default(keys)
    return PAIR if isinstance(default, list) else type(default)


def _default(keys: tuple):
    node = DEFAULTS
    for key in keys:
        node = node[key]
    return node


def _known_keys(dotted: str) -> tuple:
    keys, node = tuple(dotted.split(".")), DEFAULTS
    for depth, key in enumerate(keys):
        if keys[:depth] in OPEN_MAPPINGS and depth == len(keys) - 1:
            return keys
        if not isinstance(node, dict) or key not in node:
            raise ConfigError(f"unknown config key {dotted!r}")
        node = node[key]
    return keys


def _typed_assignment(keys: tuple, value) -> dict:
    """{dotted key: typed value} for one assignment; a section's mapping becomes one entry per key."""
    if schema_type(keys) is not dict:
        return {".".join(keys): typed_value(keys, value)}
    assigned = {}
    for key, item in _section(keys, _yaml_text(value)).items():
        if keys not in OPEN_MAPPINGS and key not in _default(keys):
            raise ConfigError(f"unknown config key {'.'.join(map(str, keys + (key,)))!r}")
        assigned.update(_typed_assignment(keys + (str(key),), item))
    return assigned


def _section(keys: tuple, value) -> dict:
    if isinstance(value, dict):
        return value
    where = ".".join(map(str, keys))
    if keys in OPEN_MAPPINGS:
        raise ConfigError(f"{where} is a mapping of group names to joints: set {where}.GROUP=JOINTS; "
                          f"got {_shown(value)}")
    names = list(_default(keys))
    raise ConfigError(f"{where} is a section ({', '.join(names)}): set one of its keys, e.g. "
                      f"{where}.{names[0]}=VALUE; got {_shown(value)}")


def typed_value(keys: tuple, value):
    """`value` of the key `keys` (not a section) as the schema types it, a text as --set reads it
    ("1e-3" → 0.001, "null" → None where null is allowed); a ConfigError naming the key and what it
    expects when it cannot be."""
    kind, where = schema_type(keys), ".".join(map(str, keys))
    if value is None or (isinstance(value, str) and value.strip() in _NULL_TEXTS
                         and (_nullable(keys) or kind is not str)):
        if _nullable(keys):
            return None
        raise ConfigError(f"{where} must be {_expected(keys)}, got null")
    if kind is JOINTS:
        typed = _yaml_text(value)
        _check_joints(typed, where)
        return typed
    typed = (_number(value, kind) if kind in (int, float) else _pair(_yaml_text(value)) if kind is PAIR
             else _yaml_text(value) if kind is bool else value)
    if not _is_a(typed, kind) or not _in_range(keys, typed):
        raise ConfigError(f"{where} must be {_expected(keys)}, got {_shown(value)}")
    if keys in CHOICES and typed not in CHOICES[keys]:
        raise ConfigError(f"{where} is {typed!r}; choose one of {', '.join(CHOICES[keys])}"
                          + (" (or null)" if _nullable(keys) else ""))
    return typed


def _in_range(keys: tuple, typed) -> bool:
    if keys not in RANGES:
        return True
    return all(bound in RANGES[keys] for bound in typed) if isinstance(typed, list) else typed in RANGES[keys]


def _nullable(keys: tuple) -> bool:
    return keys in NULL_DEFAULT_TYPES or keys in NULLABLE or schema_type(keys) is JOINTS


_INVALID = object()     # what _number and _pair return for a value they cannot read


def _number(value, kind):
    """`value` as an int or a float (a text parsed as Python writes numbers); _INVALID if it is none."""
    if isinstance(value, bool):
        return _INVALID
    if isinstance(value, str):
        try:
            value = kind(value.strip())
        except ValueError:
            return _INVALID
    if kind is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kind) or (kind is float and not math.isfinite(value)):
        return _INVALID
    return value


def _pair(value):
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return _INVALID
    low, high = (_number(v, float) for v in value)
    return _INVALID if _INVALID in (low, high) or low > high else [low, high]


def _is_a(value, kind) -> bool:
    if value is _INVALID:
        return False
    if kind is PAIR:
        return isinstance(value, list)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _yaml_text(value):
    """A --set text read as YAML ("true" → True, "[0.5, 1]" → [0.5, 1]); any other value as it is."""
    if not isinstance(value, str):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _check_joints(spec, where: str) -> None:
    from .groups import GroupPlanError, resolve_joints

    try:
        resolve_joints(spec, where)
    except GroupPlanError as error:
        raise ConfigError(str(error)) from None


def _expected(keys: tuple) -> str:
    kind = schema_type(keys)
    text = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            PAIR: "a list [low, high] of two numbers, low <= high, each",
            JOINTS: "a joint subset name or a list of COCO-18 joints"}[kind]
    if keys in RANGES:
        text += f" {RANGES[keys]}"
    if keys in CHOICES:
        text = f"one of {', '.join(CHOICES[keys])}"
    return text + (" or null" if _nullable(keys) else "")


def _shown(value) -> str:
    return "null" if value is None else repr(value)


def validate(config: dict) -> None:
    """Every value of `config` typed and checked in place (as `typed_value`), then the rules that tie
    keys together."""
    _typed_tree(config, ())
    model = config["model"]
    if model["name"] not in architectures_with(model["attention"]):
        raise ConfigError(f"model.attention: {model['attention']} applies to model.name "
                          f"{', '.join(architectures_with(model['attention']))}, not {model['name']!r} "
                          "(the baselines have no attention branch)")


def validate_stored(config) -> dict:
    """A typed copy of a config read back from a checkpoint or an export, checked as `validate` checks
    one read from a file (a ConfigError names the key). Keys added to DEFAULTS since it was saved may be
    absent; its sections may not. Keys DEFAULTS no longer has are dropped, not refused: they are
    settings of the vsam that trained it, and a model it trained must stay loadable."""
    if not isinstance(config, dict):
        raise ConfigError(f"a config is a mapping of sections, got {type(config).__name__}")
    missing = [section for section in DEFAULTS if section not in config]
    if missing:
        raise ConfigError(f"no section {', '.join(missing)}")
    config = _without_retired_keys(copy.deepcopy(config), ())
    validate(config)
    return config


def _without_retired_keys(node: dict, prefix: tuple) -> dict:
    """`node` without the keys DEFAULTS does not have (a section that is not a mapping is left to
    `validate` to name)."""
    if prefix in OPEN_MAPPINGS:
        return node
    known = _default(prefix)
    kept = {key: value for key, value in node.items() if key in known}
    sections = {key for key, value in kept.items() if isinstance(value, dict) and isinstance(known[key], dict)}
    return {key: _without_retired_keys(value, prefix + (key,)) if key in sections else value
            for key, value in kept.items()}


def _typed_tree(node: dict, prefix: tuple) -> None:
    for key, value in node.items():
        keys = prefix + (key,)
        if schema_type(keys) is dict:
            _typed_tree(_section(keys, value), keys)
        else:
            node[key] = typed_value(keys, value)


def save_config(config: dict, path: str | Path) -> None:
    """Write atomically: other DDP ranks may be reading the previous one (resume)."""
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
