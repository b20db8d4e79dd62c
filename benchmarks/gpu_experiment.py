"""The GPU experiment (issue 6): throughput and VSAM vs VGG16 on one shard collection, in one run.

    benchmarks/gpu_experiment.sh --shards gpu-shards/ --out runs/gpu-experiment   # one CUDA GPU, < 6 min
    benchmarks/gpu_experiment.sh --shards S --out O --tiny                        # CPU check, ~30 s

Phases, each guarded by the time budget (`--budget-seconds`, counted from the start of this
script, imports included); whatever does not fit is skipped and the reason recorded:

1. data: the train and val splits are decoded once into device memory (`vsam_train.fast`);
2. loader images/s: the streaming loader with CPU workers decoding, the streaming loader handing JPEG
   bytes to the GPU (nvjpeg, `torchvision.io.decode_jpeg` on cuda), and the device-resident split
   (gather + augment on the GPU); the resident split feeds all training here (see docs/experiments.md,
   "GPU experiment");
3. training images/s of every model at every `--batch-sizes`, bf16 autocast + channels_last, eager:
   warm-up steps, then `--steps` timed steps between two `torch.cuda.synchronize`;
4. training from scratch: every model of `--compare`, for every seed, the same epochs, data order,
   augmentation and initial seed; validation metrics (`vsam_train.metrics.compute_metrics`), Ŝ vs S
   (Pearson per image, MSE) and the majority baseline from the train labels. If a model stays at the
   majority classes, all are trained again with batch norm (`model.batch_norm: true`);
5. the same throughput, torch.compile'd, in a child process that is killed when the budget runs out
   (compiling cannot be interrupted in-process): the measurements it finished are kept.

Everything lands in OUT/gpu_experiment.json (rewritten after each phase, so a kill leaves the phases
done) and the table printed last is also OUT/summary.txt. Exit codes: 0 done (items skipped for the
budget are part of a normal run), 1 done but some measurement failed (its traceback is in the JSON's
"errors"), 2 unusable input (no collection, no train or val split, unknown model, no CUDA without --tiny).
"""
from __future__ import annotations

import time

STARTED = time.monotonic()   # the budget counts the imports below too

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from bench_train import Trainer, timed  # noqa: E402
from pose_prep.shard_format import collection_info  # noqa: E402
from vsam_train.config import MODEL_VARIANTS, ConfigError, load_config, parse_assignments, set_key  # noqa: E402
from vsam_train.data import ShardStream, decode_on_device, make_loader, split_group_heatmaps  # noqa: E402
from vsam_train.evaluate import without_nan, write_json  # noqa: E402
from vsam_train.experiments.compare import majority_metrics  # noqa: E402
from vsam_train.fast import (AttentionRecorder, ResidentBatches, attention_agreement, heatmap_batch,  # noqa: E402
                             load_resident_split, synchronize)
from vsam_train.losses import VsamLoss  # noqa: E402
from vsam_train.metrics import compute_metrics  # noqa: E402
from vsam_train.train import (build_model, build_optimizer, evaluate, group_joints_for,  # noqa: E402
                              train_one_epoch)

JSON_NAME = "gpu_experiment.json"
SCHEMA = "vsam-gpu-experiment/1"
# What each name of --compare trains: config overrides on top of the base config.
MODEL_SPECS: dict[str, dict] = {name: MODEL_VARIANTS[name] for name in ("vsam", "vgg16", "vsam-groups")}
GROUPS_MODEL = "vsam-groups"   # needs one heatmap per attribute group beside the stored one
# Modules the GPU machine does not have (or this path must not need): recorded if loaded.
FORBIDDEN_MODULES = ("pose_prep.detectors", "mediapipe", "ultralytics", "captum", "onnx", "onnxruntime")
VSAM_GOAL_IMAGES_PER_S = 2200   # issue 6: VSAM fed from shards, bf16 channels_last bs 64, one H100
EXIT_FAILED_MEASUREMENT = 1
EXIT_BAD_INPUT = 2

FULL = {"budget_seconds": 330.0, "epochs": 15, "batch_sizes": "64,256", "steps": 15, "warmup": 5,
        "loader_batches": 80, "compile_backend": "inductor", "compile_batch_sizes": None, "max_train_items": None,
        "min_compile_seconds": 40.0, "compile_reserve": 90.0, "margin": 12.0}
TINY = {"budget_seconds": 150.0, "epochs": 2, "batch_sizes": "16,32", "steps": 3, "warmup": 1,
        "loader_batches": 4, "compile_backend": "eager", "compile_batch_sizes": "16", "max_train_items": 512,
        "min_compile_seconds": 8.0, "compile_reserve": 15.0, "margin": 5.0}
# Planning factors: a batch-norm model trains at most this much slower than its plain twin; an
# epoch costs this much more than its steps at the measured rate (the epoch's order and augmentation
# drawn on the CPU, the first steps at a new shape, the loss sums).
BATCH_NORM_COST = 1.3
EPOCH_OVERHEAD = 1.1
# Start, data, loader and eager throughput figures must be done by this share of the budget; the
# rest is for training (and compiling).
MEASURE_SHARE = 0.35


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, help="shard collection with train and val splits")
    parser.add_argument("--out", type=Path, help=f"folder for {JSON_NAME}, summary.txt and the compile log")
    parser.add_argument("--tiny", action="store_true", help="CPU check: configs/tiny.yaml, few steps, small budget")
    parser.add_argument("--budget-seconds", type=float, help="wall time for everything (full 330, tiny 150)")
    parser.add_argument("--device", help="cuda (default when present) or cpu (only with --tiny)")
    parser.add_argument("--compare", default="vsam,vgg16", help=f"models to train, of {', '.join(MODEL_SPECS)}")
    parser.add_argument("--seeds", type=int, default=1, help="train each model with seeds 0..N-1")
    parser.add_argument("--epochs", type=int,
                        help="epochs per training run (full 15, tiny 2); fewer if the budget says so")
    parser.add_argument("--image-size", type=int, help="training resolution (full 224, tiny 64)")
    parser.add_argument("--batch-sizes", help="throughput batch sizes (full 64,256, tiny 16,32)")
    parser.add_argument("--steps", type=int, help="timed steps per throughput figure")
    parser.add_argument("--warmup", type=int, help="untimed steps before them")
    parser.add_argument("--loader-batches", type=int, help="batches per loader figure")
    parser.add_argument("--workers", type=int, help="CPU loader workers (default: CPUs - 2, at most 8; tiny 1)")
    parser.add_argument("--max-train-items", type=int, help="use only the first N train items (tiny 512)")
    parser.add_argument("--compile-backend", help="torch.compile backend (full inductor; tiny eager = dynamo only)")
    parser.add_argument("--compile-batch-sizes", help="batch sizes measured compiled (default: all; tiny the first)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled measurements")
    parser.add_argument("--stuck-margin", type=float, default=0.01,
                        help="a model whose mean group top-1 is not above the majority baseline by this much "
                             "is taken to stay at the majority classes")
    parser.add_argument("--config", type=Path, help="base config (default: the paper's; tiny: configs/tiny.yaml)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="any config value, e.g. --set optim.lr=3e-4 (repeatable)")
    parser.add_argument("--child-spec", type=Path, help=argparse.SUPPRESS)   # the compile child process
    args = parser.parse_args(argv)
    if args.child_spec is None and (args.shards is None or args.out is None):
        parser.error("--shards and --out are required")
    try:
        args.settings = parse_assignments(args.assignments)
    except ConfigError as error:
        parser.error(f"--set: {error}")
    defaults = TINY if args.tiny else FULL
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.child_spec is None:
        try:
            base_config(args)          # a config it cannot use: a usage error now, not a traceback later
        except ConfigError as error:
            parser.error(str(error))
    return args


# --- bookkeeping -------------------------------------------------------------------------------

class Budget:
    """Seconds left of `--budget-seconds`, counted from the start of the script."""

    def __init__(self, seconds: float, margin: float):
        self.seconds, self.margin = seconds, margin

    def elapsed(self) -> float:
        return time.monotonic() - STARTED

    def left(self) -> float:
        """What may still be spent, keeping `margin` for the final JSON, table and exit."""
        return self.seconds - self.margin - self.elapsed()


class Report:
    """The JSON document, rewritten (atomically) after every phase."""

    def __init__(self, out: Path, data: dict):
        self.path, self.data = out / JSON_NAME, data
        self.data.setdefault("skipped", [])
        self.data.setdefault("timings", {})

    def skip(self, item: str, reason: str) -> None:
        self.data["skipped"].append({"item": item, "reason": reason})
        print(f"skipped {item}: {reason}", flush=True)

    def attempt(self, item: str, work, *args, **kwargs):
        """`work(*args, **kwargs)`, or None with the error recorded as the reason `item` was
        skipped: one failing measurement (a CUDA error, a codec that refuses) must not cost the
        rest of a run on a scarce GPU slot."""
        try:
            return work(*args, **kwargs)
        except Exception as error:   # noqa: BLE001 — recorded in the JSON, with its traceback
            import traceback

            self.data.setdefault("errors", []).append({"item": item, "traceback": traceback.format_exc()[-4000:]})
            self.skip(item, f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            return None

    def phase(self, name: str, started: float) -> None:
        self.data["timings"][name] = round(time.monotonic() - started, 3)
        self.save()

    def save(self) -> None:
        self.data["elapsed_seconds"] = round(time.monotonic() - STARTED, 3)
        write_json(self.data, self.path)


def release(device: torch.device) -> None:
    """Give back the GPU memory of what was just dropped (a model's cycles hold its tensors until a
    collection). The CPU (--tiny) has nothing to give back, and a full collection there costs 0.3 s
    a call in a process that holds as many objects as the test suite's (26 calls in a comparison)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "cpu_count": os.cpu_count(), "device_type": device.type,
           "device": "cpu", "torch_threads": torch.get_num_threads(), "git_commit": _git_commit()}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        env.update({"device": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                    "cudnn": torch.backends.cudnn.version(),
                    "capability": list(torch.cuda.get_device_capability(device)),
                    "device_memory_gb": round(properties.total_memory / 2**30, 1)})
    return env


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def base_config(args) -> dict:
    config_file = args.config or (REPO / "configs" / "tiny.yaml" if args.tiny else None)
    overrides = {}
    if args.image_size:
        overrides["model.image_size"] = args.image_size
    config = load_config(config_file, {**overrides, **args.settings})
    # Its splits are held in memory with the heatmaps prep-pose stored: a target rendered from the keypoints
    # (another joint subset or σ) would be ignored, so it is refused rather than reported as measured.
    for key in ("heatmap_joints", "heatmap_sigma"):
        if config["data"][key] is not None:
            raise ConfigError(f"data.{key}: the GPU experiment trains on the stored heatmaps and cannot render "
                              f"another target; use vsam train or benchmarks/compare.py for it")
    return config


def model_config(config: dict, name: str, *, seed: int = 0, batch_norm: bool | None = None) -> dict:
    config = json.loads(json.dumps(config))   # a deep copy
    for key, value in MODEL_SPECS[name].items():
        set_key(config, key, value)
    set_key(config, "train.seed", seed)
    if batch_norm is not None:
        set_key(config, "model.batch_norm", batch_norm)
    return config


def int_list(text: str | None) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()] if text else []


# --- measurements ------------------------------------------------------------------------------

def endless(batches: ResidentBatches):
    """Training batches epoch after epoch."""
    epoch = 0
    while True:
        batches.set_epoch(epoch)
        yield from batches
        epoch += 1


def measure_loader(name: str, batches, n_batches: int, device: torch.device, to_device) -> dict:
    """images/s of `to_device(batch)` over `n_batches` after the first (the first, which includes
    starting the workers, is timed apart)."""
    started = time.perf_counter()
    iterator = iter(batches)
    synchronize(device)
    first = time.perf_counter()
    first_images = len(to_device(next(iterator)))
    synchronize(device)
    first_seconds = time.perf_counter() - first
    images, timed_from = 0, time.perf_counter()
    for _, batch in zip(range(n_batches), iterator):
        images += len(to_device(batch))
    synchronize(device)
    seconds = time.perf_counter() - timed_from
    del iterator   # stops the workers
    total = time.perf_counter() - started
    return {"name": name, "images": images, "seconds": round(seconds, 4),
            "images_per_s": images / seconds if seconds > 0 else None,
            "first_batch_seconds": round(first_seconds, 4), "total_seconds": round(total, 4),
            "images_per_s_including_start": (images + first_images) / total}


def loader_phase(args, config: dict, train, device: torch.device, report: Report, measure_until: float) -> dict:
    """Three ways to feed the training step, each measured the same way."""
    d, size = config["data"], config["model"]["image_size"]
    batch_size = config["train"]["batch_size"]
    workers = args.workers if args.workers is not None else max(1, min(8, (os.cpu_count() or 2) - 2))
    pin = device.type == "cuda"
    results = {"batch_size": batch_size, "workers": workers}
    limit = args.max_train_items

    def stream(decode: str) -> ShardStream:
        stream = ShardStream(args.shards, d["train_split"], image_size=size, batch_size=batch_size, train=True,
                             augment=d["augment"], shuffle_buffer=d["shuffle_buffer"], decode=decode,
                             max_batches=(limit // batch_size) if limit else None)
        return stream

    plans = {
        "cpu_workers": lambda: measure_loader(
            "cpu_workers", make_loader(stream("cpu"), workers, pin_memory=pin), args.loader_batches, device,
            lambda b: b["image"].to(device, non_blocking=True)),
        "device_decode": lambda: measure_loader(
            "device_decode", make_loader(stream("gpu"), workers, pin_memory=pin), args.loader_batches, device,
            lambda b: decode_on_device(b, size, device)),
        "resident": lambda: measure_loader(
            "resident", endless(ResidentBatches(train, image_size=size, batch_size=batch_size, train=True,
                                                augment=d["augment"])), args.loader_batches, device,
            lambda b: b["image"]),
    }
    for name, run in plans.items():
        if time.monotonic() > measure_until:
            report.skip(f"loader/{name}", f"the measurements used their share of the budget ({MEASURE_SHARE:.0%})")
            continue
        result = report.attempt(f"loader/{name}", run)
        if result is not None:
            results[name] = {**result, "device": str(device)} if name == "device_decode" else result
    results["resident"] = results.get("resident", {})
    results["resident"].update({"decode_once_seconds": round(train.decode_seconds, 3), "items": len(train),
                                "bytes": train.nbytes, "decoded_on": train.decode_device})
    return results


def measure_training(trainer: Trainer, batches, batch_size: int, steps: int, warmup: int,
                     device: torch.device) -> dict:
    """One model at one batch size: the first step (which compiles, when compiled), warm-up steps,
    then `steps` timed steps, each a full training step on a fresh augmented batch."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    started = time.perf_counter()
    trainer.step(*trainer.on_device(next(batches)))
    synchronize(device)
    first_step = time.perf_counter() - started
    for _ in range(max(0, warmup - 1)):
        trainer.step(*trainer.on_device(next(batches)))
    images_per_s = timed(device, steps, batch_size, lambda: trainer.step(*trainer.on_device(next(batches))))
    return {"images_per_s": images_per_s, "step_ms": 1000 * batch_size / images_per_s,
            "first_step_seconds": round(first_step, 3), "steps": steps, "warmup": warmup,
            "peak_memory_gb": peak_memory_gb(device)}


def throughput_rows(args, config: dict, models: list[str], batch_sizes: list[int], train, device: torch.device,
                    compiled: bool, stop_at: float | None, emit) -> None:
    """Every (batch size, model) measurement, batch size first (so that the pairs that matter most
    come first); `emit(row)` gets each row as soon as it is done."""
    size, augment = config["model"]["image_size"], config["data"]["augment"]
    trainers = {}
    for batch_size in batch_sizes:
        batches = endless(ResidentBatches(train, image_size=size, batch_size=batch_size, train=True, augment=augment))
        for name in models:
            row = {"model": name, "batch_size": batch_size, "mode": "compiled" if compiled else "eager"}
            if stop_at is not None and time.monotonic() > stop_at:
                emit({**row, "skipped": "the throughput phase used its share of the budget"})
                continue
            if name not in trainers:
                trainers[name] = make_trainer(config, name, train.vocabulary, device, compiled and args.compile_backend)
            try:
                row.update(measure_training(trainers[name], batches, batch_size, args.steps, args.warmup, device))
            except torch.cuda.OutOfMemoryError as error:   # bs 256 of a big model on a small card
                row["skipped"] = f"out of memory ({str(error).splitlines()[0]})"
                release(device)
            except Exception as error:   # noqa: BLE001 — e.g. a compiler failure: the next row may work
                row["skipped"] = f"failed: {type(error).__name__}: {str(error)[:500]}"
                trainers.pop(name, None)
                release(device)
            emit(row)
    trainers.clear()
    release(device)


def make_trainer(config: dict, name: str, vocabulary, device: torch.device, backend: str | None) -> Trainer:
    spec_config = model_config(config, name)
    set_key(spec_config, "train.compile", False)
    torch.manual_seed(0)
    trainer = Trainer(spec_config["model"]["name"], spec_config, vocabulary, device)
    if backend:
        # static shapes: each batch size gets its own graph instead of a slower dynamic one
        trainer.model = torch.compile(trainer.model, backend=backend, dynamic=False)
    return trainer


# --- training ----------------------------------------------------------------------------------

def majority_baseline(train, val) -> dict:
    """`experiments.compare.majority_metrics` of the resident train and val splits."""
    return majority_metrics(train.attributes.numpy(), val.attributes.numpy(), train.vocabulary,
                            train.category.numpy(), val.category.numpy())


def stays_at_majority(metrics: dict, baseline: dict, margin: float) -> tuple[bool, str]:
    """Whether a model's validation figures are no better than the majority baseline's (+ margin)."""
    checks = []
    if "group_top1" in metrics and "group_top1" in baseline:
        checks.append(("mean group top-1", metrics["group_top1"]["mean"], baseline["group_top1"]["mean"]))
    if "category_top1" in metrics and "category_top1" in baseline:
        checks.append(("category top-1", metrics["category_top1"], baseline["category_top1"]))
    checks = [(what, ours, theirs) for what, ours, theirs in checks
              if ours is not None and theirs is not None and not (math.isnan(ours) or math.isnan(theirs))]
    if not checks:
        return False, "no exclusive attribute groups or categories: nothing to compare with a majority baseline"
    stuck = all(ours <= theirs + margin for _, ours, theirs in checks)
    text = "; ".join(f"{what} {ours:.4f} vs majority {theirs:.4f}" for what, ours, theirs in checks)
    return stuck, f"{text} (margin {margin})"


def majority_agreement(scores: np.ndarray, labels: np.ndarray, vocabulary, baseline: dict) -> dict:
    """Per group: the share of val items whose best-scored attribute is the group's majority one."""
    result = {}
    for group, idx in vocabulary.group_indices().items():
        majority = vocabulary.attributes.index(baseline["majority_attribute"][group])
        ranked = np.where(labels[:, idx] >= 0, scores[:, idx], -np.inf)
        result[group] = float((np.asarray(idx)[ranked.argmax(axis=1)] == majority).mean())
    return result


def train_run(config: dict, name: str, seed: int, batch_norm: bool, epochs: int, train, val, val_batches,
              device: torch.device, budget: Budget, baseline: dict, margin: float) -> dict:
    """Train one model from scratch on the resident train split, then evaluate it on val."""
    config = model_config(config, name, seed=seed, batch_norm=batch_norm)
    t, size = config["train"], config["model"]["image_size"]
    torch.manual_seed(seed)
    model = build_model(config, train.vocabulary).to(device)
    channels_last = t["channels_last"] and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(model, config)
    criterion = VsamLoss.from_config(config["loss"])
    batches = ResidentBatches(train, image_size=size, batch_size=t["batch_size"], train=True,
                              augment=config["data"]["augment"], seed=seed)
    record = {"model": name, "seed": seed, "batch_norm": batch_norm, "epochs_planned": epochs, "epochs": []}
    step, started = 0, time.perf_counter()
    for epoch in range(epochs):
        epoch_seconds = (time.perf_counter() - started) / epoch if epoch else 0.0
        if epoch and budget.left() < epoch_seconds * 1.1:
            record["truncated"] = f"stopped after {epoch} of {epochs} epochs: {budget.left():.0f} s of the budget left"
            break
        batches.set_epoch(epoch)
        torch.manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))   # dropout
        stats, step = train_one_epoch(model, criterion, optimizer, scheduler, batches, device, epoch, step,
                                      config=config)
        record["epochs"].append({"epoch": epoch + 1, **{k: stats[k] for k in (
            "train_loss", "train_attribute_loss", "train_heatmap_loss", "train_images_per_second")}})
    synchronize(device)
    record.update({"steps": step, "train_seconds": round(time.perf_counter() - started, 3),
                   "epochs_done": len(record["epochs"]), "parameters": sum(p.numel() for p in model.parameters())})
    record["train_images_per_s"] = step * t["batch_size"] / record["train_seconds"]
    record.update(evaluate_run(model, criterion, val, val_batches, device, config, baseline, margin))
    del model, optimizer, batches
    release(device)
    return record


def evaluate_run(model, criterion, val, val_batches, device, config, baseline: dict, margin: float) -> dict:
    started = time.perf_counter()
    recorder = AttentionRecorder(model)
    result = evaluate(recorder, criterion, val_batches, device, config=config)
    metrics = compute_metrics(result["attribute_scores"], result["attribute_labels"], val.vocabulary,
                              result["category_logits"], result["category_labels"])
    stuck, why = stays_at_majority(metrics, baseline, margin)
    out = {"val_loss": result["loss"], "val_attribute_loss": result["attribute_loss"],
           "val_heatmap_loss": result["heatmap_loss"], "metrics": metrics, "stays_at_majority": stuck,
           "majority_check": why,
           "majority_agreement": majority_agreement(result["attribute_scores"], result["attribute_labels"],
                                                    val.vocabulary, baseline),
           # evaluate's own figures of Ŝ (pixels pooled over the images; per group for a groups model)
           "evaluate_attention": {key: result.get(key) for key in (
               "attention_mse", "attention_correlation", "group_attention_correlation") if key in result}}
    maps = recorder.attention()
    if maps is not None:
        no_augment = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1]], dtype=torch.float32).expand(len(val), 9)
        target = heatmap_batch(val.heatmaps, no_augment, maps.shape[-1])
        out["attention"] = attention_agreement(maps, target, val.has_pose)
    out["eval_seconds"] = round(time.perf_counter() - started, 3)
    return out


def mean_heatmap_agreement(train, val, grid: int) -> dict:
    """Ŝ's yardstick: how well the average train heatmap (one fixed map for every image) matches S."""
    no_augment = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1]], dtype=torch.float32)
    pose = train.has_pose
    mean_map = heatmap_batch(train.heatmaps[pose], no_augment.expand(int(pose.sum()), 9), grid).mean(0, keepdim=True)
    target = heatmap_batch(val.heatmaps, no_augment.expand(len(val), 9), grid)
    return attention_agreement(mean_map.expand_as(target), target, val.has_pose)


def plan_epochs(requested: int, seconds_per_epoch: float | None, left: float, reserve: float,
                retrain_factor: float) -> tuple[int, str]:
    """Epochs for each training run so that every run, and a batch-norm retrain of all of them,
    fit in `left` - `reserve` seconds."""
    if seconds_per_epoch is None:
        return requested, "no throughput measured: the requested epochs, guarded epoch by epoch"
    fit = int((left - reserve) // (seconds_per_epoch * (1 + retrain_factor)))
    if fit >= requested:
        return requested, (f"{requested} epochs fit: ≈{seconds_per_epoch:.1f} s per epoch of all runs, "
                           f"×{1 + retrain_factor:.1f} with a possible batch-norm retrain, {left:.0f} s left")
    epochs = max(1, fit)
    return epochs, (f"{requested} epochs requested, {epochs} fit the budget (≈{seconds_per_epoch:.1f} s per epoch "
                    f"of all runs, ×{1 + retrain_factor:.1f} with a possible batch-norm retrain, {left:.0f} s left, "
                    f"{reserve:.0f} s kept for compiling)")


def training_phase(args, config, models, seeds, train, val, device, report: Report, budget: Budget,
                   throughput: list[dict]) -> dict:
    size, batch_size = config["model"]["image_size"], config["train"]["batch_size"]
    val_batches = ResidentBatches(val, image_size=size, batch_size=max(int_list(args.batch_sizes)), train=False)
    baseline = majority_baseline(train, val)
    steps_per_epoch = len(train) // batch_size
    rates = {r["model"]: r["images_per_s"] for r in throughput
             if r["batch_size"] == batch_size and r["mode"] == "eager" and r.get("images_per_s")}
    per_epoch = None
    if all(name in rates for name in models):
        per_epoch = EPOCH_OVERHEAD * len(seeds) * sum(steps_per_epoch * batch_size / rates[name] for name in models)
    reserve = 0.0 if args.no_compile else args.compile_reserve
    epochs, why = plan_epochs(args.epochs, per_epoch, budget.left(), reserve, BATCH_NORM_COST)
    phase = {"plan": {"epochs_requested": args.epochs, "epochs": epochs, "reason": why,
                      "batch_size": batch_size, "steps_per_epoch": steps_per_epoch, "train_items": len(train),
                      "val_items": len(val), "pipeline": "resident", "seeds": seeds, "models": models},
             "majority_baseline": baseline,
             "mean_heatmap_attention": mean_heatmap_agreement(train, val, size // 4),
             "runs": [], "batch_norm_retrain": {"triggered": False}}
    report.data["training"] = phase
    if epochs < args.epochs:
        report.skip("training/epochs", why)

    def run_all(batch_norm: bool, n_epochs: int) -> list[dict]:
        runs = []
        for seed in seeds:
            for name in models:
                print(f"training {name} seed {seed}{' (batch norm)' if batch_norm else ''}: {n_epochs} epochs",
                      flush=True)
                run = report.attempt(f"training/{name}/seed{seed}{'/batch_norm' if batch_norm else ''}", train_run,
                                     config, name, seed, batch_norm, n_epochs, train, val, val_batches, device,
                                     budget, baseline, args.stuck_margin)
                release(device)
                if run is not None:
                    runs.append(run)
                    phase["runs"].append(run)
                report.save()
        return runs

    first = run_all(False, epochs)
    stuck = [f"{r['model']} seed {r['seed']}: {r['majority_check']}" for r in first if r["stays_at_majority"]]
    if not stuck:
        phase["final"] = "plain"
        return phase
    seconds = sum(r["train_seconds"] + r["eval_seconds"] for r in first) * BATCH_NORM_COST
    retrain_epochs = epochs if seconds <= budget.left() - reserve / 2 else \
        int(epochs * (budget.left() - reserve / 2) / seconds)
    retrain = {"triggered": True, "stuck": stuck, "epochs": retrain_epochs,
               "reason": "a model stays at the majority classes: every model is trained again with batch norm"}
    phase["batch_norm_retrain"] = retrain
    if retrain_epochs < 1:
        report.skip("training/batch_norm_retrain", f"needed (≈{seconds:.0f} s) but only {budget.left():.0f} s left")
        phase["final"] = "plain"
        return phase
    if retrain_epochs < epochs:
        retrain["reason"] += f" ({retrain_epochs} of {epochs} epochs fit the budget)"
    print(f"{'; '.join(stuck)} → retraining every model with batch norm", flush=True)
    run_all(True, retrain_epochs)
    phase["final"] = "batch_norm"
    return phase


# --- compiled throughput, in a child process ---------------------------------------------------

def compile_phase(args, config, models, device, report: Report, budget: Budget) -> list[dict]:
    """Run this script as a child (`--child-spec`) that compiles and measures; kill its process
    group when the budget runs out and keep the rows it finished."""
    sizes = int_list(args.compile_batch_sizes) or int_list(args.batch_sizes)
    wanted = [(b, m) for b in sizes for m in models]
    timeout = budget.left()
    if args.no_compile or timeout < args.min_compile_seconds:
        reason = "--no-compile" if args.no_compile else f"only {timeout:.0f} s of the budget left"
        for batch_size, name in wanted:
            report.skip(f"throughput/{name}/bs{batch_size}/compiled", reason)
        return []
    rows_path, log_path = args.out / "compile_rows.jsonl", args.out / "compile_child.log"
    rows_path.unlink(missing_ok=True)
    spec = {"shards": str(args.shards), "config": config, "models": models, "batch_sizes": sizes,
            "steps": args.steps, "warmup": args.warmup, "backend": args.compile_backend, "device": str(device),
            "rows": str(rows_path), "threads": torch.get_num_threads()}
    spec_path = args.out / "compile_spec.json"
    spec_path.write_text(json.dumps(spec))
    started = time.monotonic()
    with open(log_path, "wb") as log:
        child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child-spec", str(spec_path)],
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            child.wait(timeout=timeout)
            ended = f"exit code {child.returncode}"
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)   # the child and its compile workers
            child.wait()
            ended = f"killed after {timeout:.0f} s (the budget)"
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()] \
        if rows_path.exists() else []
    done = {(r["batch_size"], r["model"]) for r in rows}
    for batch_size, name in wanted:
        if (batch_size, name) not in done:
            report.skip(f"throughput/{name}/bs{batch_size}/compiled",
                        f"the compile child did not get to it ({ended}; log: {log_path.name})")
    report.data["compile_child"] = {"seconds": round(time.monotonic() - started, 3), "ended": ended,
                                    "timeout_seconds": round(timeout, 1), "backend": args.compile_backend,
                                    "log": log_path.name}
    if child.returncode != 0:
        report.data["compile_child"]["log_tail"] = log_path.read_text(errors="replace")[-3000:]
    return rows


def child_main(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    setup_device(device)
    config = spec["config"]
    size = config["model"]["image_size"]
    max_items = 2 * max(spec["batch_sizes"])
    train = load_resident_split(spec["shards"], config["data"]["train_split"], size, device, max_items=max_items)
    if GROUPS_MODEL in spec["models"]:
        attach_group_heatmaps(Path(spec["shards"]), config, train, config["data"]["train_split"], device, max_items)
    args = argparse.Namespace(compile_backend=spec["backend"], steps=spec["steps"], warmup=spec["warmup"])

    def emit(row: dict) -> None:
        with open(spec["rows"], "a") as f:
            f.write(json.dumps(without_nan(row)) + "\n")

    throughput_rows(args, config, spec["models"], spec["batch_sizes"], train, device, True, None, emit)


# --- summary -----------------------------------------------------------------------------------

def ratios(throughput: list[dict], loader: dict, models: list[str], training_batch_size: int) -> dict:
    rate = {(r["model"], r["batch_size"], r["mode"]): r["images_per_s"] for r in throughput if r.get("images_per_s")}
    out: dict = {"vs_vgg16": {}, "compiled_over_eager": {}, "loader_over_training": {}}
    for (name, batch_size, mode), value in rate.items():
        if name != "vgg16" and ("vgg16", batch_size, mode) in rate:
            out["vs_vgg16"][f"{name}/vgg16 bs{batch_size} {mode}"] = value / rate[("vgg16", batch_size, mode)]
        if mode == "compiled" and (name, batch_size, "eager") in rate:
            out["compiled_over_eager"][f"{name} bs{batch_size}"] = value / rate[(name, batch_size, "eager")]
    for loader_name in ("cpu_workers", "device_decode", "resident"):
        loader_rate = loader.get(loader_name, {}).get("images_per_s")
        for name in models:
            for mode in ("eager", "compiled"):
                if loader_rate and (name, training_batch_size, mode) in rate:
                    out["loader_over_training"][f"{loader_name}/{name} bs{training_batch_size} {mode}"] = \
                        loader_rate / rate[(name, training_batch_size, mode)]
    best = max((v for (n, b, _), v in rate.items() if n == "vsam" and b == 64), default=None)
    out["vsam_goal"] = {"goal_images_per_s": VSAM_GOAL_IMAGES_PER_S, "best_vsam_bs64_images_per_s": best,
                        "met": best is not None and best >= VSAM_GOAL_IMAGES_PER_S}
    return out


def _f(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _mean_std(values: list, digits: int = 3) -> str:
    """One run's value, or mean±std (sample) over seeds."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f}±{np.std(values, ddof=1):.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in [header, *rows]]


def summary(data: dict) -> str:
    env, s = data["environment"], data["settings"]
    lines = [f"GPU experiment: {env['device']} · torch {env['torch']} · torchvision {env['torchvision']} · "
             f"{s['image_size']} px · {'TINY (CPU check) · ' if s['tiny'] else ''}"
             f"{data['elapsed_seconds']:.0f} s of {s['budget_seconds']:.0f} s"]
    d = data["data"]
    too_big = "" if d["under_60_mb"] else " (over the 60 MB meant for copying)"
    lines.append(f"shards {d['shards']}: {d['bytes'] / 1e6:.1f} MB{too_big}, "
                 f"train {d.get('train_items')} (of {d['splits'].get('train')}), val {d.get('val_items')}")
    loader = data.get("loader", {})
    lines.append("loader img/s (batch {}): ".format(loader.get("batch_size")) + " · ".join(
        f"{name} {_f(loader[name].get('images_per_s'), 0)}" for name in ("cpu_workers", "device_decode", "resident")
        if loader.get(name, {}).get("images_per_s")))
    rows = data.get("throughput", [])
    columns = sorted({(r["batch_size"], r["mode"]) for r in rows}, key=lambda c: (c[0], c[1] != "eager"))
    if columns:
        lines.append("")
        lines += _table(["training img/s"] + [f"bs{b} {m}" for b, m in columns],
                        [[name] + [_f(next((r.get("images_per_s") for r in rows if (r["model"], r["batch_size"],
                                    r["mode"]) == (name, b, m)), None), 0) for b, m in columns]
                         for name in s["models"]])
    compiled = [row for row in rows if row["mode"] == "compiled"]
    if compiled:
        lines.append("compile (first step, s): " + ", ".join(
            f"{row['model']} bs{row['batch_size']} {row['first_step_seconds']:.1f}" for row in compiled))
    r = data.get("ratios", {})
    for key in ("vs_vgg16", "compiled_over_eager", "loader_over_training"):
        if r.get(key):
            lines.append(f"{key}: " + ", ".join(f"{k} {v:.2f}" for k, v in r[key].items()))
    if r.get("vsam_goal", {}).get("best_vsam_bs64_images_per_s"):
        g = r["vsam_goal"]
        lines.append(f"VSAM goal ≥ {g['goal_images_per_s']} img/s at bs 64: "
                     f"{g['best_vsam_bs64_images_per_s']:.0f} ({'met' if g['met'] else 'not met'})")
    lines += _training_summary(data.get("training"))
    if data.get("skipped"):
        lines.append("")
        lines += [f"skipped {item['item']}: {item['reason']}" for item in data["skipped"]]
    return "\n".join(lines)


def _training_summary(training: dict | None) -> list[str]:
    if not training or not training.get("runs"):
        return []
    final_bn = training.get("final") == "batch_norm"
    runs = [r for r in training["runs"] if r["batch_norm"] == final_bn]
    models = list(dict.fromkeys(r["model"] for r in runs))
    baseline = training["majority_baseline"]
    by_model = {name: [r for r in runs if r["model"] == name] for name in models}
    epochs = sorted({r["epochs_done"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    lines = ["", f"validation ({training['plan']['val_items']} items; trained {'/'.join(map(str, epochs))} epochs "
                 f"on {training['plan']['train_items']} items; seeds {seeds}; batch norm: "
                 f"{'YES (retrained: a model stayed at the majority classes)' if final_bn else 'no'})"]

    def metric(get):
        return [_mean_std([get(r["metrics"]) for r in by_model[name]]) for name in models]

    def base(get):
        try:
            return _f(get(baseline))
        except (KeyError, TypeError):
            return "n/a"

    table = []
    if "group_top1" in baseline:
        groups = [g for g in baseline["group_top1"] if g != "mean"]
        table.append(["group top-1 mean"] + metric(lambda m: m["group_top1"]["mean"])
                     + [base(lambda m: m["group_top1"]["mean"])])
        table += [[f"  top-1 {g}"] + metric(lambda m, g=g: m["group_top1"][g])
                  + [base(lambda m, g=g: m["group_top1"][g])]
                  for g in groups]
    for key in ("P@k", "R@k", "F1@k", "AP"):
        table.append([key] + metric(lambda m, k=key: m[k]) + [base(lambda m, k=key: m[k])])
    for group in baseline["top3_recall"]:
        table.append([f"top-3 recall {group}"] + metric(lambda m, g=group: m["top3_recall"][g])
                     + [base(lambda m, g=group: m["top3_recall"][g])])
    if "category_top1" in baseline:
        table.append(["category top-1"] + metric(lambda m: m["category_top1"]) + [base(lambda m: m["category_top1"])])
    attention = [[r.get("attention") for r in by_model[name]] for name in models]
    mean_map = training.get("mean_heatmap_attention", {})
    table.append(["Ŝ vs S pearson"] + [_mean_std([a["pearson_mean"] for a in runs_a if a]) if any(runs_a) else "-"
                                       for runs_a in attention] + [f"{_f(mean_map.get('pearson_mean'))} (mean map)"])
    table.append(["Ŝ vs S MSE"] + [_mean_std([a["mse"] for a in runs_a if a]) if any(runs_a) else "-"
                                   for runs_a in attention] + [f"{_f(mean_map.get('mse'))} (mean map)"])
    group_maps = [[(r.get("evaluate_attention") or {}).get("group_attention_correlation") for r in by_model[name]]
                  for name in models]
    map_groups = list(dict.fromkeys(g for per_model in group_maps for maps in per_model if maps for g in maps))
    table += [[f"  map {g} vs its heatmap"] + [_mean_std([maps.get(g) for maps in per_model if maps])
                                              if any(per_model) else "-" for per_model in group_maps] + [""]
              for g in map_groups]
    table.append(["train img/s"] + [_mean_std([r["train_images_per_s"] for r in by_model[name]], 0) for name in models]
                 + [""])
    lines += _table([""] + models + ["majority"], table)
    return lines


# --- main --------------------------------------------------------------------------------------

def setup_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")


def choose_device(args) -> torch.device:
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(_fail("--device cuda, but torch sees no CUDA device"))
    if name == "cpu" and not args.tiny:
        raise SystemExit(_fail("no CUDA device: the full experiment needs a GPU (the CPU check is --tiny)"))
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:   # torch.cuda.set_device refuses a bare "cuda"
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _fail(message: str) -> int:
    print(f"gpu_experiment: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def check_inputs(args, config: dict) -> dict:
    unknown = [name for name in args.compare.split(",") if name not in MODEL_SPECS]
    if unknown or not args.compare:
        raise SystemExit(_fail(f"--compare: unknown model(s) {', '.join(unknown)}; "
                               f"choose from {', '.join(MODEL_SPECS)}"))
    if args.seeds < 1 or args.epochs < 1:
        raise SystemExit(_fail("--seeds and --epochs must be at least 1"))
    try:
        info = collection_info(args.shards)
    except Exception as error:   # a missing folder, no index, a foreign file: say which and why
        raise SystemExit(_fail(f"{args.shards}: not a readable shard collection ({error})")) from None
    for split in (config["data"]["train_split"], config["data"]["val_split"]):
        if not split or not info["splits"].get(split):
            raise SystemExit(_fail(f"{args.shards}: split {split!r} holds no items (train and val are needed)"))
    if config["train"]["batch_size"] not in int_list(args.batch_sizes):
        args.batch_sizes = f"{config['train']['batch_size']},{args.batch_sizes}"
    return info


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child_spec:
        child_main(args.child_spec)
        return {}
    config = base_config(args)
    info = check_inputs(args, config)
    device = choose_device(args)
    if config["train"]["cpu_threads"]:
        torch.set_num_threads(int(config["train"]["cpu_threads"]))
    setup_device(device)
    args.out.mkdir(parents=True, exist_ok=True)
    models, seeds = args.compare.split(","), list(range(args.seeds))
    budget = Budget(args.budget_seconds, args.margin)
    report = Report(args.out, {
        "schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "complete": False,
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]] if argv is None else ["gpu_experiment.py", *argv],
        "environment": environment(device),
        "settings": {"tiny": args.tiny, "budget_seconds": args.budget_seconds, "models": models, "seeds": seeds,
                     "image_size": config["model"]["image_size"], "width": config["model"]["width"],
                     "batch_sizes": int_list(args.batch_sizes), "steps": args.steps, "warmup": args.warmup,
                     "loader_batches": args.loader_batches, "compile_backend": args.compile_backend,
                     "amp_bf16": config["train"]["amp"] and device.type == "cuda",
                     "channels_last": config["train"]["channels_last"] and device.type == "cuda",
                     "stuck_margin": args.stuck_margin, "config": config},
        "data": {"shards": str(args.shards), "splits": info["splits"], "with_pose": info["with_pose"],
                 "bytes": info["bytes"], "under_60_mb": info["bytes"] < 60e6, "image_encoding": info["image_encoding"],
                 "heatmap": info["heatmap"]},
    })
    size, d = config["model"]["image_size"], config["data"]

    started = time.monotonic()
    train = load_split(args, d["train_split"], size, device, report, args.max_train_items)
    val = load_split(args, d["val_split"], size, device, report, None)
    if GROUPS_MODEL in models:
        attach_group_heatmaps(args.shards, config, train, d["train_split"], device, args.max_train_items)
        attach_group_heatmaps(args.shards, config, val, d["val_split"], device, None)
    report.data["data"].update({"train_items": len(train), "val_items": len(val),
                                "decode_seconds": {"train": train.decode_seconds, "val": val.decode_seconds}})
    report.phase("data", started)

    measure_until = STARTED + MEASURE_SHARE * args.budget_seconds
    started = time.monotonic()
    report.data["loader"] = loader_phase(args, config, train, device, report, measure_until)
    report.phase("loader", started)

    started = time.monotonic()
    throughput: list[dict] = []
    report.data["throughput"] = throughput
    throughput_rows(args, config, models, int_list(args.batch_sizes), train, device, False, measure_until,
                    lambda row: _keep_row(row, throughput, report))
    report.phase("throughput_eager", started)

    started = time.monotonic()
    training_phase(args, config, models, seeds, train, val, device, report, budget, throughput)
    report.phase("training", started)

    del train, val
    release(device)
    started = time.monotonic()
    for row in compile_phase(args, config, models, device, report, budget):
        _keep_row(row, throughput, report)
    report.phase("throughput_compiled", started)

    report.data["ratios"] = ratios(throughput, report.data["loader"], models, config["train"]["batch_size"])
    report.data["forbidden_modules_loaded"] = [m for m in FORBIDDEN_MODULES if m in sys.modules]
    report.data["complete"] = True
    report.save()
    text = summary(report.data) + f"\nJSON: {report.path}"
    (args.out / "summary.txt").write_text(text + "\n")
    print(text, flush=True)
    return report.data


def load_split(args, split: str, size: int, device: torch.device, report: Report, max_items: int | None):
    """The split in device memory, decoded there (nvjpeg on CUDA); if the device's decoder fails,
    decoded on the CPU instead (recorded), so that the rest of the run still happens."""
    resident = report.attempt(f"data/{split}/decode on {device.type}", load_resident_split, args.shards, split,
                              size, device, max_items=max_items)
    if resident is None and device.type != "cpu":
        resident = load_resident_split(args.shards, split, size, device, max_items=max_items, decode_device="cpu")
    if resident is None:
        report.save()
        raise SystemExit(_fail(f"{args.shards}: the {split} split cannot be read (see {JSON_NAME})"))
    return resident


def attach_group_heatmaps(shards: Path, config: dict, resident, split: str, device: torch.device,
                          max_items: int | None) -> None:
    """One heatmap per attribute group for the groups model, rendered from the stored keypoints
    in the resident split's order; the other models ignore them."""
    joints = group_joints_for(model_config(config, GROUPS_MODEL), resident.vocabulary)
    maps, lit, paths = split_group_heatmaps(shards, split, joints, max_items=max_items)
    if paths != resident.paths:
        raise RuntimeError(f"{shards}: the group heatmaps of {split!r} are not in the order of its images")
    resident.extra_maps["group_heatmap"] = torch.from_numpy(maps).to(device)
    resident.extra_items["group_has_pose"] = torch.from_numpy(lit).to(device)


def _keep_row(row: dict, rows: list[dict], report: Report) -> None:
    item = f"throughput/{row['model']}/bs{row['batch_size']}/{row['mode']}"
    if "skipped" in row:
        report.skip(item, row["skipped"])
        return
    rows.append(row)
    print(f"{item}: {row['images_per_s']:.1f} img/s (first step {row['first_step_seconds']:.1f} s)", flush=True)
    report.save()


if __name__ == "__main__":
    sys.exit(EXIT_FAILED_MEASUREMENT if main().get("errors") else 0)
