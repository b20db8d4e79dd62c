"""Checkpoints: written atomically, read with `torch.load(weights_only=True)`.

A checkpoint is a dict of tensors and plain values only (dicts, lists, tuples, str, numbers, None),
so the safe loader can read it: "model" (state_dict), "optimizer", "scheduler", "epoch" (epochs
completed), "step" (optimizer steps done), "rng" (torch, CUDA, numpy, python states), "config"
(the resolved config dict), "vocabulary" (JSON text of pose_prep.shard_format.Vocabulary),
"model_name", "image_size", "heatmap" (the collection's heatmap parameters as JSON text), "world_size"
(the processes that trained it: a resume must have as many).
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from pose_prep.atomic import atomic_path
from pose_prep.shard_format import Vocabulary


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or used; the message names the file."""


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write `state` to `path` so that a reader (or a crash at any instant) sees either the old
    file or the complete new one: temporary file in the same folder, fsync, rename, fsync folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, durable=True) as temporary:
        torch.save(state, temporary)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # unpickling errors, truncated zip archives, foreign files
        raise CheckpointError(f"{path}: not a readable vsam checkpoint ({error})") from None


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


def load_for_inference(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """(model in eval mode on `device`, info) from a training checkpoint.

    info: "config" (resolved config dict), "vocabulary" (Vocabulary), "model_name", "image_size",
    "epoch", "step", "heatmap" (dict: the collection's heatmap parameters, may be empty)."""
    import json

    from .models import model_from_config

    state = load_checkpoint(path)
    try:
        config, vocabulary = state["config"], Vocabulary.from_json(state["vocabulary"])
        model = model_from_config({**config, "model": {**config["model"], "name": state["model_name"]}}, vocabulary)
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: does not hold a usable vsam model ({error})") from None
    info = {"config": config, "vocabulary": vocabulary, "model_name": state["model_name"],
            "image_size": int(state["image_size"]), "epoch": int(state["epoch"]), "step": int(state["step"]),
            "heatmap": json.loads(state.get("heatmap") or "{}")}
    return model.to(device).eval(), info
