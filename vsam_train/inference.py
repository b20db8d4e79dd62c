"""A model for `vsam predict` and `vsam eval`: a training checkpoint (`--checkpoint FILE.pt`) or a file
of `vsam export --format onnx` (`--model FILE.onnx`) run by onnxruntime.

`load_model(path)` returns (model, ModelInfo) for either, as `checkpoint.load_for_inference` does:
what the model needs around it (vocabulary, image size, mean and std, the training config, the last
validation figures) and its preprocessing bound to them (`info.preprocess(rgb)`, a torch tensor;
`info.preprocess_array(rgb)`, numpy, without torch). Everything the ONNX file needs travels in its
"vsam" metadata (export.py); files exported before "config" was added there run in predict, not in eval.

The ONNX path of `vsam predict` never imports torch: importing torch alone takes 720 MB of RSS here
(its CUDA build), more than the whole ONNX path. So this module imports torch only where a torch
tensor is asked for (`OnnxModel.__call__`, for eval, and `load_model` on a checkpoint), and
`preprocess_array` is `data.preprocess` in numpy: torchvision's antialiased bilinear resize of a uint8
image as ATen computes it (int16 fixed-point weights, width then height, each pass rounded to uint8),
then /255 and the mean/std normalisation in float32. Bit-identical to `data.preprocess` (tests:
random images of many sizes, upscaling and downscaling, and real photos).
"""
from __future__ import annotations

import importlib
import json
import math
import warnings
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path

import numpy as np

from pose_prep.shard_format import Vocabulary

ONNX_SUFFIX = ".onnx"
# The outputs a model may have, in the order an export lists them (export.py writes, load_onnx checks).
OUTPUTS = ("attributes", "category", "attention")


@dataclass(frozen=True)
class ModelInfo:
    """What a trained model needs around it, and its preprocessing bound to that (as torchvision's
    weights carry `.transforms`). From `checkpoint.load_for_inference` and `load_model`.

    `val_metrics`: the val_* figures of the epoch the checkpoint closed (metrics.jsonl's names, e.g.
    "val_AP", "val_group_top1"); empty for a checkpoint without a val split or written before they
    were kept. `step` is None only for old exports."""

    config: dict | None            # the resolved training config
    vocabulary: Vocabulary
    model_name: str
    image_size: int
    epoch: int
    step: int | None
    heatmap: dict                  # the collection's heatmap parameters (may be empty)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    val_metrics: dict = field(default_factory=dict)

    def preprocess(self, rgb: np.ndarray):
        """(H, W, 3) uint8 RGB → (3, S, S) float32 torch tensor: `data.preprocess` at this image size."""
        from .data import preprocess

        return preprocess(rgb, self.image_size)

    def preprocess_array(self, rgb: np.ndarray) -> np.ndarray:
        """`preprocess` in numpy, without torch: bit-identical (see the module docstring)."""
        return preprocess_array(rgb, self.image_size, self.mean, self.std)

    def __getitem__(self, key: str):
        """info["image_size"], as when info was a dict: kept, with a DeprecationWarning, for code written then."""
        if key not in {f.name for f in fields(self)}:
            raise KeyError(key)
        warnings.warn(f'info["{key}"] is deprecated: use info.{key}', DeprecationWarning, stacklevel=2)
        return getattr(self, key)


def onnx_module(name: str):
    """`onnx` or `onnxruntime`, imported; when it cannot be, MissingExtra names the extra that brings
    both (one line, not an ImportError traceback, nor a file blamed for the package missing)."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        from .errors import MissingExtra

        raise MissingExtra(f"ONNX files need {name}, from the 'export' extra: pip install 'vsam[export]' "
                           f"({error})") from None


class OnnxModel:
    """An exported model run by onnxruntime on the CPU. `run(batch)`: numpy in, dict of numpy arrays
    out; called with a torch tensor (as `train.evaluate` calls a model), torch tensors out."""

    def __init__(self, path: str | Path, threads: int | None = None):
        onnxruntime = onnx_module("onnxruntime")
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # Idle onnxruntime threads would spin, taking the CPU from the threads decoding the next batch.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.output_names = [output.name for output in self.session.get_outputs()]

    def eval(self) -> "OnnxModel":
        return self

    def run(self, images: np.ndarray) -> dict:
        arrays = self.session.run(None, {"images": np.ascontiguousarray(images, np.float32)})
        outputs = dict.fromkeys(OUTPUTS)
        outputs.update(zip(self.output_names, arrays))
        return outputs

    def __call__(self, images):
        import torch

        outputs = self.run(images.detach().cpu().float().numpy())
        return {name: None if array is None else torch.from_numpy(array) for name, array in outputs.items()}


def is_onnx(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ONNX_SUFFIX


def load_onnx(path: str | Path, threads: int | None = None) -> tuple[OnnxModel, ModelInfo]:
    """(OnnxModel, ModelInfo) from a file of `vsam export --format onnx`; CheckpointError names what is wrong."""
    from .errors import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such ONNX file")
    onnx_module("onnxruntime")      # missing: MissingExtra, before the file is blamed below
    try:
        model = OnnxModel(path, threads)
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own types for a file it cannot load
        raise CheckpointError(f"{path}: not a readable ONNX model ({' '.join(str(error).split())[:300]})") from None
    info = _model_info(path, _vsam_metadata(path, model))
    _check_graph_shapes(path, model.session, info)
    return model, info


def _vsam_metadata(path: Path, model: OnnxModel) -> dict:
    """The file's "vsam" metadata: a JSON object whose "outputs" are the graph's."""
    from .errors import CheckpointError

    text = model.session.get_modelmeta().custom_metadata_map.get("vsam")
    if text is None:
        raise CheckpointError(f"{path}: an ONNX model without vsam metadata (not written by vsam export)")
    try:
        meta = json.loads(text)
    except ValueError as error:
        raise CheckpointError(f"{path}: its vsam metadata is not usable (not JSON: {error})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: its vsam metadata is not usable (a JSON {type(meta).__name__}, "
                              "not an object)")
    if meta.get("outputs") != model.output_names or not set(model.output_names) <= set(OUTPUTS):
        raise CheckpointError(f"{path}: outputs {model.output_names} do not match its metadata's {meta.get('outputs')}")
    return meta


def _model_info(path: Path, meta: dict) -> ModelInfo:
    from pose_prep.shard_format import ShardFormatError

    from .errors import CheckpointError

    try:
        return ModelInfo(config=meta.get("config"), vocabulary=Vocabulary.parse(json.dumps(meta["vocabulary"]), path),
                         model_name=meta["model_name"], image_size=usable_image_size(meta["image_size"], path),
                         epoch=int(meta["epoch"]), step=meta.get("step"), heatmap=meta.get("heatmap") or {},
                         mean=_channel_figures(meta["mean"], "mean"),
                         std=_channel_figures(meta["std"], "std", positive=True),
                         val_metrics=stored_figures(meta.get("val_metrics")))
    except ShardFormatError as error:
        raise CheckpointError(str(error)) from None
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: its vsam metadata is not usable ({type(error).__name__}: {error})") from None


def usable_image_size(value, path: str | Path) -> int:
    """A stored image size, when it is one that model.image_size may take (config.RANGES); else a
    CheckpointError naming `path`: 0 divides by zero in the resize, 100000 allocates terabytes."""
    from .config import RANGES
    from .errors import CheckpointError

    allowed = RANGES[("model", "image_size")]
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        raise CheckpointError(f"{path}: image_size {value!r} is not usable (an integer {allowed})")
    return value


def _channel_figures(values, name: str, positive: bool = False) -> tuple[float, float, float]:
    """mean or std: one finite number per RGB channel (std > 0: the normalisation divides by it)."""
    usable = (isinstance(values, list) and len(values) == 3
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
              and (not positive or min(values) > 0))
    if not usable:
        raise ValueError(f"{name} must be 3 finite numbers{', each > 0' if positive else ''}, got {values!r}")
    return tuple(float(v) for v in values)


def _check_graph_shapes(path: Path, session, info: ModelInfo) -> None:
    """The metadata against the shapes the graph declares (where they are numbers, not "batch"): a
    mismatch fails later inside onnxruntime (InvalidArgument), or names the scores wrongly."""
    from .errors import CheckpointError

    declared = session.get_inputs()[0].shape
    expected = [3, info.image_size, info.image_size]
    if len(declared) != 4 or any(isinstance(d, int) and d != e for d, e in zip(declared[1:], expected)):
        raise CheckpointError(f"{path}: its graph takes images of shape {declared}, not "
                              f"[batch, {', '.join(map(str, expected))}] as its metadata's image_size says")
    names = {"attributes": info.vocabulary.attributes, "category": info.vocabulary.categories}
    for output in session.get_outputs():
        if output.name not in names:
            continue
        columns = output.shape[1] if len(output.shape) == 2 else None
        if len(output.shape) != 2 or (isinstance(columns, int) and columns != len(names[output.name])):
            raise CheckpointError(f"{path}: its {output.name} output has shape {output.shape}, but its metadata's "
                                  f"vocabulary names {len(names[output.name])} {output.name}")


def stored_figures(values) -> dict:
    """{name: float} of a stored dict of figures; anything else (absent, damaged) is no figures."""
    if not isinstance(values, dict):
        return {}
    return {str(k): float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def finite_rows(*scores) -> np.ndarray:
    """Per row (image) of the score arrays (None: an output the model lacks): whether all its scores are
    finite. NaN or infinity comes from the model (NaN weights, an overflow), never from the image."""
    present = [np.asarray(array) for array in scores if array is not None]
    finite = np.ones(len(present[0]), bool)
    for array in present:
        finite &= np.isfinite(array).reshape(len(array), -1).all(axis=1)
    return finite


def load_model(path: str | Path, device: str = "cpu") -> tuple[object, ModelInfo]:
    """(model, ModelInfo) from a checkpoint, or from an ONNX export (by its .onnx suffix; CPU only)."""
    if is_onnx(path):
        if str(device) != "cpu":
            from .errors import CheckpointError

            raise CheckpointError(f"{path}: an ONNX model runs on the CPU here (onnxruntime), not on {device}")
        return load_onnx(path)
    from .checkpoint import load_for_inference

    return load_for_inference(path, device)


# --- data.preprocess without torch ---------------------------------------------------------------

def preprocess_array(rgb: np.ndarray, image_size: int, mean, std) -> np.ndarray:
    """(H, W, 3) uint8 RGB → (3, S, S) float32, as `data.preprocess` (see the module docstring)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {rgb.shape} {rgb.dtype}")
    resized = resize_antialiased(rgb, image_size)
    image = resized.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    return (image - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]


def resize_antialiased(rgb: np.ndarray, size: int) -> np.ndarray:
    """torchvision's `transforms.v2.functional.resize(uint8 image, [size, size], antialias=True)`
    (bilinear), as uint8 (H, W, 3): width first, then height, each pass rounded to uint8."""
    height, width = rgb.shape[:2]
    image = rgb
    if width != size:
        image = _resize_axis(image, size, axis=1)
    if height != size:
        image = _resize_axis(image, size, axis=0)
    return image


def _resize_axis(image: np.ndarray, size: int, axis: int) -> np.ndarray:
    """One separable pass in ATen's fixed point: Σ_j input[start + j] · weight_j with int16 weights
    scaled by 2^precision, plus half of that, shifted back and clipped to 0..255."""
    starts, weights, precision = _aa_weights(image.shape[axis], size)
    index = np.minimum(starts[:, None] + np.arange(weights.shape[1]), image.shape[axis] - 1)
    shape = [1] * image.ndim
    shape[axis] = size
    total = np.full(np.take(image, index[:, 0], axis=axis).shape, 1 << (precision - 1), np.int32)
    for j in range(weights.shape[1]):
        total += np.take(image, index[:, j], axis=axis).astype(np.int32) * weights[:, j].reshape(shape)
    return np.clip(total >> precision, 0, 255).astype(np.uint8)


@lru_cache(maxsize=64)
def _aa_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """ATen's antialiased bilinear weights for uint8 images (`_compute_index_ranges_int16_weights`): the
    triangle filter, widened by the scale when shrinking, in float64, normalised per output pixel, then
    int16 with as many fraction bits as the largest weight allows. (start per output, weights (out,
    taps), fraction bits)."""
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    inverse = 1.0 / scale if scale >= 1.0 else 1.0
    taps = int(math.ceil(support)) * 2 + 1
    starts, weights = np.zeros(out_size, np.int64), np.zeros((out_size, taps), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        start = max(int(center - support + 0.5), 0)
        count = min(max(min(int(center + support + 0.5), in_size) - start, 0), taps)
        row = np.array([max(0.0, 1.0 - abs((j + start - center + 0.5) * inverse)) for j in range(count)])
        starts[i] = start
        weights[i, :count] = row / row.sum() if count and row.sum() != 0 else row
    precision = 0
    while precision < 22 and int(0.5 + weights.max() * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    return starts, np.floor(weights * (1 << precision) + 0.5).astype(np.int32), precision
