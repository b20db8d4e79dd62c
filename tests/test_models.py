import pytest
import torch
import torch.nn.functional as F
import torchvision

from vsam_train.models import PretrainedWeightsError, count_parameters, create_model

TINY = {"width": 1 / 16, "image_size": 64}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _block4_pool_and_block5_input(model, images):
    """Run the model and capture block4_pool's output, block 5's input, the 1×1-conv map and Ŝ."""
    captured = {}
    block4_pool = model.features[model.block_ends[3] - 1]
    block5_first = model.features[model.block_ends[3]]
    hooks = [block4_pool.register_forward_hook(lambda m, i, o: captured.__setitem__("block4_pool", o.clone())),
             block5_first.register_forward_pre_hook(lambda m, i: captured.__setitem__("block5_input", i[0].clone())),
             model.combine.register_forward_hook(lambda m, i, o: captured.__setitem__("combined", F.relu(o)))]
    try:
        out = model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return out, captured


def test_full_size_vsam_has_25m_parameters_a_56x56_attention_and_block4_addition_as_described():
    torch.manual_seed(0)
    model = create_model("vsam", 50, 1000).eval()   # the DeepFashion benchmark's 50 categories, 1000 attributes
    assert 24e6 < count_parameters(model) < 26.5e6
    assert isinstance(model.features[23], torch.nn.MaxPool2d) and model.block_ends == (5, 10, 17, 24, 31)
    with torch.no_grad():
        out, seen = _block4_pool_and_block5_input(model, torch.randn(1, 3, 224, 224))
    assert out["attention"].shape == (1, 1, 56, 56)
    assert out["category"].shape == (1, 50) and out["attributes"].shape == (1, 1000)
    assert seen["block4_pool"].shape == (1, 512, 14, 14) and seen["combined"].shape == (1, 512, 56, 56)
    attended = F.avg_pool2d(seen["combined"] * out["attention"], kernel_size=2, stride=4)
    assert attended.shape == (1, 512, 14, 14)
    torch.testing.assert_close(seen["block5_input"], seen["block4_pool"] + 20.0 * attended, rtol=1e-4, atol=1e-4)


def test_zero_attention_scale_feeds_block4_pool_unchanged_into_block5():
    model = create_model("vsam", 0, 26, **TINY).eval()
    model.attention_scale = 0.0
    with torch.no_grad():
        out, seen = _block4_pool_and_block5_input(model, torch.randn(2, 3, 64, 64))
    assert out["attention"].shape == (2, 1, 16, 16) and out["category"] is None
    assert torch.equal(seen["block5_input"], seen["block4_pool"])
    model.attention_scale = 20.0
    with torch.no_grad():
        _, seen = _block4_pool_and_block5_input(model, torch.randn(2, 3, 64, 64))
    assert not torch.equal(seen["block5_input"], seen["block4_pool"])


def test_attention_is_sigmoid_of_7x7_conv_over_channel_mean_and_max():
    model = create_model("vsam", 0, 26, **TINY).eval()
    with torch.no_grad():
        out, seen = _block4_pool_and_block5_input(model, torch.randn(1, 3, 64, 64))
        combined = seen["combined"]
        pooled = torch.cat([combined.mean(1, keepdim=True), combined.amax(1, keepdim=True)], 1)
        expected = torch.sigmoid(F.conv2d(pooled, model.attention.conv.weight, model.attention.conv.bias, padding=3))
    assert model.attention.conv.kernel_size == (7, 7)
    torch.testing.assert_close(out["attention"], expected)


@pytest.mark.parametrize("name", ["vsam", "vgg16", "resnet50"])
def test_heads_expose_features_and_fc_so_cam_is_a_weighted_sum(name):
    model = create_model(name, 5, 26, **TINY).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64), return_features=True)
    assert (out["attention"] is None) == (name != "vsam")
    for key, head in (("category", model.category_head), ("attribute", model.attribute_head)):
        features = out[f"{key}_features"]
        assert features.shape == (2, 64, 2, 2)     # 1024 · 1/16 channels at 64 / 32
        logits = out["category" if key == "category" else "attributes"]
        cam = torch.einsum("ck,bkhw->bchw", head.fc.weight, features)
        torch.testing.assert_close(logits, cam.mean((2, 3)) + head.fc.bias)


def test_trunks_have_torchvision_keys_and_shapes():
    with torch.device("meta"):
        references = {(False, "vsam"): torchvision.models.vgg16().features.state_dict(),
                      (True, "vgg16"): torchvision.models.vgg16_bn().features.state_dict(),
                      (True, "resnet50"): {k: v for k, v in torchvision.models.resnet50().state_dict().items()
                                           if not k.startswith("fc.")}}
    for (batch_norm, name), reference in references.items():
        with torch.device("meta"):
            ours = create_model(name, 0, 26, batch_norm=batch_norm).features.state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}, name


def test_pretrained_path_loads_a_torchvision_style_state_dict(tmp_path):
    source = create_model("vgg16", 0, 26, **TINY)
    state = {f"features.{k}": v for k, v in source.features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(3, 3)     # torchvision files carry the classifier too
    path = tmp_path / "vgg16-tiny.pth"
    torch.save(state, path)
    model = create_model("vsam", 0, 26, pretrained=str(path), **TINY)
    for key, value in source.features.state_dict().items():
        assert torch.equal(model.features.state_dict()[key], value)


def test_pretrained_file_that_does_not_fit_or_is_not_weights_is_named(tmp_path):
    wrong = tmp_path / "wrong-width.pth"
    torch.save({f"features.{k}": v for k, v in create_model("vgg16", 0, 26, width=1 / 8, image_size=64)
                .features.state_dict().items()}, wrong)
    with pytest.raises(PretrainedWeightsError, match="wrong-width.pth: does not fit"):
        create_model("vsam", 0, 26, pretrained=str(wrong), **TINY)
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    with pytest.raises(PretrainedWeightsError, match="notes.pth: not a loadable state_dict"):
        create_model("vsam", 0, 26, pretrained=str(text), **TINY)
    with pytest.raises(PretrainedWeightsError, match="no such weights file"):
        create_model("vsam", 0, 26, pretrained=str(tmp_path / "missing.pth"), **TINY)


def _offline(monkeypatch, torch_home):
    """An empty torch hub cache, and every download sent to a port where nothing listens."""
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    for variable in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("TORCH_HUB", raising=False)


def _torchvision_file(model_fn, path):
    """A file in torchvision's format: its state_dict's exact keys and shapes, random trunk values.
    The classifier (123 M parameters) is a zero broadcast of one element: same shapes, a few
    bytes on disk (torch.save keeps the strides), so the file is the trunk's 59 MB, not 528 MB."""
    with torch.device("meta"):
        reference = model_fn().state_dict()
    generator = torch.Generator().manual_seed(0)
    state = {key: (torch.randn(value.shape, generator=generator) if value.is_floating_point() else
                   torch.full(value.shape, 7, dtype=value.dtype))
             if key.startswith("features.") else torch.zeros((), dtype=value.dtype).expand(value.shape)
             for key, value in reference.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


@pytest.mark.parametrize("name, batch_norm, model_fn, file_name", [
    ("vsam", False, torchvision.models.vgg16, "vgg16-397923af.pth"),
    ("vgg16", True, torchvision.models.vgg16_bn, "vgg16_bn-6c64b313.pth"),
])
def test_pretrained_imagenet_reads_torchvisions_file_from_the_hub_cache_without_network(
        tmp_path, monkeypatch, name, batch_norm, model_fn, file_name):
    _offline(monkeypatch, tmp_path / "torch")
    from vsam_train.models import imagenet_weights_file
    cached = tmp_path / "torch" / "hub" / "checkpoints" / file_name
    assert imagenet_weights_file(name, batch_norm) == cached
    state = _torchvision_file(model_fn, cached)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    model = create_model(name, 0, 26, batch_norm=batch_norm, pretrained="imagenet")
    assert loads == [{"map_location": "cpu", "weights_only": True}]
    trunk = model.features.state_dict()
    assert len(trunk) == sum(key.startswith("features.") for key in state)
    for key, value in trunk.items():
        assert torch.equal(value, state[f"features.{key}"]), key


def test_pretrained_imagenet_offline_names_the_file_to_place_and_the_override(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path / "torch")
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    with pytest.raises(PretrainedWeightsError) as error:
        create_model("vsam", 0, 26, pretrained="imagenet")
    message = str(error.value)
    assert "\n" not in message
    for text in (f"{expected} is missing", "https://download.pytorch.org/models/vgg16-397923af.pth",
                 "--pretrained none"):
        assert text in message, text
    assert list(expected.parent.iterdir()) == []              # no partial download left behind
    with pytest.raises(PretrainedWeightsError, match=r"vgg16_bn-6c64b313.pth is missing"):
        create_model("vgg16", 0, 26, batch_norm=True, pretrained="imagenet")
    with pytest.raises(PretrainedWeightsError, match="only for width 1.0.*--pretrained none"):
        create_model("vsam", 0, 26, pretrained="imagenet", **TINY)
    expected.write_bytes(b"truncated download")
    with pytest.raises(PretrainedWeightsError, match="vgg16-397923af.pth: not a loadable state_dict.*replace it"):
        create_model("vsam", 0, 26, pretrained="imagenet")


def test_pretrained_none_means_from_scratch(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path / "torch")
    for value in (None, "none", "None", "null", ""):
        torch.manual_seed(0)
        weights = create_model("vgg16", 0, 26, pretrained=value, **TINY).features[0].weight
        torch.manual_seed(0)
        assert torch.equal(weights, create_model("vgg16", 0, 26, **TINY).features[0].weight), value


def test_the_paper_recipe_starts_from_imagenet():
    from pathlib import Path

    from vsam_train.config import load_config
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "paper.yaml")
    assert config["model"]["pretrained"] == "imagenet" and config["model"]["width"] == 1.0


def test_from_scratch_convolutions_are_kaiming_initialised():
    torch.manual_seed(0)
    model = create_model("vgg16", 0, 26, width=0.5, image_size=64)
    conv = model.features[28]                       # last conv of block 5: 256 → 256, 3×3
    expected = (2.0 / (conv.out_channels * 9)) ** 0.5
    assert abs(conv.weight.std().item() - expected) / expected < 0.05
    assert torch.count_nonzero(conv.bias) == 0


def test_bad_shapes_and_names_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        create_model("vsam", 0, 26, width=1 / 16, image_size=100)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("vgg19", 0, 26)
    with pytest.raises(ValueError, match="needs categories or attributes"):
        create_model("vgg16", 0, 0, **TINY)
