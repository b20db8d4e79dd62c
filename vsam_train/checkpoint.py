"""Checkpoints: written atomically, read with `torch.load(weights_only=True)`.

A checkpoint is a dict of tensors and plain values only (dicts, lists, tuples, str, numbers, None),
so the safe loader can read it: "model" (state_dict), "optimizer", "scheduler", "epoch" (epochs
completed), "step" (optimizer steps done), "rng" (torch, CUDA, numpy, python states), "config"
(the resolved config dict), "vocabulary" (JSON text of pose_prep.shard_format.Vocabulary),
"model_name", "image_size", "heatmap" (the collection's heatmap parameters as JSON text), "world_size"
(the processes that trained it: a resume must have as many), "val_metrics" (the val_* figures of the
epoch it closes, {name: float}; absent in checkpoints written before they were kept).
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from pose_prep.atomic import atomic_path
from pose_prep.shard_format import Vocabulary

from .errors import CheckpointError  # noqa: F401 - raised here, and imported from here by callers
from .inference import ModelInfo, stored_figures, usable_image_size


# What `load_for_inference` takes from a checkpoint (training also writes optimizer, scheduler, rng...).
INFERENCE_KEYS = ("model", "config", "vocabulary", "model_name", "image_size", "epoch", "step")


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write `state` to `path` so that a reader (or a crash at any instant) sees either the old
    file or the complete new one: temporary file in the same folder, fsync, rename, fsync folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, durable=True) as temporary, open(temporary, "wb") as file:
        writer = _WriteErrors(file)
        try:
            torch.save(state, writer)
        except RuntimeError as error:
            if writer.error is None:
                raise
            raise writer.error from error   # a full disk: atomic_path names it (pose_prep.atomic.DiskFull)


class _WriteErrors:
    """A file for torch.save that keeps the OSError of a failed write. torch turns it into a
    RuntimeError ('[enforce fail at inline_container.cc] unexpected pos') that names neither the
    file nor the cause; written through a file object, the checkpoint is the same and as fast."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """The checkpoint's dict. `mmap`: tensors stay in the file (memory-mapped, read on first touch), so
    what is never used, as the optimizer state for inference, is never read into memory."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    if not _zip_archive(path):
        mmap = False        # a legacy torch.save file: torch can read it, but not memory-mapped
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as error:  # unpickling errors, truncated zip archives, foreign files
        raise CheckpointError(f"{path}: not a readable vsam checkpoint ({error})") from None
    if not isinstance(state, dict):     # e.g. torch.save(tensor) or a bare state_dict's list
        raise CheckpointError(f"{path}: not a vsam checkpoint (holds a {type(state).__name__}, not a dict)")
    return state


# How torch.save's files begin: a zip archive (torch >= 1.6), or a pickle (the legacy format).
_ZIP_MAGIC, _PICKLE_PROTOCOL = b"PK\x03\x04", b"\x80"


def _zip_archive(path: Path) -> bool:
    """Whether `path` is torch's zip format; CheckpointError when it is no torch file at all. torch's own
    message for those (an empty file, a JSON file renamed .pt) is about mmap or a pickle load key."""
    try:
        with open(path, "rb") as file:
            head = file.read(len(_ZIP_MAGIC))
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read checkpoint ({error.strerror or error})") from None
    if not head:
        raise CheckpointError(f"{path}: not a vsam checkpoint (empty file, 0 bytes)")
    if head != _ZIP_MAGIC and not head.startswith(_PICKLE_PROTOCOL):
        raise CheckpointError(f"{path}: not a torch checkpoint (a file torch.save writes starts with a zip or pickle "
                              f"header; this one starts with {head!r})")
    return head == _ZIP_MAGIC


def rng_states() -> dict:
    """Every random generator that training draws from, in a weights_only-loadable form."""
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": numpy_state[0], "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
                  "pos": int(numpy_state[2]), "has_gauss": int(numpy_state[3]), "cached": float(numpy_state[4])},
        "python": random.getstate(),
    }


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def inference_device(device: str | torch.device | None = None) -> torch.device:
    """`device`, by default CUDA when torch sees it, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_for_inference(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelInfo]:
    """(model in eval mode on `device`, ModelInfo) from a training checkpoint: vocabulary, image size,
    config, last val figures, and `info.preprocess(rgb)`, the pixel path the model was trained with."""
    import json

    from .data import MEAN, STD
    from .models import model_from_config

    # Memory-mapped: the optimizer and scheduler state (twice the weights, for Adam) stay on disk, and
    # `assign` makes the model's tensors the mapped ones instead of copies (vsam predict: 3.7 GB → see
    # docs/inference.md).
    state = load_checkpoint(path, mmap=True)
    missing = [key for key in INFERENCE_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path}: not a vsam checkpoint (no {', '.join(missing)})")
    image_size = usable_image_size(state["image_size"], path)
    config = stored_config(path, state["config"])
    try:
        vocabulary = Vocabulary.from_json(state["vocabulary"])
        model = model_from_config({**config, "model": {**config["model"], "name": state["model_name"]}}, vocabulary)
        model.load_state_dict(state["model"], assign=True)
        info = ModelInfo(config=config, vocabulary=vocabulary, model_name=state["model_name"],
                         image_size=image_size, epoch=int(state["epoch"]), step=int(state["step"]),
                         heatmap=json.loads(state.get("heatmap") or "{}"), mean=MEAN, std=STD,
                         val_metrics=stored_figures(state.get("val_metrics")))
    except (KeyError, IndexError, AttributeError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: does not hold a usable vsam model ({type(error).__name__}: {error})") from None
    return model.to(device).eval(), info


def stored_config(path: Path, config) -> dict:
    """The checkpoint's training config, typed and checked as a config file is: eval and audit size
    their batches and losses from it (a batch size of 0 was a ZeroDivisionError there)."""
    from .config import ConfigError, validate_stored

    try:
        return validate_stored(config)
    except ConfigError as error:
        raise CheckpointError(f"{path}: its stored config is not usable ({error})") from None
