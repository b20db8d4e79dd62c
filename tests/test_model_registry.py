import subprocess
import sys

import click
import pytest

import cli
from vsam_train import model_registry
from vsam_train.config import CHOICES, MODEL_VARIANTS, ConfigError, load_config
from vsam_train.models import create_model, is_model, list_models

TINY = {"width": 1 / 16, "image_size": 64}


def test_every_name_of_the_registry_builds_the_model_its_config_overrides_describe():
    built = {}
    for name in list_models():
        kind = MODEL_VARIANTS[name]["model.attention"]
        groups = {"group_names": ["a", "b"], "attribute_groups": [0, 1, -1]} if kind == "groups" else {}
        model = create_model(name, 0, 3, **TINY, **groups)
        built[name] = (type(model).__name__, getattr(model, "group_names", None) is not None)
    assert built == {"vsam": ("VSAM", False), "vsam-groups": ("VSAM", True), "vgg16": ("VGG16", False),
                     "resnet50": ("ResNet50", False)}


def test_config_and_cli_offer_exactly_the_registry_names():
    assert list_models() == list(MODEL_VARIANTS) == ["vsam", "vsam-groups", "vgg16", "resnet50"]
    assert CHOICES[("model", "name")] == model_registry.architectures() == ("vsam", "vgg16", "resnet50")
    assert CHOICES[("model", "attention")] == model_registry.attentions() == ("single", "groups")
    options = {option.name: option for option in cli.main.commands["train"].params}
    assert isinstance(options["model"].type, click.Choice)
    assert tuple(options["model"].type.choices) == model_registry.architectures()
    assert tuple(options["attention"].type.choices) == model_registry.attentions()


def test_every_architecture_has_a_builder_and_a_builder_needs_a_row():
    assert all(callable(model_registry.model_entrypoint(name)) for name in model_registry.architectures())
    assert is_model("vsam-groups") and not is_model("vsam_groups") and not is_model("vgg19")

    def vit(num_categories, num_attributes, **options):
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="'vit' is not an architecture of vsam_train/model_registry.py"):
        model_registry.register_model(vit)
    assert not is_model("vit")


def test_unknown_names_and_attentions_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown model 'vgg19'; choose one of vsam, vsam-groups, vgg16, resnet50"):
        create_model("vgg19", 0, 3, **TINY)
    with pytest.raises(ValueError, match="attention groups applies to vsam, not 'vgg16'"):
        create_model("vgg16", 0, 3, attention="groups", **TINY)
    with pytest.raises(ConfigError, match="model.name is 'vgg19'; choose one of vsam, vgg16, resnet50"):
        load_config(None, {"model.name": "vgg19"})
    with pytest.raises(ConfigError, match="groups applies to model.name vsam, not 'resnet50'"):
        load_config(None, {"model.name": "resnet50", "model.attention": "groups"})


def test_reading_a_config_does_not_import_torch():
    code = "import sys, vsam_train.config, cli; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
