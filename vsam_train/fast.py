"""Training on a split held whole in device memory: decode once, augment per batch on the device.

The streaming loader (`vsam_train.data.ShardStream`) decodes every JPEG again in every epoch. A
split of a few thousand images fits in GPU memory many times over at the training resolution
(5000 × 3 × 224² uint8 = 0.75 GB), so for short runs (benchmarks/gpu_experiment.py) it is decoded
once (nvjpeg on CUDA, the CPU elsewhere), stretched to S×S exactly as `data.preprocess_tensor`
does, kept as uint8, and each batch is gathered, augmented and normalised there in a few batched
kernels. The loop itself is `vsam_train.train`'s: `ResidentBatches` yields the batch dicts that
`train_one_epoch` and `evaluate` expect.

Augmentation draws the same per-item parameters as the streaming loader (`data.draw_augmentation`:
p 0.33, flip, random resized crop, colour jitter) and applies them as `data.augmented_image` and
`data.heatmap_target` do, batched; the only difference is the source of the crop: the stored S×S
image instead of the original picture (both are axis-aligned resamplings of the same photo).
Items that are not augmented get exactly `data.preprocess` of their image.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.ops import roi_align

from pose_prep.shard_format import Shard, ShardFormatError, Vocabulary, snapshot

from .data import crop_boxes, decode_jpegs, draw_augmentation, normalize, read_collection


@dataclass
class ResidentSplit:
    """One split of a collection in memory: pixels and heatmaps on `device`, labels on the CPU."""
    images: torch.Tensor          # (N, 3, S, S) uint8, stretched to S×S as data.preprocess_tensor does
    heatmaps: torch.Tensor        # (N, 1, h, w) uint8 as stored (255 = 1.0)
    has_pose: torch.Tensor        # (N,) bool, on the device
    category: torch.Tensor        # (N,) int64, -1 unknown (CPU)
    attributes: torch.Tensor      # (N, A) float: 1, 0, -1 unknown (CPU)
    paths: list[str]
    vocabulary: Vocabulary
    decode_seconds: float         # reading the shards, decoding and resizing (device synchronised)
    decode_device: str = "cpu"    # where the JPEGs were decoded
    # More per-item targets, batched under their key: maps (N, C, h, w) uint8 on the device are
    # flipped and cropped like `heatmaps` (e.g. one heatmap per attribute group), items (N, ...)
    # on the device are gathered as they are.
    extra_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    extra_items: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def nbytes(self) -> int:
        tensors = [self.images, self.heatmaps, *self.extra_maps.values(), *self.extra_items.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings; a no-op on the CPU, where nothing is queued)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_resident_split(folder: str | Path, split: str, image_size: int, device: torch.device | str, *,
                        max_items: int | None = None, chunk: int = 256,
                        decode_device: torch.device | str | None = None) -> ResidentSplit:
    """Read the live items of `split` (stored order, at most `max_items`) into memory on `device`:
    JPEGs decoded in chunks with `torchvision.io.decode_jpeg` on `decode_device` (default `device`:
    nvjpeg when it is CUDA), each stretched to `image_size`² with antialiasing, kept as uint8."""
    device = torch.device(device)
    decode_device = torch.device(decode_device) if decode_device is not None else device
    started = time.perf_counter()
    with snapshot(folder, (split,)) as collection:   # leased while it is read: see pose_prep.leases
        vocabulary = read_collection(folder, collection.meta).vocabulary
        encoded, heatmaps, has_pose, category, attributes, paths = _read_resident(collection.rows, max_items)
    if not paths:
        raise ShardFormatError(f"{folder}: split {split!r} holds no items")
    images = torch.empty((len(paths), 3, image_size, image_size), dtype=torch.uint8, device=device)
    for first in range(0, len(paths), chunk):
        decoded = _decode(encoded[first:first + chunk], paths[first:first + chunk], decode_device)
        for offset, image in enumerate(decoded):
            images[first + offset] = TF.resize(image, [image_size, image_size], antialias=True).to(device)
    resident = ResidentSplit(
        images=images,
        heatmaps=torch.from_numpy(np.concatenate(heatmaps)).unsqueeze(1).to(device),
        has_pose=torch.from_numpy(np.concatenate(has_pose).astype(bool)).to(device),
        category=torch.from_numpy(np.concatenate(category).astype(np.int64)),
        attributes=torch.from_numpy(np.concatenate(attributes).astype(np.float32)),
        paths=paths, vocabulary=vocabulary, decode_seconds=0.0, decode_device=str(decode_device))
    synchronize(device)
    resident.decode_seconds = time.perf_counter() - started
    return resident


def _read_resident(rows_by_shard: dict, max_items: int | None) -> tuple[list, list, list, list, list, list]:
    """Encoded images, heatmaps, has_pose, category, attributes and paths of these rows, in order."""
    encoded, heatmaps, has_pose, category, attributes, paths = [], [], [], [], [], []
    for shard_path, rows in rows_by_shard.items():
        if max_items is not None and len(paths) >= max_items:
            break
        if max_items is not None:
            rows = rows[:max_items - len(paths)]
        with Shard(shard_path) as shard:
            data = shard.read(("image_offsets", "image_bytes", "heatmap", "has_pose", "category", "attributes", "path"))
        offsets, blob = data["image_offsets"], data["image_bytes"]
        for row in rows:
            encoded.append(torch.from_numpy(blob[offsets[row]:offsets[row + 1]].copy()))
        heatmaps.append(data["heatmap"][rows])
        has_pose.append(data["has_pose"][rows])
        category.append(data["category"][rows])
        attributes.append(data["attributes"][rows])
        paths += data["path"][rows].tolist()
    return encoded, heatmaps, has_pose, category, attributes, paths


def _decode(encoded: list[torch.Tensor], paths: list[str], device: torch.device) -> list[torch.Tensor]:
    try:
        return decode_jpegs(encoded, device)
    except RuntimeError as error:
        raise ShardFormatError(f"one of {paths[0]} … {paths[-1]}: stored image cannot be decoded ({error})") from None


# --- batched augmentation ----------------------------------------------------------------------

def _flipped(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    flip = ((params[:, 0] > 0) & (params[:, 1] > 0)).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's `_blend` with one ratio per item: x·r + other·(1 − r), clamped to [0, 1]."""
    ratio = ratio.view(-1, 1, 1, 1)
    return (x * ratio + other * (1 - ratio)).clamp_(0, 1)


def augment_batch(images: torch.Tensor, params: torch.Tensor, image_size: int) -> torch.Tensor:
    """(B, 3, H, W) uint8 + augmentation rows (B, 9) → (B, 3, S, S) normalised: for each item what
    `data.augmented_image(image, row, S)` gives, in a handful of batched kernels. Nothing here
    reads a value back from the device or copies one to it when `params` is already there (either
    would wait for the queue of kernels at every batch): items that are not augmented go through
    roi_align too, with the whole picture as the box, which at S×S samples every pixel exactly at
    its centre (an identity)."""
    params = params.to(images.device, torch.float32)
    x = _flipped(images.float().div_(255), params)
    height, width = x.shape[-2:]
    x = roi_align(x, crop_boxes(params, width, height), (image_size, image_size), aligned=True)
    brightness, contrast, saturation = params[:, 6], params[:, 7], params[:, 8]
    x = (x * brightness.view(-1, 1, 1, 1)).clamp_(0, 1)
    x = _blend(x, TF.rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True), contrast)
    x = _blend(x, TF.rgb_to_grayscale(x), saturation)
    return normalize(x)


def heatmap_batch(heatmaps: torch.Tensor, params: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, 1, h, w) uint8 stored heatmaps → (B, 1, grid, grid) float in [0, 1], flipped and cropped
    as their images (`data.heatmap_target`, batched; an identity box as in `augment_batch`)."""
    params = params.to(heatmaps.device, torch.float32)
    x = _flipped(heatmaps.float().div_(255), params)
    height, width = x.shape[-2:]
    return roi_align(x, crop_boxes(params, width, height), (grid, grid), aligned=True).clamp_(0, 1)


# --- batches -----------------------------------------------------------------------------------

class ResidentBatches:
    """Batch dicts over a `ResidentSplit`, in the form `train.train_one_epoch` and `train.evaluate`
    take from a DataLoader over `ShardStream`: "image" (B, 3, S, S) normalised and "heatmap"
    (B, 1, S/4, S/4), "has_pose", "category" and "attributes" (on the device for training, on the
    CPU for evaluation, which collects them there), "augmentation" (CPU) and "path".

    `train=True`: a fresh permutation each epoch (seed, epoch), the last partial batch dropped,
    augmentation drawn per item with `data.draw_augmentation`; `train=False`: stored order, every
    item, no augmentation. An epoch's order and parameters go to the device in one copy each, so a
    batch costs no transfer and no synchronisation. `set_epoch` as on ShardStream; `dataset` and
    `len()` are what `train_one_epoch` reads for its progress bar."""

    def __init__(self, split: ResidentSplit, *, image_size: int, batch_size: int, train: bool,
                 augment: dict | None = None, seed: int = 0):
        if train and len(split) < batch_size:
            raise ValueError(f"{len(split)} items, fewer than one training batch of {batch_size}")
        self.split, self.image_size, self.grid = split, image_size, image_size // 4
        self.batch_size, self.train = batch_size, train
        self.augment = augment if train else None
        self.seed, self.epoch = seed, 0
        labels_device = split.images.device if train else torch.device("cpu")
        self.category, self.attributes = split.category.to(labels_device), split.attributes.to(labels_device)

    @property
    def dataset(self) -> "ResidentBatches":
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def epoch_plan(self) -> tuple[np.ndarray, np.ndarray]:
        """(item order, augmentation rows) of the current epoch, as numpy arrays."""
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch])
            order = rng.permutation(len(self.split))[:len(self) * self.batch_size]
        else:
            rng, order = None, np.arange(len(self.split))
        return order, np.stack([draw_augmentation(rng, self.augment) for _ in order])

    def __iter__(self):
        order, params = self.epoch_plan()
        device = self.split.images.device
        order_device = torch.from_numpy(order).to(device)
        params_cpu = torch.from_numpy(params)
        params_device = params_cpu.to(device)
        labels_index = order_device if self.train else torch.from_numpy(order)
        for b in range(len(self)):
            part = slice(b * self.batch_size, (b + 1) * self.batch_size)
            index = order_device[part]
            batch = {
                "image": augment_batch(self.split.images[index], params_device[part], self.image_size),
                "heatmap": heatmap_batch(self.split.heatmaps[index], params_device[part], self.grid),
                "has_pose": self.split.has_pose[index],
                "category": self.category[labels_index[part]],
                "attributes": self.attributes[labels_index[part]],
                "augmentation": params_cpu[part],
                "path": [self.split.paths[i] for i in order[part]],
            }
            for key, maps in self.split.extra_maps.items():
                batch[key] = heatmap_batch(maps[index], params_device[part], self.grid)
            for key, values in self.split.extra_items.items():
                batch[key] = values[index]
            yield batch


class AttentionRecorder(torch.nn.Module):
    """Wraps a model for `train.evaluate` and keeps every Ŝ it outputs (float, on the device), so
    that Ŝ can be compared with S item by item afterwards."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.maps: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> dict:
        outputs = self.model(images)
        if outputs.get("attention") is not None:
            self.maps.append(outputs["attention"].float())
        return outputs

    def attention(self) -> torch.Tensor | None:
        return torch.cat(self.maps) if self.maps else None


def attention_agreement(predicted: torch.Tensor, target: torch.Tensor, has_pose: torch.Tensor) -> dict:
    """How well Ŝ matches S over the items with a pose: the Pearson correlation of the two maps per
    image (mean, median; images where either map is constant have none and are counted), and the
    mean squared error over all their pixels (what `train.evaluate` reports as attention_mse)."""
    pose = has_pose.to(predicted.device).bool()
    a = predicted[pose].flatten(1).double()
    b = target.to(predicted.device)[pose].flatten(1).double()
    if len(a) == 0:
        return {"n_items": 0, "pearson_mean": None, "pearson_median": None, "mse": None, "n_constant": 0}
    a_centered, b_centered = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    norms = a_centered.norm(dim=1) * b_centered.norm(dim=1)
    defined = norms > 0
    pearson = (a_centered * b_centered).sum(1)[defined] / norms[defined]
    return {"n_items": int(len(a)),
            "pearson_mean": float(pearson.mean()) if len(pearson) else None,
            "pearson_median": float(pearson.median()) if len(pearson) else None,
            "mse": float((a - b).pow(2).mean()),
            "n_constant": int((~defined).sum())}
