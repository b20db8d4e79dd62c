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
is not valid UTF-8, ...), or whose scores are not finite (a model with NaN weights), gets the line
{"path": ..., "error": "<reason>"} instead, and one line "failed: PATH: REASON" on stderr, as prep
does; the run goes on. So every image found has exactly one line, and a reader skips the lines with
an "error" key. Paths are written as pose_prep.images.catalog_images names them (a name that is not
valid UTF-8: "caf\\xe9.jpg").

The model is a training checkpoint (torch; only its weights are read, memory-mapped) or a file of
`vsam export --format onnx` (`--model`: onnxruntime, with preprocessing in numpy, so that torch is
never imported: issue 16's ≤ 1 GB). Threads decode and preprocess the next batch while the model runs
on this one (`workers`); the scores are the same either way (tests/test_predict.py).
"""
from __future__ import annotations

import json
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import expit, softmax
from tqdm import tqdm

from pose_prep.atomic import atomic_path, make_parent_folder
from pose_prep.images import BadImage, CatalogImage, catalog_images, load, printable_name, warn_unreadable
from pose_prep.shard_format import Vocabulary

from .inference import finite_rows, is_onnx, load_model

# Images per forward pass. At 224 px a full-width model's first layers hold ~12 MB of activations per
# image: 8 keeps the ONNX path near 0.7 GB of RSS, at the speed of larger batches (docs/inference.md).
BATCH_SIZE = 8


@dataclass
class PredictSummary:
    n_images: int = 0
    n_predicted: int = 0
    n_failed: int = 0

    def line(self) -> str:
        return f"{self.n_images} images: {self.n_predicted} predicted, {self.n_failed} failed"


class ImageFiles:
    """Decoded, preprocessed images of a file list: (index, array or tensor or None, reason or None)."""

    def __init__(self, images: list[CatalogImage], prepare):
        self.images, self.prepare = images, prepare

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        if self.images[index].reason:
            return index, None, self.images[index].reason
        try:
            _, decoded = load(self.images[index].path)
        except BadImage as error:
            return index, None, error.reason
        return index, self.prepare(decoded.rgb), None


def _collate(records):
    """(indices of the good images, their inputs, [(index, reason)] of the bad ones)."""
    good = [(i, x) for i, x, _ in records if x is not None]
    return [i for i, _ in good], [x for _, x in good], [(i, reason) for i, x, reason in records if x is None]


def decoded_batches(files: ImageFiles, batch_size: int, threads: int):
    """`_collate`d batches of `files`, in order. With `threads` > 0 a thread pool decodes and
    preprocesses the next batch while the caller runs the model on this one: Pillow's decoder, numpy
    and torch release the GIL, so both cores work, without worker processes that each import torch
    (hundreds of MB apiece). 0: everything in the calling thread."""
    chunks = [range(start, min(start + batch_size, len(files))) for start in range(0, len(files), batch_size)]
    if threads == 0:
        for chunk in chunks:
            yield _collate([files[i] for i in chunk])
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="vsam-decode") as pool:
        ahead = deque()
        for chunk in chunks:
            ahead.append([pool.submit(files.__getitem__, i) for i in chunk])
            if len(ahead) == 2:          # one batch decoding ahead, no more: memory stays two batches
                yield _collate([future.result() for future in ahead.popleft()])
        while ahead:
            yield _collate([future.result() for future in ahead.popleft()])


class OnnxRunner:
    """An exported .onnx file through onnxruntime; preprocessing in numpy (no torch in the process)."""

    def __init__(self, path: str | Path, device: str | None):
        self.model, self.info = load_model(path, device or "cpu")     # CheckpointError for another device
        self.prepare = self.info.preprocess_array      # numpy: no torch in this process

    def __call__(self, inputs: list[np.ndarray]) -> dict:
        return self.model.run(np.stack(inputs))


class TorchRunner:
    """A training checkpoint (`checkpoint.load_for_inference`: the weights only, memory-mapped)."""

    def __init__(self, path: str | Path, device: str | None):
        import torch

        from .checkpoint import inference_device, load_for_inference

        self.torch, self.device = torch, inference_device(device)
        self.model, self.info = load_for_inference(path, self.device)
        self.prepare = self.info.preprocess

    def __call__(self, inputs: list) -> dict:
        with self.torch.inference_mode():
            outputs = self.model(self.torch.stack(inputs).to(self.device))
        return {name: None if value is None else value.float().cpu().numpy() for name, value in outputs.items()}


def prediction_records(outputs: dict, vocabulary: Vocabulary, threshold: float) -> list[dict]:
    """One record per row of the model's outputs (numpy logits; see the module docstring), without "path"."""
    names = vocabulary.attributes
    scores = expit(outputs["attributes"]) if outputs["attributes"] is not None \
        else np.zeros((_rows(outputs), 0), np.float32)
    if outputs["category"] is not None:
        probabilities = softmax(outputs["category"].astype(np.float32), axis=1)
        category, category_prob = probabilities.argmax(axis=1).tolist(), probabilities.max(axis=1).tolist()
    else:
        category_prob = category = [None] * len(scores)
    groups = vocabulary.group_indices() if vocabulary.exclusive_groups else {}
    records = []
    for item_scores, c, p in zip(scores, category, category_prob):
        order = np.argsort(-item_scores, kind="stable")
        record = {"category": vocabulary.categories[c] if c is not None else None, "category_prob": p,
                  "attributes": {name: float(s) for name, s in zip(names, item_scores)},
                  "predicted": [names[a] for a in order if item_scores[a] >= threshold]}
        if groups:
            record["groups"] = {group: names[idx[int(np.argmax(item_scores[idx]))]] for group, idx in groups.items()}
        records.append(record)
    return records


# The "error" of an image whose logits are NaN or infinite: a damaged model (NaN weights) or an overflow,
# not a prediction (and NaN is not JSON).
NOT_FINITE = "the model's scores for this image are not finite (NaN or infinite): its weights may be damaged"


def _rows(outputs: dict) -> int:
    return next(v.shape[0] for v in outputs.values() if v is not None)


def predict_folder(model_file: str | Path, images: str | Path, out, *, threshold: float = 0.5,
                   batch_size: int = BATCH_SIZE, device: str | None = None, workers: int = 2, progress: bool = True,
                   errors=None) -> PredictSummary:
    """Predict every image under `images`; write JSON Lines to `out` (a text stream). `model_file`:
    a training checkpoint, or an ONNX export (by its .onnx suffix); `workers`: decoding threads."""
    runner = OnnxRunner(model_file, device) if is_onnx(model_file) else TorchRunner(model_file, device)
    vocabulary = runner.info.vocabulary
    found = catalog_images(images, on_error=warn_unreadable(errors))
    summary = PredictSummary(n_images=len(found))
    bar = tqdm(total=len(found), desc="predict", unit="img", disable=not progress, dynamic_ncols=True,
               mininterval=1.0, file=sys.stderr)
    for indices, inputs, failures in decoded_batches(ImageFiles(found, runner.prepare), batch_size, workers):
        lines = {}
        if inputs:
            outputs = runner(inputs)
            records = prediction_records(outputs, vocabulary, threshold)
            usable = finite_rows(outputs["attributes"], outputs["category"])
            for index, record, finite in zip(indices, records, usable):
                if finite:
                    lines[index] = {"path": found[index].name, **record}
                else:
                    failures.append((index, NOT_FINITE))
        for index, reason in failures:
            lines[index] = {"path": found[index].name, "error": reason}
            tqdm.write(f"failed: {printable_name(found[index].name)}: {reason}", file=errors or sys.stderr)
        for index in sorted(lines):
            out.write(json.dumps(lines[index], ensure_ascii=False) + "\n")
        summary.n_predicted += len(lines) - len(failures)
        summary.n_failed += len(failures)
        bar.update(len(lines))
    bar.close()
    return summary


def predict_to_file(model_file, images, out: str | Path, **options) -> PredictSummary:
    """`predict_folder` into the file `out`, replaced atomically when the run completes ("-": stdout;
    a FIFO or a character device is written as the run goes: pose_prep.atomic)."""
    if str(out) == "-":
        return predict_folder(model_file, images, sys.stdout, **options)
    out = Path(out)
    make_parent_folder(out)
    with atomic_path(out) as temporary, open(temporary, "w", encoding="utf-8") as f:
        return predict_folder(model_file, images, f, **options)
