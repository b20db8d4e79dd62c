"""Every model name vsam knows, in one place, as timm's `timm/models/_registry.py` keeps them.

`config.CHOICES`, `config.MODEL_VARIANTS`, the CLI's `--model` / `--models` checks, the experiments
and `models.create_model` all read this table. A name stands for two config values:

    name          model.name  model.attention
    vsam          vsam        single     the paper's model
    vsam-groups   vsam        groups     one attention map per attribute group
    vgg16         vgg16       single     the paper's baseline (no attention branch)
    resnet50      resnet50    single     torchvision's ResNet-50 trunk, the same heads

A name that is its own `model.name` is an architecture: `vsam_train.models` registers one builder
for each with `@register_model` (the builder's function name is the architecture). The other names
(`vsam-groups`) are variants: an architecture with a fixed attention.

Torch-free on purpose: `vsam_train.config` imports it, and reading a config must not load torch
(importing `vsam_train.models` does). A new model: one row here and one `@register_model` builder in
`vsam_train/models/__init__.py`; a builder without a row is refused when it is registered.
"""
from __future__ import annotations

from typing import Callable

# name → (model.name, model.attention), in the order every list of names is shown.
_NAMES: dict[str, tuple[str, str]] = {
    "vsam": ("vsam", "single"),
    "vsam-groups": ("vsam", "groups"),
    "vgg16": ("vgg16", "single"),
    "resnet50": ("resnet50", "single"),
}

# architecture → builder, filled by `register_model` when vsam_train.models is imported.
_ENTRYPOINTS: dict[str, Callable] = {}


def list_models() -> list[str]:
    """Every model name (architectures and variants): vsam, vsam-groups, vgg16, resnet50."""
    return list(_NAMES)


def is_model(name: str) -> bool:
    return name in _NAMES


def architectures() -> tuple[str, ...]:
    """The names that are their own model.name (the values of model.name): vsam, vgg16, resnet50."""
    return tuple(name for name, (architecture, _) in _NAMES.items() if name == architecture)


def attentions() -> tuple[str, ...]:
    """The values of model.attention: single, groups."""
    return tuple(dict.fromkeys(attention for _, attention in _NAMES.values()))


def architectures_with(attention: str) -> tuple[str, ...]:
    """The architectures that have `attention` (groups: vsam only)."""
    return tuple(dict.fromkeys(architecture for architecture, kind in _NAMES.values() if kind == attention))


def resolve(name: str) -> tuple[str, str | None]:
    """(model.name, model.attention) of a model name; the attention is None for an architecture,
    whose attention is the caller's to choose. KeyError for an unknown name."""
    architecture, attention = _NAMES[name]
    return architecture, None if name == architecture else attention


def config_overrides(name: str) -> dict:
    """The config overrides a model name stands for: {"model.name": ..., "model.attention": ...}."""
    architecture, attention = _NAMES[name]
    return {"model.name": architecture, "model.attention": attention}


def register_model(builder: Callable) -> Callable:
    """Decorator: `builder` (named as its architecture) builds that architecture's models."""
    name = builder.__name__
    if name not in architectures():
        raise ValueError(f"register_model: {name!r} is not an architecture of vsam_train/model_registry.py "
                         f"({', '.join(architectures())}); add its row there first")
    _ENTRYPOINTS[name] = builder
    return builder


def model_entrypoint(architecture: str) -> Callable:
    """The builder registered for `architecture` (import vsam_train.models first)."""
    return _ENTRYPOINTS[architecture]
