"""Streaming image + heatmap batches out of a shard collection (the output of `vsam prep-pose`).

`ShardStream` is an IterableDataset that yields whole batches (use it with `DataLoader(batch_size=None)`):

* the live rows of one split come from the collection's index (SQLite) in the parent process; the
  HDF5 shards are opened lazily inside each worker, once per worker, never in the parent;
* each epoch, the shard order and the rows within each shard are shuffled (seed, epoch), the
  resulting list is cut into one contiguous part per DDP rank with the same number of whole
  batches on every rank (the remainder is left out, a different one each epoch), each part into
  one contiguous run of batches per worker, and each worker mixes its items in a shuffle buffer;
* JPEGs are decoded on the CPU workers, or handed over as bytes (`decode="gpu"`) for
  `decode_on_device`, which decodes a batch with nvjpeg;
* with probability `augment["p"]` (the paper's 0.33) an item is augmented: a horizontal flip and a
  random resized crop applied identically to image and heatmap, colour jitter on the image only;
* with `heatmap_joints` or `heatmap_sigma` (config data.heatmap_joints / heatmap_sigma), the attention
  target is rendered from the item's stored keypoints instead of read: an item whose category type
  has a joint subset in the collection keeps that subset, the others get `heatmap_joints`;
* for the attribute-group attention model (`group_joints`), one heatmap per group is rendered from
  the item's stored keypoints (at the collection's heatmap size and sigma, or `heatmap_sigma`) and then flipped and
  cropped exactly as the stored heatmap: the map is flipped, never the keypoints.

Everything random is drawn from generators seeded by (seed, epoch, rank, worker), so an epoch's
batches do not depend on the process that produces them: a resumed run sees the same data.
"""
from __future__ import annotations

import json
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.ops import roi_align

from pose_prep.heatmaps import DEFAULT_GROUP, DEFAULT_SIGMA, DEFAULT_SIZE, from_uint8, render, to_uint8
from pose_prep.shard_format import Shard, ShardFormatError, Vocabulary, collection_metadata, index_path, snapshot

from .groups import render_group_heatmaps, resolve_joints

MEAN = (0.485, 0.456, 0.406)   # ImageNet statistics, as torchvision's pretrained weights expect
STD = (0.229, 0.224, 0.225)
# Per-item augmentation parameters travel as one row: applied, flip, crop box x0 y0 x1 y1 (fractions
# of the image), brightness, contrast and saturation factors. (No hue shift: it costs more than all
# the rest together, and colours are attributes to learn.)
_NO_AUGMENT = (0, 0, 0, 0, 1, 1, 1, 1, 1)


# --- pixels: shared by training, evaluation and inference --------------------------------------

def preprocess(rgb: np.ndarray, image_size: int) -> torch.Tensor:
    """(H, W, 3) uint8 RGB → (3, S, S) float32: stretched to S×S (antialiased bilinear), then
    normalised with ImageNet's MEAN and STD. Training and inference both go through this."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {rgb.shape} {rgb.dtype}")
    if not (rgb.flags.writeable and rgb.flags.c_contiguous):   # e.g. a view of a PIL image
        rgb = np.array(rgb, order="C")
    return preprocess_tensor(torch.from_numpy(rgb).permute(2, 0, 1), image_size)


def preprocess_tensor(image: torch.Tensor, image_size: int) -> torch.Tensor:
    """`preprocess` for a (3, H, W) uint8 tensor on any device."""
    resized = TF.resize(image, [image_size, image_size], antialias=True)
    return normalize(resized.float().div_(255))


def normalize(image: torch.Tensor) -> torch.Tensor:
    """(…, 3, H, W) float in [0, 1] → ImageNet-normalised."""
    mean, std = _mean_std(image.device)
    return (image - mean) / std


@lru_cache(maxsize=None)
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """MEAN and STD as (3, 1, 1) tensors on `device`, made once: made per call with
    torch.tensor(..., device=cuda), they would be a blocking copy, which waits for every queued kernel."""
    with torch.inference_mode(False):   # also usable with autograd when first made under inference mode
        return torch.tensor(MEAN, device=device).view(3, 1, 1), torch.tensor(STD, device=device).view(3, 1, 1)


def crop_boxes(params: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """roi_align boxes (B, 5), in pixels of a width × height picture, for augmentation rows (B, 9);
    the whole picture where a row is not augmented. Computed on the rows' device, for the same
    reason as `_mean_std`."""
    applied = params[:, 0] > 0
    x0, y0, x1, y1 = (torch.where(applied, params[:, 2 + i], float(i >= 2)) for i in range(4))
    index = torch.arange(len(params), dtype=params.dtype, device=params.device)
    return torch.stack([index, x0 * width, y0 * height, x1 * width, y1 * height], dim=1)


def augmented_image(image: torch.Tensor, params: torch.Tensor, image_size: int) -> torch.Tensor:
    """A (3, H, W) uint8 image → (3, S, S) normalised, with the augmentation row `params` applied
    (on whatever device the image is). A row that says "not augmented" gives `preprocess_tensor`."""
    applied, flip, *_, brightness, contrast, saturation = params.tolist()
    if not applied:
        return preprocess_tensor(image, image_size)
    x = image.float().div_(255)
    if flip:
        x = x.flip(-1)
    height, width = x.shape[-2:]
    # The row goes to the device without waiting (a batch's rows are pinned by the loader).
    box = crop_boxes(params[None].to(x.device, torch.float32, non_blocking=True), width, height)
    x = roi_align(x[None], box, (image_size, image_size), aligned=True)[0]
    x = TF.adjust_brightness(x, brightness)
    x = TF.adjust_contrast(x, contrast)
    x = TF.adjust_saturation(x, saturation).clamp_(0, 1)
    return normalize(x)


def heatmap_target(heatmap: np.ndarray, params: np.ndarray, grid: int) -> torch.Tensor:
    """A stored (h, w) uint8 heatmap → (1, grid, grid) float in [0, 1], flipped and cropped exactly
    as its image (the crop box is in fractions of the picture, which the heatmap covers whole).
    roi_align averages several samples per output cell, so shrinking does not miss thin limbs."""
    return _follow_augmentation(torch.from_numpy(from_uint8(heatmap))[None], params, grid)


def group_heatmap_targets(maps: np.ndarray, params: np.ndarray, grid: int) -> torch.Tensor:
    """Rendered group heatmaps (G, h, w) float in [0, 1] → (G, grid, grid), flipped and cropped
    exactly as the item's image and stored heatmap (`heatmap_target`)."""
    return _follow_augmentation(torch.from_numpy(np.ascontiguousarray(maps, np.float32)), params, grid)


def _follow_augmentation(x: torch.Tensor, params: np.ndarray, grid: int) -> torch.Tensor:
    """(C, h, w) maps covering the whole picture → (C, grid, grid) under an augmentation row."""
    applied, flip, x0, y0, x1, y1 = params[:6]
    if not applied:
        x0, y0, x1, y1 = 0.0, 0.0, 1.0, 1.0
    elif flip:
        x = x.flip(-1)
    height, width = x.shape[-2:]
    if (x0, y0, x1, y1) == (0.0, 0.0, 1.0, 1.0) and (height, width) == (grid, grid):
        return x
    box = torch.tensor([[0, x0 * width, y0 * height, x1 * width, y1 * height]], dtype=torch.float32)
    return roi_align(x[None], box, (grid, grid), aligned=True)[0].clamp_(0, 1)


def draw_augmentation(rng: np.random.Generator, augment: dict | None) -> np.ndarray:
    """One item's augmentation row (see _NO_AUGMENT); "not augmented" with probability 1 - p."""
    if not augment or rng.random() >= augment["p"]:
        return np.array(_NO_AUGMENT, np.float32)
    flip = float(rng.random() < augment["flip"])
    area = rng.uniform(*augment["crop_scale"])
    ratio = math.exp(rng.uniform(math.log(augment["crop_ratio"][0]), math.log(augment["crop_ratio"][1])))
    crop_w, crop_h = min(1.0, math.sqrt(area * ratio)), min(1.0, math.sqrt(area / ratio))
    x0, y0 = rng.uniform(0, 1 - crop_w), rng.uniform(0, 1 - crop_h)
    j = augment["jitter"]
    factors = rng.uniform(1 - j, 1 + j, size=3) if j else np.ones(3)
    return np.array([1, flip, x0, y0, x0 + crop_w, y0 + crop_h, *factors], np.float32)


def decode_on_device(batch: dict, image_size: int, device: torch.device | str) -> torch.Tensor:
    """Images of a batch produced with decode="gpu": nvjpeg-decodes its "encoded" JPEG bytes on
    `device` and augments them there; returns (B, 3, S, S) normalised on `device`."""
    images = decode_jpegs(batch["encoded"], device)
    params = batch["augmentation"]
    return torch.stack([augmented_image(image, params[i], image_size) for i, image in enumerate(images)])


def decode_jpegs(encoded: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """JPEG bytes (1-D uint8 CPU tensors) → (3, H, W) uint8 RGB images on `device`, nvjpeg on CUDA.
    There the caller's stream is drained first: torchvision's decoder allocates its outputs on that
    stream but writes them from a stream of its own that does not wait for it, so it could overwrite
    a block just recycled from a tensor that queued kernels still read (pytorch/vision#9606)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    with _quiet_codecs():
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


@contextmanager
def _quiet_codecs():
    """torchvision 0.29 deprecates its image codecs for TorchCodec's, warning at every call; they are
    still the ones that decode batches with nvjpeg, and a GPU machine's older torchvision is silent."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


# --- the collection ----------------------------------------------------------------------------

@dataclass
class CollectionInfo:
    vocabulary: Vocabulary
    heatmap: dict            # size, sigma, joint groups, as prep-pose recorded them
    image_encoding: dict     # {"format": "jpeg", ...}


def read_collection(folder: str | Path, meta: dict[str, str] | None = None) -> CollectionInfo:
    """Label vocabulary and parameters of a collection, from its index (never opens a shard), or
    from `meta` when given (a snapshot's)."""
    meta = collection_metadata(folder) if meta is None else meta
    if "vocabulary" not in meta:
        raise ShardFormatError(f"{folder}: the index records no label vocabulary (was it written by vsam prep-pose?)")
    index = index_path(folder)
    parsed = {}
    for key, default in (("heatmap", "{}"), ("image_encoding", '{"format": "jpeg"}')):
        try:
            parsed[key] = json.loads(meta.get(key) or default)
        except ValueError:
            parsed[key] = None
        if not isinstance(parsed[key], dict):     # rows match their checksums: a faulty writer's value
            raise ShardFormatError(f"{index}: meta {key} is not a JSON object: {meta[key][:80]!r}")
    return CollectionInfo(Vocabulary.parse(meta["vocabulary"], index), parsed["heatmap"], parsed["image_encoding"])


def heatmap_geometry(info: CollectionInfo, sigma: float | None = None) -> tuple[tuple[int, int], float]:
    """((H, W), sigma) of the collection's stored heatmaps, or `sigma` (data.heatmap_sigma) when set:
    every heatmap rendered from the keypoints (single target, group maps) is rendered alike."""
    size = info.heatmap.get("size", DEFAULT_SIZE)
    sigma = sigma if sigma is not None else info.heatmap.get("sigma", DEFAULT_SIGMA)
    return ((size, size) if isinstance(size, int) else tuple(size)), float(sigma)


def split_group_heatmaps(folder: str | Path, split: str, group_joints: list[tuple[int, ...] | None],
                         max_items: int | None = None,
                         sigma: float | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every live item of `split` (stored order: the order of `live_rows`, cut at `max_items`, as
    `fast.load_resident_split` reads them): its group heatmaps rendered from the stored keypoints
    as uint8 (N, G, H, W) (255 = 1.0, like the stored heatmaps), "group_has_pose" (N, G) bool and
    the paths; `sigma` (data.heatmap_sigma) replaces the stored σ. For splits held in memory; ShardStream
    renders per batch instead."""
    with snapshot(folder, (split,)) as collection:
        return _group_heatmaps(collection, group_joints, max_items, sigma)


def _group_heatmaps(collection, group_joints: list[tuple[int, ...] | None],
                    max_items: int | None, sigma: float | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    info = read_collection(collection.folder, collection.meta)
    size, sigma = heatmap_geometry(info, sigma)
    maps, lit, paths = [], [], []
    for shard_path, rows in collection.rows.items():
        if max_items is not None:
            rows = rows[:max(0, max_items - len(paths))]
        if len(rows) == 0:
            continue
        with Shard(shard_path) as shard:
            data = shard.read(("keypoints", "width", "height", "has_pose", "path"))
        for row in rows:
            rendered = render_group_heatmaps(data["keypoints"][row], int(data["width"][row]), int(data["height"][row]),
                                             group_joints, size, sigma)
            maps.append(to_uint8(rendered))
            lit.append(rendered.reshape(len(rendered), -1).max(axis=1) > 0 if data["has_pose"][row]
                       else np.zeros(len(rendered), bool))
            paths.append(data["path"][row])
    if not paths:
        return np.zeros((0, len(group_joints), *size), np.uint8), np.zeros((0, len(group_joints)), bool), []
    return np.stack(maps), np.stack(lit), paths


class ShardStream(IterableDataset):
    """Batches of one split of a shard collection; see the module docstring.

    Each batch is a dict: "image" (B, 3, S, S) float normalised (absent with decode="gpu", which
    gives "encoded": B uint8 tensors of JPEG bytes), "augmentation" (B, 9) float, "heatmap"
    (B, 1, S/4, S/4) float in [0, 1], "has_pose" (B,) bool, "category" (B,) int64 (-1 unknown),
    "attributes" (B, A) float (1, 0, -1 unknown), "path" (list of B relative source paths).
    With `group_joints` (one COCO-18 joint tuple per attribute group, None for a group without a
    heatmap; see vsam_train.groups) also "group_heatmap" (B, G, S/4, S/4) float in [0, 1] and
    "group_has_pose" (B, G) bool: the item has a pose and the group's joints light its heatmap.

    `train=True` shuffles, augments and drops the remainder so that every rank gets the same
    number of full batches; `train=False` keeps the stored order and every item (last batch may
    be short), and is meant for one process (evaluation runs on rank 0).
    """

    def __init__(self, folder: str | Path, split: str | None, *, image_size: int, batch_size: int, train: bool,
                 augment: dict | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = 256, decode: str = "cpu", max_batches: int | None = None,
                 group_joints: list[tuple[int, ...] | None] | None = None,
                 heatmap_joints: str | list | None = None, heatmap_sigma: float | None = None):
        if decode not in ("cpu", "gpu"):
            raise ValueError(f"decode must be 'cpu' or 'gpu', not {decode!r}")
        self.folder = Path(folder)
        self.split = split
        # The collection as it is now, leased for this stream's life: a prep-pose run that starts later
        # (relabel, reprocess, compaction) changes nothing this stream reads, in any epoch.
        self.snapshot = snapshot(folder, (split,) if split else None)
        self.info = read_collection(folder, self.snapshot.meta)
        if decode == "gpu" and self.info.image_encoding.get("format", "jpeg") != "jpeg":
            raise ValueError(f"{folder}: images are {self.info.image_encoding.get('format')}, GPU decoding needs JPEG")
        self.shards = list(self.snapshot.rows.items())
        self.n_items = sum(len(rows) for _, rows in self.shards)
        self.image_size, self.grid = image_size, image_size // 4
        self.batch_size, self.train = batch_size, train
        self.augment = augment if train else None
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.decode = decode
        self.max_batches = max_batches
        self.group_joints = list(group_joints) if group_joints is not None else None
        # data.heatmap_sigma widens every target this stream renders: the group maps as well as the single one
        self.heatmap_size, self.heatmap_sigma = heatmap_geometry(self.info, heatmap_sigma)
        self.target = _TargetRendering.of(self.info, heatmap_joints, heatmap_sigma)
        self.epoch = 0
        if train and self.n_items < batch_size * world_size:
            raise ValueError(f"{folder}: split {split!r} has {self.n_items} items, fewer than one batch of "
                             f"{batch_size} for each of {world_size} processes")

    @property
    def vocabulary(self) -> Vocabulary:
        return self.info.vocabulary

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def close(self) -> None:
        """Let go of the snapshot's lease now (else: when the stream is collected or the process ends)."""
        self.snapshot.close()

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        if self.train:
            n = self.n_items // (self.batch_size * self.world_size)
        else:
            n = math.ceil(self.n_items / self.batch_size)
        return min(n, self.max_batches) if self.max_batches is not None else n

    def rank_items(self, epoch: int | None = None) -> list[tuple[Path, int]]:
        """(shard, row) pairs of this rank for an epoch, before the per-worker shuffle buffer."""
        epoch = self.epoch if epoch is None else epoch
        if not self.train:
            return [(path, int(row)) for path, rows in self.shards for row in rows][: len(self) * self.batch_size]
        rng = np.random.default_rng([self.seed, epoch])
        ordered = []
        for index in rng.permutation(len(self.shards)):
            path, rows = self.shards[index]
            ordered += [(path, int(row)) for row in rng.permutation(rows)]
        per_rank = len(self) * self.batch_size
        return ordered[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __iter__(self):
        worker = get_worker_info()
        worker_id, n_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        items = self.rank_items()
        n_batches = math.ceil(len(items) / self.batch_size)
        first, last = (n_batches * worker_id // n_workers, n_batches * (worker_id + 1) // n_workers)
        items = items[first * self.batch_size:last * self.batch_size]
        order_rng, augment_rng = (np.random.default_rng(s) for s in
                                  np.random.SeedSequence([self.seed, self.epoch, self.rank, worker_id]).spawn(2))
        reader = _Reader(self.vocabulary, with_keypoints=self.group_joints is not None or self.target is not None)
        try:
            batch = []
            for record in _shuffled(map(reader.record, items), self.shuffle_buffer, order_rng):
                batch.append(record)
                if len(batch) == self.batch_size:
                    yield self._collate(batch, augment_rng)
                    batch = []
            if batch:
                yield self._collate(batch, augment_rng)
        except ShardFormatError as error:
            raise LoaderError(str(error)) from None
        finally:
            reader.close()

    def _collate(self, records: list[dict], rng: np.random.Generator) -> dict:
        params = np.stack([draw_augmentation(rng, self.augment) for _ in records])
        batch = {
            "augmentation": torch.from_numpy(params),
            "heatmap": torch.stack([heatmap_target(self.target(r) if self.target else r["heatmap"], p, self.grid)
                                    for r, p in zip(records, params)]),
            "has_pose": torch.tensor([r["has_pose"] for r in records], dtype=torch.bool),
            "category": torch.tensor([r["category"] for r in records], dtype=torch.int64),
            "attributes": torch.from_numpy(np.stack([r["attributes"] for r in records]).astype(np.float32)),
            "path": [r["path"] for r in records],
        }
        if self.group_joints is not None:
            self._add_group_heatmaps(batch, records, params)
        encoded = [torch.frombuffer(bytearray(r["image"]), dtype=torch.uint8) for r in records]
        if self.decode == "gpu":
            batch["encoded"] = encoded
        else:
            batch["image"] = torch.stack([
                augmented_image(_decode_item(data, r["path"]), batch["augmentation"][i], self.image_size)
                for i, (data, r) in enumerate(zip(encoded, records))])
        return batch


    def _add_group_heatmaps(self, batch: dict, records: list[dict], params: np.ndarray) -> None:
        maps = [render_group_heatmaps(r["keypoints"], r["width"], r["height"], self.group_joints,
                                      self.heatmap_size, self.heatmap_sigma) for r in records]
        lit = torch.from_numpy(np.stack([m.reshape(len(m), -1).max(axis=1) > 0 for m in maps]))
        batch["group_has_pose"] = lit & batch["has_pose"][:, None]
        batch["group_heatmap"] = torch.stack([group_heatmap_targets(m, p, self.grid) for m, p in zip(maps, params)])


@dataclass(frozen=True)
class _TargetRendering:
    """The attention target rendered from stored keypoints: the joints per category type recorded
    by prep-pose, `default` joints for every other item, σ in heatmap pixels, at the stored size."""
    by_category: tuple[tuple[int, ...] | None, ...]    # per category index; None: `default`
    default: tuple[int, ...]
    size: tuple[int, int]
    sigma: float

    @classmethod
    def of(cls, info: CollectionInfo, joints, sigma: float | None) -> "_TargetRendering | None":
        if joints is None and sigma is None:
            return None
        subsets = info.heatmap.get("joint_groups", {})
        type_group = info.heatmap.get("category_type_group", {})
        default = resolve_joints(joints, "data.heatmap_joints") if joints is not None else \
            tuple(subsets.get(info.heatmap.get("default_group", DEFAULT_GROUP), range(18)))
        by_category = tuple(tuple(subsets[type_group[str(t)]]) if str(t) in type_group else None
                            for t in info.vocabulary.category_types)
        return cls(by_category, default or (), *heatmap_geometry(info, sigma))

    def __call__(self, record: dict) -> np.ndarray:
        category = record["category"]
        joints = self.by_category[category] if 0 <= category < len(self.by_category) else None
        return to_uint8(render(record["keypoints"], (record["width"], record["height"]), self.size, self.sigma,
                               joints=joints or self.default))


class LoaderError(ShardFormatError):
    """A damaged or unusable shard met while producing batches. torch re-raises an error of a loader
    worker process in the parent as TYPE("Caught TYPE in DataLoader worker process N.\nOriginal
    Traceback ...\nTYPE: message"); this type keeps the message alone, so that the command prints
    one line naming the file (and row), not the worker's traceback."""

    def __init__(self, message: str):
        if "\nOriginal Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


def _decode_item(data: torch.Tensor, path: str) -> torch.Tensor:
    try:
        with _quiet_codecs():
            return decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError as error:
        raise ShardFormatError(f"{path}: stored image cannot be decoded ({error})") from None


class _Reader:
    """Per-worker access to the shards: each file opened once, its small per-item datasets read
    whole on first use (one read per dataset), image bytes read per item.

    The value checks are per shard, vectorised, never per item: `Shard.read` checks each dataset's
    checksum and its labels against the shard's vocabulary, and the reader that this vocabulary is
    the collection's (the one the model's heads are sized by)."""

    _COLUMNS = ("image_offsets", "heatmap", "has_pose", "category", "attributes", "path")
    _POSE_COLUMNS = ("keypoints", "width", "height")

    def __init__(self, vocabulary: Vocabulary, with_keypoints: bool = False):
        self.vocabulary = vocabulary
        self.shards: dict[Path, tuple[Shard, dict]] = {}
        self.columns = self._COLUMNS + (self._POSE_COLUMNS if with_keypoints else ())

    def record(self, item: tuple[Path, int]) -> dict:
        path, row = item
        if path not in self.shards:
            shard = Shard(path)
            try:
                if shard.vocabulary != self.vocabulary:
                    raise ShardFormatError(f"{path}: written with another label vocabulary than the collection's: "
                                           "the collection was being relabelled when this reader started (rerun "
                                           "once that prep-pose run has ended), or such a run was interrupted "
                                           "(rerun prep-pose)")
                self.shards[path] = (shard, shard.read(self.columns))
            except BaseException:
                shard.close()
                raise
        shard, data = self.shards[path]
        record = {"image": shard.image(row, data["image_offsets"]), "heatmap": data["heatmap"][row],
                  "has_pose": bool(data["has_pose"][row]), "category": int(data["category"][row]),
                  "attributes": data["attributes"][row], "path": data["path"][row]}
        if "keypoints" in data:
            record.update(keypoints=data["keypoints"][row], width=int(data["width"][row]),
                          height=int(data["height"][row]))
        return record

    def close(self) -> None:
        for shard, _ in self.shards.values():
            shard.close()
        self.shards.clear()


def _shuffled(records, buffer_size: int, rng: np.random.Generator):
    """A shuffle buffer: keeps up to `buffer_size` records and emits a random one per new one."""
    if buffer_size <= 1:
        yield from records
        return
    buffer = []
    for record in records:
        buffer.append(record)
        if len(buffer) >= buffer_size:
            index = int(rng.integers(len(buffer)))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            yield buffer.pop()
    while buffer:
        index = int(rng.integers(len(buffer)))
        buffer[index], buffer[-1] = buffer[-1], buffer[index]
        yield buffer.pop()


def make_loader(stream: ShardStream, num_workers: int, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over a ShardStream (which batches by itself). Workers are forked per epoch, so
    each opens its shards afresh; the parent never opens one. A worker ends within half a second
    of its parent's death, kill -9 included (pose_prep.workers; torch's own check waits up to 5 s)."""
    from pose_prep.workers import loader_worker_init

    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                       prefetch_factor=4 if num_workers else None,
                                       worker_init_fn=loader_worker_init() if num_workers else None)
