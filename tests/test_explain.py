"""`vsam explain`: the maps checked against their definitions, and a gallery whose every link opens."""
from __future__ import annotations

import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from awkward_names import make_awkward_name_folder
from cli import main as vsam
from vsam_train.checkpoint import load_for_inference
from vsam_train.data import preprocess
from vsam_train.explain import cam, grad_cam, prepare_for_gradients, saliency
from pose_prep.images import find_images, load, printable_name

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.links += [value for name, value in attrs if name in ("src", "href") and value]


def _one_image(df_val_images: Path, image_size: int) -> torch.Tensor:
    _, decoded = load(find_images(df_val_images)[0])
    return preprocess(decoded.rgb, image_size)[None]


def test_gallery_links_only_relative_files_that_exist_and_open(tiny_checkpoint, tiny_baseline_checkpoint,
                                                               df_val_images, tmp_path):
    images = tmp_path / "photos"
    shutil.copytree(df_val_images, images)
    (images / "img" / "000-broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "gallery"
    result = CliRunner().invoke(vsam, ["explain", "--checkpoint", str(tiny_checkpoint), "--baseline",
                                       str(tiny_baseline_checkpoint), "--images", str(images), "--out", str(out),
                                       "--limit", "3", "--attributes", "solid,cotton"])
    assert result.exit_code == 0, result.output
    assert "3 images: 2 explained, 1 failed" in result.output
    assert "failed: img/000-broken.jpg: not an image" in result.output

    moved = tmp_path / "elsewhere" / "copy"          # relative links: the folder works anywhere
    shutil.move(out, moved)
    page = (moved / "index.html").read_text(encoding="utf-8")
    parser = _Links()
    parser.feed(page)
    assert len(parser.links) == 2 * (1 + 6 + 5)      # per image: input, vsam Ŝ+CAM+2×(Grad-CAM, saliency), vgg16 5
    for link in parser.links:
        parsed = urlparse(link)
        assert not parsed.scheme and not parsed.netloc and not link.startswith("/") and ".." not in link, link
        path = moved / unquote(parsed.path)
        assert path.is_file(), link
        with Image.open(path) as picture:
            picture.load()
            assert picture.format == "PNG" and max(picture.size) == 224
    assert "vsam (last.pt)" in page and "baseline: vgg16 (last.pt)" in page
    assert "Ŝ (pose attention)" in page and page.count("<b>Grad-CAM</b>") == 8
    assert "solid (" in page and "cotton (" in page
    assert "img/000-broken.jpg: not an image" in page
    assert sum("-attention.png" in link for link in parser.links) == 2   # Ŝ only for vsam


def test_defaults_explain_the_top_attribute_of_every_image(tiny_checkpoint, df_val_images, tmp_path):
    out = tmp_path / "gallery"
    result = CliRunner().invoke(vsam, ["explain", "--checkpoint", str(tiny_checkpoint), "--images",
                                       str(df_val_images), "--out", str(out), "--limit", "2"])
    assert result.exit_code == 0, result.output
    folders = sorted((out / "images").iterdir())
    assert len(folders) == 2
    for folder in folders:
        names = sorted(p.name for p in folder.iterdir())
        assert names[:3] == ["input.png", "model-attention.png", "model-cam.png"] and len(names) == 5
        assert names[3].startswith("model-gradcam-") and names[4].startswith("model-saliency-")


def test_unknown_attribute_is_a_usage_error(tiny_checkpoint, df_val_images, tmp_path):
    result = CliRunner().invoke(vsam, ["explain", "--checkpoint", str(tiny_checkpoint), "--images",
                                       str(df_val_images), "--out", str(tmp_path / "g"), "--attributes", "paisley"])
    assert result.exit_code == 2 and "unknown attribute(s) paisley" in result.output



def test_a_folder_that_is_not_an_explain_gallery_is_refused_and_an_earlier_gallery_reused(tiny_checkpoint,
                                                                                         df_val_images, tmp_path):
    def explain(out: Path):
        return CliRunner().invoke(vsam, ["explain", "--checkpoint", str(tiny_checkpoint), "--images",
                                         str(df_val_images), "--out", str(out), "--limit", "1"])

    site = tmp_path / "site"
    (site / "images").mkdir(parents=True)
    (site / "index.html").write_text("<html><title>My shop</title></html>")
    (site / "images" / "logo.png").write_bytes(b"png")
    killed = tmp_path / "killed"          # what a killed explain leaves: pictures, no index.html yet
    (killed / "images" / "00000-photo").mkdir(parents=True)
    for foreign in (site, site / "images"):
        result = explain(foreign)
        assert result.exit_code == 2 and f"--out {foreign} holds files that are not a vsam explain gallery" \
            in result.output
    assert (site / "index.html").read_text() == "<html><title>My shop</title></html>"
    assert sorted(p.name for p in site.rglob("*")) == ["images", "index.html", "logo.png"]

    gallery = tmp_path / "gallery"
    for out in (gallery, gallery, killed):        # new, then the gallery it made, then a killed run's
        result = explain(out)
        assert result.exit_code == 0, result.output
        assert (out / "index.html").is_file()

def test_cam_averages_to_the_logit_minus_the_bias(tiny_checkpoint, df_val_images):
    """Global average pooling then a linear layer: the CAM's mean over positions is the logit − bias."""
    model, info = load_for_inference(tiny_checkpoint)
    images = _one_image(df_val_images, info.image_size)
    with torch.no_grad():
        outputs = model(images, return_features=True)
        title, raw = cam(model, outputs, info.vocabulary)
    best = int(outputs["attributes"][0].argmax())
    assert title.startswith(f"top attribute {info.vocabulary.attributes[best]} (")
    assert raw.shape == outputs["attribute_features"].shape[-2:]
    assert float(raw.mean() + model.attribute_head.fc.bias[best].detach()) == pytest.approx(
        float(outputs["attributes"][0, best]), abs=1e-5)


def test_grad_cam_and_saliency_match_their_definitions(tiny_checkpoint, df_val_images):
    """captum's maps equal the same quantities computed with plain autograd."""
    model, info = load_for_inference(tiny_checkpoint)
    prepare_for_gradients(model)
    images = _one_image(df_val_images, info.image_size)
    attribute = 5

    captured = {}
    hook = model.attribute_head.conv.register_forward_hook(lambda m, i, o: captured.update(activation=o))
    logit = model(images)["attributes"][0, attribute]
    hook.remove()
    activation = captured["activation"]
    gradient, = torch.autograd.grad(logit, activation)
    expected = torch.relu((gradient.mean(dim=(2, 3), keepdim=True) * activation).sum(dim=1))[0]
    torch.testing.assert_close(grad_cam(model, images, attribute), expected.detach(), atol=1e-6, rtol=1e-5)

    pixels = images.clone().requires_grad_()
    pixel_gradient, = torch.autograd.grad(model(pixels)["attributes"][0, attribute], pixels)
    torch.testing.assert_close(saliency(model, images, attribute), pixel_gradient.abs()[0].amax(dim=0))


def test_by_default_the_baseline_explains_the_attributes_the_model_chose(tiny_checkpoint, tiny_baseline_checkpoint,
                                                                         df_val_images, tmp_path):
    out = tmp_path / "gallery"
    result = CliRunner().invoke(vsam, ["explain", "--checkpoint", str(tiny_checkpoint), "--baseline",
                                       str(tiny_baseline_checkpoint), "--images", str(df_val_images),
                                       "--out", str(out), "--limit", "1", "--top", "2"])
    assert result.exit_code == 0, result.output
    model, info = load_for_inference(tiny_checkpoint)
    with torch.no_grad():
        logits = model(_one_image(df_val_images, info.image_size))["attributes"][0]
    top = [info.vocabulary.attributes[a] for a in torch.argsort(logits, descending=True, stable=True)[:2]]
    folder, = (out / "images").iterdir()
    for key in ("model", "baseline"):
        explained = sorted(p.name[len(f"{key}-gradcam-"):-4] for p in folder.glob(f"{key}-gradcam-*.png"))
        assert explained == sorted(top), key


class _Gallery(HTMLParser):
    """Links, the input photos' captions and the listed failures of index.html (text unescaped)."""

    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.captions: list[str] = []
        self.failures: list[str] = []
        self._cell, self._text = None, None

    def handle_starttag(self, tag, attrs):
        self.links += [value for name, value in attrs if name in ("src", "href") and value]
        if tag == "td":
            self._cell = dict(attrs).get("class")
        if (tag == "figcaption" and self._cell == "input") or tag == "li":
            self._text = []

    def handle_endtag(self, tag):
        if tag in ("figcaption", "li") and self._text is not None:
            (self.failures if tag == "li" else self.captions).append("".join(self._text))
            self._text = None

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)


def test_awkward_file_names_get_quoted_links_escaped_captions_and_names_that_are_not_utf8_a_line(
        tiny_checkpoint, tmp_path):
    """Real files named with spaces, #, %, ?, <b>, &, quotes, a newline: explained, each caption the
    name as text (HTML-escaped, control characters as \\n), each link URL-quoted and opening a file;
    names that are not valid UTF-8: a stderr line and a gallery entry with \\xNN escapes."""
    images, out = tmp_path / "drop", tmp_path / "gallery"
    expected = make_awkward_name_folder(images)
    good = [name for name, reason in expected.items() if reason is None]
    result = CliRunner().invoke(vsam, ["explain", "--checkpoint", str(tiny_checkpoint), "--images", str(images),
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"{len(expected)} images: {len(good)} explained, {len(expected) - len(good)} failed" in result.output
    for name, reason in expected.items():
        if reason is not None:
            assert f"failed: {printable_name(name)}: {reason}\n" in result.output

    page = (out / "index.html").read_bytes().decode("utf-8")     # strict: valid UTF-8
    assert "<b>tag</b>" not in page
    gallery = _Gallery()
    gallery.feed(page)
    assert sorted(gallery.captions) == sorted(printable_name(name) for name in good)
    assert sorted(gallery.failures) == sorted(f"{printable_name(name)}: {reason}" for name, reason in expected.items()
                                              if reason)
    assert len(gallery.links) == len(good) * (1 + 4)                 # input, Ŝ, CAM, Grad-CAM, saliency
    for link in gallery.links:
        assert link == quote(unquote(link)) and not urlparse(link).scheme and ".." not in link, link
        assert (out / unquote(link)).is_file(), link
