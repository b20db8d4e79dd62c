"""`vsam predict`: a trained checkpoint applied to a folder of catalog photos. No pose detector
is loaded: VSAM hallucinates its attention from the image alone.

Output: JSON Lines, one line per image found, in sorted path order:

    {"path": "dresses/001.jpg",              # relative to --images, POSIX separators
     "category": "Dress" | null,             # argmax of the category head; null without one
     "category_prob": 0.91 | null,           # its softmax probability
     "attributes": {"floral": 0.83, ...},    # sigmoid score of every attribute
     "predicted": ["floral", ...],           # the attributes scoring >= --threshold, best first
     "groups": {"texture": "floral", ...}}   # only for exclusive groups (DeepFashion attribute
                                             # subset): each group's best-scoring attribute

A file that cannot be used (unreadable, not an image, truncated, a decompression bomb, a name that
is not valid UTF-8, ...) gets the line {"path": ..., "error": "<reason>"} instead, and one line
"failed: PATH: REASON" on stderr, as prep does; the run goes on. So every image found has exactly
one line, and a reader skips the lines with an "error" key. Paths are written as
pose_prep.images.catalog_images names them (a name that is not valid UTF-8: "caf\\xe9.jpg").
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pose_prep.atomic import atomic_path
from pose_prep.images import BadImage, CatalogImage, catalog_images, load, printable_name
from pose_prep.shard_format import Vocabulary

from .checkpoint import inference_device, load_for_inference
from .data import preprocess


@dataclass
class PredictSummary:
    n_images: int = 0
    n_predicted: int = 0
    n_failed: int = 0

    def line(self) -> str:
        return f"{self.n_images} images: {self.n_predicted} predicted, {self.n_failed} failed"


class ImageFiles(Dataset):
    """Decoded, preprocessed images of a file list: (index, tensor or None, reason or None)."""

    def __init__(self, images: list[CatalogImage], image_size: int):
        self.images, self.image_size = images, image_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        if self.images[index].reason:
            return index, None, self.images[index].reason
        try:
            _, decoded = load(self.images[index].path)
        except BadImage as error:
            return index, None, error.reason
        return index, preprocess(decoded.rgb, self.image_size), None


def _collate(records):
    """Good images stacked into one tensor; bad ones passed on with their reason."""
    good = [(i, x) for i, x, _ in records if x is not None]
    return ([i for i, _ in good], torch.stack([x for _, x in good]) if good else None,
            [(i, reason) for i, x, reason in records if x is None])


def prediction_records(outputs: dict, vocabulary: Vocabulary, threshold: float) -> list[dict]:
    """One record per row of the model's outputs (see the module docstring), without "path"."""
    names = vocabulary.attributes
    scores = torch.sigmoid(outputs["attributes"].float()).cpu().numpy() if outputs["attributes"] is not None \
        else np.zeros((_rows(outputs), 0), np.float32)
    if outputs["category"] is not None:
        probabilities = torch.softmax(outputs["category"].float(), dim=1).cpu()
        category_prob, category = (t.tolist() for t in probabilities.max(dim=1))
    else:
        category_prob = category = [None] * len(scores)
    groups = vocabulary.group_indices() if vocabulary.exclusive_groups else {}
    records = []
    for row, (item_scores, c, p) in enumerate(zip(scores, category, category_prob)):
        order = np.argsort(-item_scores, kind="stable")
        record = {"category": vocabulary.categories[c] if c is not None else None, "category_prob": p,
                  "attributes": {name: float(s) for name, s in zip(names, item_scores)},
                  "predicted": [names[a] for a in order if item_scores[a] >= threshold]}
        if groups:
            record["groups"] = {group: names[idx[int(np.argmax(item_scores[idx]))]] for group, idx in groups.items()}
        records.append(record)
    return records


def _rows(outputs: dict) -> int:
    return next(v.shape[0] for v in outputs.values() if v is not None)


def predict_folder(checkpoint: str | Path, images: str | Path, out, *, threshold: float = 0.5,
                   batch_size: int = 64, device: str | None = None, workers: int = 2, progress: bool = True,
                   errors=None) -> PredictSummary:
    """Predict every image under `images`; write JSON Lines to `out` (a text stream)."""
    device = inference_device(device)
    model, info = load_for_inference(checkpoint, device)
    vocabulary = info["vocabulary"]
    found = catalog_images(images)
    summary = PredictSummary(n_images=len(found))
    loader = DataLoader(ImageFiles(found, info["image_size"]), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate, pin_memory=device.type == "cuda")
    bar = tqdm(total=len(found), desc="predict", unit="img", disable=not progress, dynamic_ncols=True,
               mininterval=1.0, file=sys.stderr)
    with torch.inference_mode():
        for indices, batch, failures in loader:
            lines = {}
            if batch is not None:
                outputs = model(batch.to(device, non_blocking=True))
                for index, record in zip(indices, prediction_records(outputs, vocabulary, threshold)):
                    lines[index] = {"path": found[index].name, **record}
            for index, reason in failures:
                lines[index] = {"path": found[index].name, "error": reason}
                tqdm.write(f"failed: {printable_name(found[index].name)}: {reason}", file=errors or sys.stderr)
            for index in sorted(lines):
                out.write(json.dumps(lines[index], ensure_ascii=False) + "\n")
            summary.n_predicted += len(indices)
            summary.n_failed += len(failures)
            bar.update(len(indices) + len(failures))
    bar.close()
    return summary


def predict_to_file(checkpoint, images, out: str | Path, **options) -> PredictSummary:
    """`predict_folder` into the file `out`, replaced atomically when the run completes ("-": stdout)."""
    if str(out) == "-":
        return predict_folder(checkpoint, images, sys.stdout, **options)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as temporary, open(temporary, "w", encoding="utf-8") as f:
        return predict_folder(checkpoint, images, f, **options)
