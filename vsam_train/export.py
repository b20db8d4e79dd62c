"""`vsam export`: a checkpoint as an ONNX or TorchScript file for serving without this package.

The exported model takes what `vsam_train.data.preprocess` produces: float32 (B, 3, S, S), RGB,
stretched to S×S and normalised with ImageNet's mean and std; B may vary. It returns the model's
outputs as a tuple, in the order the metadata's "outputs" lists, out of

* "attributes": (B, A) logits (apply a sigmoid for scores),
* "category": (B, C) logits (apply a softmax), present only when the data had categories,
* "attention": (B, 1, S/4, S/4) Ŝ after its sigmoid, VSAM only.

Metadata travels inside the file, as JSON text under the key "vsam" (ONNX: a metadata_props entry,
read with `onnxruntime.InferenceSession(...).get_modelmeta().custom_metadata_map["vsam"]`;
TorchScript: the extra file "vsam.json" of `torch.jit.load(path, _extra_files=...)`): outputs,
vocabulary, image_size, mean, std, preprocess (in words), model name, epoch, step, config (the
resolved training config) and heatmap (the collection's heatmap parameters): `vsam predict` and
`vsam eval` run the file with `--model FILE.onnx` (vsam_train/inference.py).

Every export is checked before it is kept: the written file is loaded back (onnxruntime, or
torch.jit.load) and run on a probe batch; every output must agree with the checkpoint's model
within |exported − model| ≤ ATOL + RTOL · |model| (float32 throughout; the differences measured
are of the order of 1e-6). ONNX uses torch's TorchScript-based exporter (`dynamo=False`), which
needs no extra package and supports every torch this package installs with.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from pose_prep.atomic import atomic_path, is_stream, make_parent_folder

from .checkpoint import load_for_inference
from .inference import OUTPUTS, ModelInfo, onnx_module

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
ATOL, RTOL = 1e-4, 1e-4
ONNX_OPSET = 17
PROBE_BATCH = 2


class ExportError(RuntimeError):
    """An export that failed or does not reproduce the checkpoint; the message says how."""


class ExportOptionError(ValueError):
    """An --out that cannot go with the checkpoint or the format (the checkpoint itself, a suffix that
    names the other format); nothing was written. The message names the paths."""


@dataclass
class ExportResult:
    path: Path
    outputs: list[str]
    max_difference: float      # largest |exported − model| over the probe batch and every output


class ExportedOutputs(nn.Module):
    """The model with its dict of outputs flattened into a tuple of the outputs it has."""

    def __init__(self, model: nn.Module, outputs: list[str]):
        super().__init__()
        self.model, self.outputs = model, outputs

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        result = self.model(images)
        return tuple(result[name] for name in self.outputs)


def present_outputs(model: nn.Module, image_size: int) -> list[str]:
    with torch.no_grad():
        result = model(torch.zeros(1, 3, image_size, image_size))
    return [name for name in OUTPUTS if result[name] is not None]


# What `preprocess` does, for a reader without this package (metadata "preprocess").
PREPROCESS = {"color": "RGB, EXIF orientation applied", "resize": "stretched to image_size × image_size, "
              "antialiased bilinear (torchvision.transforms.functional.resize, antialias=True, on uint8)",
              "scale": "1/255", "normalize": "(x - mean) / std per channel", "layout": "float32 NCHW"}


def metadata(info: ModelInfo, outputs: list[str]) -> str:
    """The "vsam" metadata: enough to run the file (vsam predict/eval --model, or any ONNX runtime)
    without the checkpoint: outputs, vocabulary, preprocessing, and the training config and heatmap
    parameters that `vsam eval` needs for its losses."""
    return json.dumps({"outputs": outputs, "vocabulary": json.loads(info.vocabulary.to_json()),
                       "image_size": info.image_size, "mean": list(info.mean), "std": list(info.std),
                       "input": "float32 (B, 3, S, S), RGB, ImageNet-normalised", "preprocess": PREPROCESS,
                       "model_name": info.model_name, "epoch": info.epoch, "step": info.step,
                       "config": info.config, "heatmap": info.heatmap, "val_metrics": info.val_metrics},
                      sort_keys=True)


def probe_images(image_size: int, batch: int = PROBE_BATCH) -> torch.Tensor:
    """Inputs in the range of normalised photos, the same on every run."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, image_size, image_size, generator=generator)


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path | None = None) -> ExportResult:
    """Export `checkpoint` in `fmt` to `out` (default: beside it, e.g. last.onnx), checked; see the module."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    checkpoint = Path(checkpoint)
    out = Path(out) if out else checkpoint.with_name(checkpoint.stem + SUFFIXES[fmt])
    check_output_path(checkpoint, fmt, out)
    model, info = load_for_inference(checkpoint, "cpu")
    outputs = present_outputs(model, info.image_size)
    wrapped = ExportedOutputs(model, outputs).eval()
    probe = probe_images(info.image_size)
    with torch.no_grad():
        expected = [t.numpy() for t in wrapped(probe)]
    check_finite(expected, outputs, checkpoint)
    make_parent_folder(out)
    with _checked_file(out) as temporary:
        if fmt == "onnx":
            _write_onnx(wrapped, probe, outputs, metadata(info, outputs), temporary)
            exported = run_onnx(temporary, probe)
        else:
            _write_torchscript(wrapped, probe, metadata(info, outputs), temporary)
            exported = run_torchscript(temporary, probe)
        difference = check_same_outputs(exported, expected, outputs)
    return ExportResult(out, outputs, difference)


def check_output_path(checkpoint: Path, fmt: str, out: Path) -> None:
    """ExportOptionError when writing `out` would replace the checkpoint, or when its suffix says the
    other format: predict and eval take a file ending in .onnx for ONNX, and anything else for a
    checkpoint. A stream (a FIFO, /dev/stdout) has no name a later command reads, so any suffix goes."""
    if out.exists() and os.path.samefile(out, checkpoint):
        raise ExportOptionError(f"{out} is the checkpoint {checkpoint}: the export would replace it; "
                                "choose another --out")
    if is_stream(out):
        return
    says_onnx = out.name.lower().endswith(".onnx")
    if fmt == "onnx" and not says_onnx:
        raise ExportOptionError(f"{out}: an ONNX export's name must end in .onnx (predict and eval --model "
                                f"tell the format by it); the checkpoint is {checkpoint}")
    if fmt == "torchscript" and says_onnx:
        raise ExportOptionError(f"{out}: a TorchScript export must not end in .onnx (predict and eval would "
                                f"read it as ONNX); the checkpoint is {checkpoint}")


def check_finite(expected: list[np.ndarray], names: list[str], checkpoint: Path) -> None:
    """ExportError when the model's own outputs hold NaN or infinity on the probe batch: the comparison
    with the exported file would say nothing (NaN equals nothing), and the export would be of no use."""
    for name, values in zip(names, expected, strict=True):
        if not np.isfinite(values).all():
            raise ExportError(f"{checkpoint}: the model's output {name!r} is not finite (NaN or infinity) on the "
                              "probe batch; the checkpoint's weights are unusable, nothing was exported")


@contextmanager
def _checked_file(out: Path) -> Iterator[Path]:
    """A regular file to write the export to and load it back from, published at `out` when the block
    completes: atomic_path's temporary file, or, when `out` is a stream (a FIFO, /dev/stdout), a file
    in a temporary folder, copied into the stream once checked (a stream cannot be read back)."""
    if not is_stream(out):
        with atomic_path(out) as temporary:
            yield temporary
        return
    with tempfile.TemporaryDirectory(prefix="vsam-export-") as folder:
        temporary = Path(folder) / out.name
        yield temporary
        with open(temporary, "rb") as source, atomic_path(out) as stream, open(stream, "wb") as target:
            shutil.copyfileobj(source, target)


def check_same_outputs(exported: list[np.ndarray], expected: list[np.ndarray], names: list[str]) -> float:
    """Largest absolute difference; ExportError when any output is beyond the tolerance."""
    largest = 0.0
    for name, got, want in zip(names, exported, expected, strict=True):
        if got.shape != want.shape:
            raise ExportError(f"exported output {name!r} has shape {got.shape}, the model's {want.shape}")
        difference = np.abs(got.astype(np.float64) - want)
        if not (difference <= ATOL + RTOL * np.abs(want)).all():     # a NaN is never within the tolerance
            raise ExportError(f"exported output {name!r} differs from the model's by up to {difference.max():.3g} "
                              f"(tolerance {ATOL:g} + {RTOL:g}·|value|)")
        largest = max(largest, float(difference.max()))
    return largest


def _write_onnx(model: nn.Module, probe: torch.Tensor, outputs: list[str], info_json: str, path: Path) -> None:
    onnx = onnx_module("onnx")
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # "legacy exporter": chosen, see the module
        torch.onnx.export(model, (probe,), buffer, dynamo=False, input_names=["images"], output_names=outputs,
                          dynamic_axes={name: {0: "batch"} for name in ["images", *outputs]},
                          opset_version=ONNX_OPSET)
    proto = onnx.load_from_string(buffer.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = "vsam", info_json
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _write_torchscript(model: nn.Module, probe: torch.Tensor, info_json: str, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)        # torch.jit is deprecated in favour of torch.export
        traced = torch.jit.trace(model, (probe,))
        torch.jit.save(traced, str(path), _extra_files={"vsam.json": info_json})


def run_onnx(path: str | Path, images: torch.Tensor) -> list[np.ndarray]:
    onnxruntime = onnx_module("onnxruntime")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.numpy()})


def run_torchscript(path: str | Path, images: torch.Tensor) -> list[np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return [t.numpy() for t in model(images)]


def read_metadata(path: str | Path) -> dict:
    """The "vsam" metadata of an exported file (either format)."""
    path = Path(path)
    if path.suffix == ".onnx":
        onnxruntime = onnx_module("onnxruntime")
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return json.loads(session.get_modelmeta().custom_metadata_map["vsam"])
    extra = {"vsam.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra["vsam.json"])
