"""`vsam explain`: where a model looks, as PNG overlays and an `index.html` gallery.

Per image and model:

* Ŝ, the hallucinated pose attention (VSAM only), shown in absolute terms: it is a sigmoid, so a
  dark overlay means low attention everywhere; the attribute-group model (attention: groups) adds
  one map per attribute group ("Ŝ sleeve", ...), its Ŝ being their union (maximum);
* CAM (Zhou et al.) of the predicted category: Σ_k w_ck · F_k over the category head's conv+ReLU
  features F and its linear layer's weights w. A model without a category head (the DeepFashion
  attribute subset) shows the CAM of its best-scoring attribute instead, from the attribute head.
  (The raw map averages to the logit minus the bias, since the head pools by averaging.);
* Grad-CAM (captum's LayerGradCam, ReLU of the gradient-weighted channel sum) on the output of the
  attribute head's 3×3 conv, for each chosen attribute;
* saliency (captum's Saliency: |∂ logit / ∂ pixel|, maximum over the colour channels) for each
  chosen attribute.

The chosen attributes are `--attributes` or, by default, the `--top` best-scoring attributes of the
main model for that image; a baseline is explained for the same attributes, so that the two
columns compare like with like (its CAM is of its own prediction). CAM, Grad-CAM and saliency are
scaled to their own maximum per picture. Every link in index.html is relative and URL-quoted, so
the folder can be moved or opened anywhere; every text (file names included) is HTML-escaped. Files
are named as pose_prep.images.catalog_images names them: one whose name is not valid UTF-8 is listed
with the failures, its name written with \\xNN escapes.
"""
from __future__ import annotations

import html
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from pose_prep.images import BadImage, catalog_images, load, printable_name, warn_unreadable

from .checkpoint import inference_device, load_for_inference
from .inference import ModelInfo

PANEL_SIZE = 224           # longer side of the pictures written, in pixels
OVERLAY_ALPHA = 0.5
COLORMAP = "jet"
MAPS = ("attention", "cam", "gradcam", "saliency")   # the panels explain_model can draw
PNG_COMPRESSION = 1        # zlib level: 4x faster to write than PIL's default 6, files 14 % larger (photos)
GALLERY_TITLE = "vsam explain"           # index.html's <title>: how a later run knows the folder is a gallery
IMAGE_FOLDER = re.compile(r"\d{5}-.*")   # OUT/images/NNNNN-<name>/, one per photo


class ExplainError(ValueError):
    """Options that cannot be honoured (an unknown attribute, models that do not match)."""


@dataclass
class Panel:
    title: str
    file: str                  # relative to the output folder
    caption: str = ""


@dataclass
class Explanation:
    label: str                 # the model's column header
    panels: list[Panel] = field(default_factory=list)
    summary: str = ""          # its top predictions for this image
    attributes: list[int] = field(default_factory=list)   # the attributes its Grad-CAM and saliency explain


@dataclass
class ExplainSummary:
    n_images: int = 0
    n_explained: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def line(self) -> str:
        return f"{self.n_images} images: {self.n_explained} explained, {len(self.failures)} failed"


# --- the maps ----------------------------------------------------------------------------------

def prepare_for_gradients(model: nn.Module) -> nn.Module:
    """In-place ReLUs off: captum hooks a layer's output, which an in-place ReLU after it would
    overwrite (the head's conv is followed by one)."""
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return model


class _HeadLogits(nn.Module):
    """model(images)[key]: the single-tensor forward that captum expects."""

    def __init__(self, model: nn.Module, key: str):
        super().__init__()
        self.model, self.key = model, key

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)[self.key]


def class_activation_map(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """CAM: (K, h, w) head features, (K,) linear weights of one output → (h, w), not normalised."""
    return torch.einsum("khw,k->hw", features, weights)


@torch.no_grad()
def cam(model: nn.Module, outputs: dict, vocabulary) -> tuple[str, torch.Tensor]:
    """(what it explains, raw map) for the predicted category, or the top attribute without a category head."""
    if outputs["category"] is not None:
        index = int(outputs["category"][0].argmax())
        probability = float(torch.softmax(outputs["category"][0].float(), 0)[index])
        return (f"category {vocabulary.categories[index]} ({probability:.2f})",
                class_activation_map(outputs["category_features"][0], model.category_head.fc.weight[index]))
    scores = torch.sigmoid(outputs["attributes"][0].float())
    index = int(scores.argmax())
    return (f"top attribute {vocabulary.attributes[index]} ({float(scores[index]):.2f})",
            class_activation_map(outputs["attribute_features"][0], model.attribute_head.fc.weight[index]))


def grad_cam(model: nn.Module, images: torch.Tensor, attribute: int) -> torch.Tensor:
    """captum's Grad-CAM of one attribute logit on the attribute head's conv output → (h, w) ≥ 0."""
    from captum.attr import LayerGradCam

    explainer = LayerGradCam(_HeadLogits(model, "attributes"), model.attribute_head.conv)
    return explainer.attribute(images, target=attribute, relu_attributions=True)[0, 0].detach()


def saliency(model: nn.Module, images: torch.Tensor, attribute: int) -> torch.Tensor:
    """captum's Saliency of one attribute logit → (H, W): |gradient|, maximum over colour channels."""
    from captum.attr import Saliency

    pixels = images.detach().clone().requires_grad_()
    gradients = Saliency(_HeadLogits(model, "attributes")).attribute(pixels, target=attribute, abs=True)
    return gradients[0].amax(dim=0).detach()


# --- pictures ----------------------------------------------------------------------------------

def display_image(rgb: np.ndarray, size: int = PANEL_SIZE) -> Image.Image:
    """The photo with its longer side at `size`, aspect kept (the model saw it stretched to a square;
    maps are stretched back with it)."""
    image = Image.fromarray(rgb)
    scale = size / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)


def scaled_to_max(heat: torch.Tensor) -> np.ndarray:
    """A map shifted to start at 0 and divided by its maximum (all zeros stays zeros)."""
    heat = heat.detach().float().cpu().numpy()
    heat = heat - heat.min()
    peak = heat.max()
    return heat / peak if peak > 0 else heat


def overlay(image: Image.Image, heat: np.ndarray) -> Image.Image:
    """`heat` (h, w) in [0, 1], resized over `image` and blended in the colour map."""
    from matplotlib import colormaps

    resized = Image.fromarray(np.ascontiguousarray(heat, np.float32)).resize(image.size, Image.BILINEAR)
    colours = colormaps[COLORMAP](np.clip(np.asarray(resized), 0, 1))[..., :3]
    blended = (1 - OVERLAY_ALPHA) * np.asarray(image, np.float32) / 255 + OVERLAY_ALPHA * colours
    return Image.fromarray(np.clip(blended * 255 + 0.5, 0, 255).astype(np.uint8))


def safe_name(name: str) -> str:
    """A file-name part made of A-Z a-z 0-9 . _ - only (anything else as _), at most 60 characters."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:60] or "x"


# --- one image ---------------------------------------------------------------------------------

def explain_model(model: nn.Module, info: ModelInfo, rgb: np.ndarray, attributes: list[int] | None, top: int,
                  folder: Path, out: Path, key: str, label: str, device: torch.device,
                  maps: tuple[str, ...] = MAPS) -> Explanation:
    """Write `key`-*.png for one model and image into `folder`; return its gallery column.
    `attributes` None: the model's own `top` best-scoring ones. `maps`: which of MAPS to draw
    (Ŝ and the group maps are "attention"; the model must have them)."""
    vocabulary = info.vocabulary
    images = info.preprocess(rgb)[None].to(device)
    picture = display_image(rgb)
    explanation = Explanation(label)

    def add(title: str, kind: str, heat: np.ndarray, caption: str = "") -> None:
        path = folder / f"{key}-{safe_name(kind)}.png"
        overlay(picture, heat).save(path, compress_level=PNG_COMPRESSION)
        explanation.panels.append(Panel(title, path.relative_to(out).as_posix(), caption))

    with torch.no_grad():
        outputs = model(images, return_features=True)
    explanation.summary = _top_predictions(outputs, vocabulary)
    if attributes is None and outputs["attributes"] is not None:
        attributes = torch.argsort(outputs["attributes"][0].float(), descending=True, stable=True)[:top].tolist()
    explanation.attributes = attributes or []
    if "attention" in maps and outputs["attention"] is not None:
        attention = outputs["attention"][0, 0].float().cpu().numpy()
        add("Ŝ (pose attention)", "attention", attention, f"max {attention.max():.2f}")
    if "attention" in maps and outputs.get("group_attention") is not None:
        for name, heat in zip(model.group_names, outputs["group_attention"][0].float().cpu().numpy()):
            add(f"Ŝ {name}", f"attention-group-{name}", heat, f"max {heat.max():.2f}")
    if "cam" in maps:
        title, raw = cam(model, outputs, vocabulary)
        add("CAM", "cam", scaled_to_max(raw), title)
    if outputs["attributes"] is not None:
        scores = torch.sigmoid(outputs["attributes"][0].float())
        for a in explanation.attributes:
            name = vocabulary.attributes[a]
            caption = f"{name} ({float(scores[a]):.2f})"
            if "gradcam" in maps:
                add("Grad-CAM", f"gradcam-{name}", scaled_to_max(grad_cam(model, images, a)), caption)
            if "saliency" in maps:
                add("saliency", f"saliency-{name}", scaled_to_max(saliency(model, images, a)), caption)
    return explanation


def _top_predictions(outputs: dict, vocabulary, n: int = 3) -> str:
    parts = []
    if outputs["category"] is not None:
        probabilities = torch.softmax(outputs["category"][0].float(), 0)
        index = int(probabilities.argmax())
        parts.append(f"{vocabulary.categories[index]} {float(probabilities[index]):.2f}")
    if outputs["attributes"] is not None:
        scores = torch.sigmoid(outputs["attributes"][0].float())
        best = torch.argsort(scores, descending=True, stable=True)[:n].tolist()
        parts += [f"{vocabulary.attributes[a]} {float(scores[a]):.2f}" for a in best]
    return ", ".join(parts)


# --- the folder --------------------------------------------------------------------------------

def explain_folder(checkpoint: str | Path, images: str | Path, out: str | Path, *, baseline: str | Path | None = None,
                   attributes: list[str] | None = None, top: int = 1, limit: int | None = None,
                   device: str | None = None, progress: bool = True, errors=None) -> ExplainSummary:
    """Explain every image under `images` (the first `limit`), write the PNGs and index.html to `out`."""
    out = Path(out)
    check_out_folder(out)
    device = inference_device(device)
    models = [("model", *load_for_inference(checkpoint, device))]
    if baseline is not None:
        models.append(("baseline", *load_for_inference(baseline, device)))
    vocabulary = models[0][2].vocabulary
    for _, _, info in models[1:]:
        if info.vocabulary.attributes != vocabulary.attributes:
            raise ExplainError(f"{baseline} predicts other attributes than {checkpoint}: they cannot be compared")
    unknown = [name for name in attributes or [] if name not in vocabulary.attributes]
    if unknown:
        raise ExplainError(f"unknown attribute(s) {', '.join(unknown)}; {checkpoint} knows "
                           f"{', '.join(vocabulary.attributes)}")
    for _, model, _ in models:
        prepare_for_gradients(model)
    labels = {"model": f"{models[0][2].model_name} ({Path(checkpoint).name})"}
    if baseline is not None:
        labels["baseline"] = f"baseline: {models[1][2].model_name} ({Path(baseline).name})"

    named = [vocabulary.attributes.index(name) for name in attributes] if attributes else None
    found = catalog_images(images, on_error=warn_unreadable(errors))[:limit]
    out.mkdir(parents=True, exist_ok=True)
    summary = ExplainSummary(n_images=len(found))
    rows = []
    for number, image in enumerate(tqdm(found, desc="explain", unit="img", disable=not progress, file=sys.stderr)):
        relative = printable_name(image.name)     # shown as one line of text
        try:
            if image.reason:
                raise BadImage(relative, image.reason)
            _, decoded = load(image.path)
        except BadImage as error:
            summary.failures.append((relative, error.reason))
            tqdm.write(f"failed: {relative}: {error.reason}", file=errors or sys.stderr)
            continue
        folder = out / "images" / f"{number:05d}-{safe_name(image.path.stem)}"
        folder.mkdir(parents=True, exist_ok=True)
        display_image(decoded.rgb).save(folder / "input.png", compress_level=PNG_COMPRESSION)
        chosen = named
        columns = []
        for key, model, info in models:   # the baseline explains what the main model chose
            columns.append(explain_model(model, info, decoded.rgb, chosen, top, folder, out, key, labels[key], device))
            chosen = columns[0].attributes
        rows.append((relative, (folder / "input.png").relative_to(out).as_posix(), columns))
        summary.n_explained += 1
    write_gallery(out / "index.html", rows, summary, labels)
    return summary


def check_out_folder(out: Path) -> None:
    """ExplainError unless --out is new, empty, or a gallery of an earlier explain, which is reused: its
    index.html has this gallery's title, or a killed run left only images/NNNNN-* folders. Any other
    folder (a web site's) would lose its index.html."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    if _is_gallery_page(out / "index.html") or _holds_only_gallery_images(out):
        return
    raise ExplainError(f"--out {out} holds files that are not a vsam explain gallery (its index.html would be "
                       "replaced): choose a new or empty folder")


def _is_gallery_page(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as page:
            return f"<title>{GALLERY_TITLE}</title>" in page.read(4096)
    except OSError:
        return False


def _holds_only_gallery_images(out: Path) -> bool:
    images = out / "images"
    return ([p.name for p in out.iterdir()] == ["images"] and images.is_dir()
            and all(p.is_dir() and IMAGE_FOLDER.fullmatch(p.name) for p in images.iterdir()))


def write_gallery(path: Path, rows: list, summary: ExplainSummary, labels: dict[str, str]) -> None:
    """index.html: one table row per image, the models' panels side by side; relative links only."""
    e = html.escape
    parts = [html_head(GALLERY_TITLE), f"<h1>vsam explain</h1><p>{e(summary.line())}. Columns: "
             + " | ".join(e(label) for label in labels.values()) + "</p>\n<table>\n"]
    for relative, input_file, columns in rows:
        cells = [f'<td class="input"><figure><img src="{link(input_file)}" alt="{e(relative)}">'
                 f"<figcaption>{e(relative)}</figcaption></figure></td>"]
        for column in columns:
            figures = "".join(figure_html(panel) for panel in column.panels)
            cells.append(f'<td class="model"><div class="label">{e(column.label)}: {e(column.summary)}</div>'
                         f"{figures}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>\n")
    parts.append("</table>\n")
    if summary.failures:
        parts.append("<h2>Files that could not be used</h2><ul>"
                     + "".join(f"<li>{e(p)}: {e(reason)}</li>" for p, reason in summary.failures) + "</ul>\n")
    parts.append("</body></html>\n")
    path.write_text("".join(parts), encoding="utf-8")


def link(relative_file: str) -> str:
    """A relative file path as an attribute value: URL-quoted (a '#', '%' or '?' in it would
    otherwise end or change the path), then HTML-escaped."""
    return html.escape(quote(relative_file))


def figure_html(panel: Panel) -> str:
    """One captioned picture of a gallery: the panel's title in bold over its caption, both escaped."""
    e = html.escape
    return (f'<figure><img src="{link(panel.file)}" alt="{e(panel.title)}"><figcaption><b>{e(panel.title)}'
            f"</b><br>{e(panel.caption)}</figcaption></figure>")


def html_head(title: str, style: str = "") -> str:
    """The start of a gallery page (doctype, UTF-8, the galleries' style sheet plus `style`) up to <body>."""
    return _HTML_HEAD.replace("TITLE", html.escape(title)).replace("</style>", style + "</style>")


_HTML_HEAD = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>TITLE</title>
<style>
body { font-family: sans-serif; margin: 1em; }
table { border-collapse: collapse; }
td { vertical-align: top; padding: 6px; border-bottom: 1px solid #ccc; }
td.model { border-left: 3px solid #888; }
figure { display: inline-block; margin: 0 4px 4px 0; text-align: center; }
figure img { width: 160px; height: auto; display: block; }
figcaption { font-size: 12px; max-width: 160px; }
.label { font-size: 13px; margin-bottom: 4px; }
</style></head><body>
"""
