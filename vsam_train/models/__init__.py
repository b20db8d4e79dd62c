"""Model factory: `create_model(name, ...)` builds VSAM or one of the paper's baselines.

The names come from one registry, `vsam_train/model_registry.py` (as timm's `_registry.py`):
`list_models()`, `is_model(name)`; each architecture's builder below is registered with
`@register_model`, and `create_model` looks the name up there.

Every model maps images (B, 3, S, S), normalised as `vsam_train.data.preprocess` does, to a dict:

* "category": (B, C) logits (softmax), or None when the data has no categories;
* "attributes": (B, A) logits (sigmoid), or None when it has no attributes;
* "attention": Ŝ after its sigmoid, (B, 1, S/4, S/4), or None for the baselines; for the groups
  model (`attention="groups"`) the union (max) of its group maps, the Ŝ that re-weights block 4;
* "group_attention": the groups model's maps (B, G, S/4, S/4), one per attribute group in
  `model.group_names` order; None for every other model;
* with `return_features=True` also "category_features" and "attribute_features": each head's
  conv + ReLU output (B, 1024·width, S/32, S/32) (None where that head is absent).

The heads' linear layers are `model.category_head.fc` and `model.attribute_head.fc` (CAM_c =
Σ_k fc.weight[c, k] · features_k); the convolutional trunk is `model.features`, laid out as
torchvision's (VGG16 `features` indices; ResNet-50 module names without `avgpool`/`fc`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..model_registry import (architectures_with, attentions, is_model, list_models, model_entrypoint,
                              register_model, resolve)
from .heads import Head, TwoHeads
from .resnet import ResNet50
from .vgg import VGG16, VSAM

ATTENTIONS = attentions()   # single, groups
FROM_SCRATCH = ("none", "null", "")   # `--pretrained none` (YAML's null arrives as None)


class PretrainedWeightsError(RuntimeError):
    """Weights that cannot be obtained or do not fit the model; the message says what to do."""


def create_model(name: str, num_categories: int, num_attributes: int, *, width: float = 1.0,
                 image_size: int = 224, batch_norm: bool = False, pretrained: str | None = None,
                 dropout: float = 0.5, attention_scale: float = 20.0, attention: str = "single",
                 attribute_groups: list[int] | None = None, group_names: list[str] | None = None,
                 group_channels: int = 64) -> TwoHeads:
    """Build a model; Kaiming-initialised unless `pretrained` names weights for its trunk:
    "imagenet" (torchvision's ImageNet weights, see `imagenet_weights_file`) or the path of a
    local state_dict file (torchvision's key names, with or without the classifier keys). None or
    "none" means from scratch.

    `num_categories` may be 0 (no category head; DeepFashion attribute subset). `batch_norm`
    selects torchvision's vgg16_bn layout (VGG models; ResNet-50 always has batch norm).

    `attention="groups"` (VSAM only; the name "vsam-groups" says the same) predicts one map per
    attribute group: `group_names` (G names) and `attribute_groups` (one index into them per
    attribute, -1 for none) are then required; `vsam_train.groups.group_plan` derives both from
    a vocabulary (`model_from_config` does it all from a run's config)."""
    if not is_model(name):
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    name, fixed_attention = resolve(name)          # vsam-groups: vsam with attention groups
    attention = fixed_attention or attention
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}; choose one of {', '.join(ATTENTIONS)}")
    if name not in architectures_with(attention):
        raise ValueError(f"attention {attention} applies to {', '.join(architectures_with(attention))}, "
                         f"not {name!r}")
    model = model_entrypoint(name)(num_categories, num_attributes, width=width, image_size=image_size,
                                   batch_norm=batch_norm, dropout=dropout, attention_scale=attention_scale,
                                   attention=attention, attribute_groups=attribute_groups,
                                   group_names=group_names, group_channels=group_channels)
    if pretrained is not None and str(pretrained).strip().lower() not in FROM_SCRATCH:
        load_pretrained_trunk(model, name, pretrained, batch_norm)
    return model


# The builders, one per architecture of the registry. create_model passes every option; each takes
# the ones its architecture has and ignores the others (`**_`), as create_model always did.

@register_model
def vsam(num_categories: int, num_attributes: int, *, width: float, image_size: int, batch_norm: bool,
         dropout: float, attention_scale: float, attention: str, attribute_groups: list[int] | None,
         group_names: list[str] | None, group_channels: int, **_) -> VSAM:
    grouped = attention == "groups"
    if grouped and group_names is None:
        raise ValueError("attention groups needs group_names and attribute_groups")
    return VSAM(num_categories, num_attributes, width=width, image_size=image_size, batch_norm=batch_norm,
                dropout=dropout, attention_scale=attention_scale,
                attribute_groups=attribute_groups if grouped else None,
                group_names=group_names if grouped else None, group_channels=group_channels)


@register_model
def vgg16(num_categories: int, num_attributes: int, *, width: float, image_size: int, batch_norm: bool,
          dropout: float, **_) -> VGG16:
    return VGG16(num_categories, num_attributes, width=width, image_size=image_size, batch_norm=batch_norm,
                 dropout=dropout)


@register_model
def resnet50(num_categories: int, num_attributes: int, *, width: float, image_size: int, dropout: float,
             **_) -> ResNet50:
    return ResNet50(num_categories, num_attributes, width=width, image_size=image_size, dropout=dropout)


def model_from_config(config: dict, vocabulary, pretrained: str | None = None) -> TwoHeads:
    """The model a run's resolved `config` describes, for `vocabulary` (a shard_format.Vocabulary).
    Configs written before attribute-group attention existed build the single-attention model."""
    from ..groups import plan_for

    m = config["model"]
    plan = plan_for(config, vocabulary)
    groups = {} if plan is None else {"attention": "groups", "group_names": list(plan.names),
                                      "attribute_groups": list(plan.attribute_group),
                                      "group_channels": m.get("group_channels", 64)}
    return create_model(m["name"], len(vocabulary.categories), len(vocabulary.attributes), width=m["width"],
                        image_size=m["image_size"], batch_norm=m["batch_norm"], pretrained=pretrained,
                        dropout=m["dropout"], attention_scale=m["attention_scale"], **groups)


def load_pretrained_trunk(model: TwoHeads, name: str, pretrained: str, batch_norm: bool) -> str:
    """Load `model.features` from "imagenet" or a state_dict file; returns the file used."""
    if pretrained == "imagenet":
        if model.width != 1.0:
            raise PretrainedWeightsError(f"ImageNet weights exist only for width 1.0, not {model.width} "
                                         "(train from scratch: --pretrained none)")
        path = imagenet_weights_file(name, batch_norm)
        if not path.is_file():
            _download_imagenet(name, batch_norm, path)
        source = f"{path} (torchvision's ImageNet weights for {name})"
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise PretrainedWeightsError(f"{path}: no such weights file (--pretrained takes 'imagenet', "
                                         "'none' or a path)")
        source = str(path)
    remedy = (f"; replace it with {_imagenet_weights(name, batch_norm).url} or train from scratch with "
              "--pretrained none" if pretrained == "imagenet" else "")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for foreign or damaged files
        raise PretrainedWeightsError(f"{path}: not a loadable state_dict ({_one_line(error)}){remedy}") from None
    try:
        model.features.load_state_dict(_trunk_state(state), strict=True)
    except (RuntimeError, AttributeError, TypeError) as error:   # wrong keys or shapes; not a dict of tensors
        raise PretrainedWeightsError(f"{source}: does not fit the {name} trunk ({_one_line(error)}){remedy}") from None
    return str(path)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _trunk_state(state: dict) -> dict:
    """torchvision's keys → `model.features` keys: 'features.N.*' for VGG (the classifier is
    dropped); ResNet keys as they are, without 'fc.*'. A vsam checkpoint's 'model' also works."""
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if any(key.startswith("features.") for key in state):
        return {key[len("features."):]: value for key, value in state.items() if key.startswith("features.")}
    return {key: value for key, value in state.items() if not key.startswith("fc.")}


def _imagenet_weights(name: str, batch_norm: bool):
    from torchvision.models import ResNet50_Weights, VGG16_BN_Weights, VGG16_Weights

    if name == "resnet50":
        return ResNet50_Weights.IMAGENET1K_V2
    return VGG16_BN_Weights.IMAGENET1K_V1 if batch_norm else VGG16_Weights.IMAGENET1K_V1


def imagenet_weights_file(name: str, batch_norm: bool = False) -> Path:
    """Where `pretrained="imagenet"` reads torchvision's ImageNet weights for `name`'s trunk: the
    file of torchvision's weights entry (VGG16_Weights.IMAGENET1K_V1 = vgg16-397923af.pth,
    VGG16_BN_Weights.IMAGENET1K_V1 = vgg16_bn-6c64b313.pth, ResNet50_Weights.IMAGENET1K_V2 =
    resnet50-11ad3fa6.pth) in torch's hub cache, `torch.hub.get_dir()/checkpoints` (by default
    ~/.cache/torch/hub/checkpoints; $TORCH_HOME/hub/checkpoints when TORCH_HOME is set): the file
    torchvision itself downloads and reads."""
    url = _imagenet_weights(name, batch_norm).url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _download_imagenet(name: str, batch_norm: bool, path: Path) -> None:
    """Download torchvision's file to `path`, its SHA-256 checked against the prefix in its name
    (torch.hub writes a temporary file and renames it: no partial file is left behind)."""
    url = _imagenet_weights(name, batch_norm).url
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), hash_prefix=path.stem.rsplit("-", 1)[-1], progress=False)
    except Exception as error:  # URLError, HTTPError, socket errors, a hash mismatch, a read-only cache ...
        reason = _one_line(getattr(error, "reason", None) or error)
        raise PretrainedWeightsError(
            f"model.pretrained imagenet: {path} is missing and could not be downloaded ({reason}); place "
            f"{url} there, or train from scratch with --pretrained none (model.pretrained: null)") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["ATTENTIONS", "Head", "PretrainedWeightsError", "ResNet50", "TwoHeads", "VGG16", "VSAM", "count_parameters",
           "create_model", "imagenet_weights_file", "is_model", "list_models", "model_from_config", "register_model"]
