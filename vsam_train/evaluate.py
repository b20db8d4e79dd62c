"""`vsam eval`: a checkpoint's metrics on one split of a shard collection.

The per-item scores come from `train.evaluate` (the loop that validates during training), the
metrics from `metrics.compute_metrics`; this module only wires a checkpoint and a collection to
them and writes the result. In the JSON file, undefined values (NaN in `compute_metrics`) are
written as null, so that any JSON reader accepts it.
"""
from __future__ import annotations

import json
from pathlib import Path

from pose_prep.atomic import atomic_write_text, make_parent_folder

from .checkpoint import inference_device, stored_config
from .data import ShardStream, make_loader
from .inference import finite_rows, is_onnx, load_model
from .losses import VsamLoss
from .metrics import compute_metrics, without_nan  # noqa: F401 - without_nan: evaluate's name for callers
from .train import evaluate


class EvalError(RuntimeError):
    """The checkpoint and the collection cannot be evaluated together; the message says why."""


def predict_split(checkpoint: str | Path, shards: str | Path, split: str = "val", *, batch_size: int | None = None,
                  device: str | None = None, workers: int = 0) -> tuple[dict, dict]:
    """(train.evaluate's result, load_for_inference's info) for every item of `split`.

    The result holds "attribute_scores" (N, A) sigmoid probabilities, "attribute_labels",
    "category_logits", "category_labels", "paths" (in stored order), losses and "attention_mse"."""
    device = inference_device(device or ("cpu" if is_onnx(checkpoint) else None))
    model, info = load_model(checkpoint, device)     # a checkpoint, or an ONNX export (runs on the CPU)
    config = info.config
    if config is None:
        raise EvalError(f"{checkpoint}: exported without its training config (an export older than vsam eval "
                        "--model): export it again from its checkpoint")
    if is_onnx(checkpoint):     # checked here, not in load_onnx: the check imports torch, which predict never does
        config = stored_config(checkpoint, config)
    decode = "gpu" if device.type == "cuda" and config["data"]["decode"] == "gpu" else "cpu"
    stream = ShardStream(shards, split, image_size=info.image_size, train=False, decode=decode,
                         batch_size=batch_size or config["data"]["eval_batch_size"] or config["train"]["batch_size"],
                         heatmap_joints=config["data"].get("heatmap_joints"),
                         heatmap_sigma=config["data"].get("heatmap_sigma"))
    check_vocabulary(info.vocabulary, stream.vocabulary, checkpoint, shards)
    if stream.n_items == 0:
        raise EvalError(f"{shards}: split {split!r} holds no items")
    criterion = VsamLoss.from_config(config["loss"])
    loader = make_loader(stream, workers, pin_memory=device.type == "cuda")
    result = evaluate(model, criterion, loader, device, config=config)
    _check_finite(result, checkpoint, split)
    return result, info


def _check_finite(result: dict, checkpoint, split: str) -> None:
    """Scores that are not finite: said naming the model, before the metrics (or audit's calibration)
    fail on them without a name."""
    finite = finite_rows(result["attribute_scores"], result["category_logits"])
    if not finite.all():
        raise EvalError(f"{checkpoint}: the model's scores are not finite (NaN or infinite) for "
                        f"{int((~finite).sum())} of the {len(finite)} items of split {split!r}: its weights "
                        f"may be damaged")


def check_vocabulary(trained, collection, checkpoint, shards) -> None:
    """The columns of the checkpoint's outputs must mean what the collection's labels mean."""
    for field in ("attributes", "categories"):
        ours, theirs = getattr(trained, field), getattr(collection, field)
        if ours != theirs:
            raise EvalError(f"{checkpoint} was trained on {len(ours)} {field} that differ from the "
                            f"{len(theirs)} of {shards} (first difference: {_first_difference(ours, theirs)})")


def _first_difference(a: list, b: list) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"#{i} {x!r} vs {y!r}"
    return f"#{min(len(a), len(b))} present in only one of them"


def evaluate_checkpoint(checkpoint: str | Path, shards: str | Path, split: str = "val", *,
                        batch_size: int | None = None, device: str | None = None, workers: int = 0) -> dict:
    """Every metric of `compute_metrics`, plus what was evaluated and the validation losses."""
    result, info = predict_split(checkpoint, shards, split, batch_size=batch_size, device=device, workers=workers)
    if result["attribute_scores"] is None:
        raise EvalError(f"{checkpoint}: the model has no attribute head, nothing to evaluate")
    metrics = compute_metrics(result["attribute_scores"], result["attribute_labels"], info.vocabulary,
                              result["category_logits"], result["category_labels"])
    metrics.update({
        "checkpoint": str(checkpoint), "model": info.model_name, "epoch": info.epoch, "step": info.step,
        "shards": str(shards), "split": split, "image_size": info.image_size,
        "loss": result["loss"], "attribute_loss": result["attribute_loss"],
        "category_loss": result["category_loss"], "heatmap_loss": result["heatmap_loss"],
        "attention_mse": result["attention_mse"], "attention_correlation": result["attention_correlation"],
    })
    return metrics


def write_json(data: dict, path: str | Path) -> None:
    """Strict JSON (NaN written as null), replaced atomically."""
    make_parent_folder(path)
    atomic_write_text(path, json.dumps(without_nan(data), indent=1, ensure_ascii=False, allow_nan=False) + "\n")
