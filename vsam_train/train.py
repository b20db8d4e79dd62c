"""`vsam train`: shards → VSAM (or a baseline), in the style of torchvision's classification
reference: `train_one_epoch`, `evaluate`, `main`.

The run folder holds config.yaml (resolved), checkpoints/last.pt and epoch-NNN.pt, metrics.jsonl
(one object per epoch), steps.jsonl (every `train.log_every` steps), tensorboard/ and, with
`train.log_items`, items/rank-R.jsonl (the paths each rank trained on, per step).

Launched by torchrun (WORLD_SIZE > 1) it trains with DistributedDataParallel: NCCL on CUDA, gloo
on the CPU; rank 0 evaluates, logs and writes checkpoints.

One run at a time per run folder: rank 0 holds `<out>/.train.lock` (pose_prep.lock) for the run's
life, and a second `vsam train` into the folder, with or without --resume, stops at once (lock.Busy,
exit 75). Without --resume, a folder that holds a run (a checkpoint, or the config.yaml a run writes
when it starts, before its first checkpoint) is refused. With or without it, a non-empty folder that
no run made (none of RUN_FOLDER_MARKS in it: a folder of photos) is refused (NotARunFolder) before
anything is written into it.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from pose_prep import lock
from pose_prep.atomic import atomic_write_text, reporting_disk_full, temporary_files

from .checkpoint import CheckpointError, load_checkpoint, restore_rng_states, rng_states, save_checkpoint
from .config import ConfigError, differences, load_config, save_config
from .data import ShardStream, decode_on_device, make_loader, read_collection
from .groups import CorrelationAccumulator, plan_for
from .inference import stored_figures
from .losses import VsamLoss
from .metrics import category_accuracy, compute_metrics, without_nan
from .models import model_from_config


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (a finished run without --resume, ...)."""


class NotARunFolder(RunFolderError):
    """--out is a non-empty folder that is not a run's: a usage error (exit 2), nothing was written."""


# What every run leaves in its folder (the lock is taken first thing): one of them marks a run folder.
# run.log: the comparison core (experiments/compare.py) opens it before its child process trains there.
RUN_FOLDER_MARKS = (lock.TRAIN_LOCK_NAME, "config.yaml", "checkpoints", "metrics.jsonl", "run.log")


class InverseTimeDecay:
    """Keras' `decay` of the legacy optimizers: lr_t = lr / (1 + decay · t), t = steps done."""

    def __init__(self, decay: float):
        self.decay = decay

    def __call__(self, step: int) -> float:
        return 1.0 / (1.0 + self.decay * step)


class CosineDecay:
    """Half a cosine from the base rate at step 0 to 0 at `total_steps` (and 0 after)."""

    def __init__(self, total_steps: int):
        self.total_steps = max(1, int(total_steps))

    def __call__(self, step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))


# Settings that a resumed run may change: they do not change what it computes.
RESUMABLE_CHANGES = ("train.epochs", "train.log_every", "train.cpu_threads", "train.keep_epoch_checkpoints",
                     "data.num_workers")


def resolve_run_config(out: str | Path, config_file: str | Path | None, overrides: dict, resume: bool) -> dict:
    """The config of a run: the given file (or the defaults) with the CLI overrides on top. With
    `resume`, the run folder's own config.yaml is the base when no file is given, and the result
    must agree with it except for RESUMABLE_CHANGES (the same command plus --resume just works)."""
    saved = Path(out) / "config.yaml"
    if not (resume and saved.exists()):
        return load_config(config_file, overrides)
    config, before = load_config(saved if config_file is None else config_file, overrides), load_config(saved)
    # A cosine schedule's horizon is train.epochs: changing it changes every later step's rate.
    resumable = [k for k in RESUMABLE_CHANGES if not (k == "train.epochs" and before["optim"]["schedule"] == "cosine")]
    changed = [key for key in differences(before, config) if key not in resumable]
    if changed:
        given = "the options given" if config_file is None else f"{config_file} (with the options given)"
        raise ConfigError(f"--resume: {given} differs from the run's {saved} in {', '.join(changed)}; a resumed "
                          f"run may change only {', '.join(resumable)}")
    return config


# --- setup -------------------------------------------------------------------------------------

def setup_distributed(device_kind: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Initialises the process group when torchrun started us."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda, but torch sees no CUDA device")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world_size, device


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def build_model(config: dict, vocabulary) -> torch.nn.Module:
    return model_from_config(config, vocabulary, pretrained=config["model"]["pretrained"])


def group_joints_for(config: dict, vocabulary) -> list | None:
    """The loader's `group_joints` for a run: one joint tuple (or None) per attribute group of the
    groups model; None for every other model (no group heatmaps rendered)."""
    plan = plan_for(config, vocabulary)
    return list(plan.joints) if plan is not None else None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside torch.compile, DistributedDataParallel and other wrappers that keep it as
    `_orig_mod`, `module` or `model` (e.g. fast.AttentionRecorder)."""
    for _ in range(8):
        inner = next((getattr(model, name) for name in ("_orig_mod", "module", "model")
                      if isinstance(getattr(model, name, None), torch.nn.Module)), None)
        if inner is None:
            break
        model = inner
    return model


def pooling_mix(step: int, config: dict) -> float:
    """Groups model: the share of the group maps in attribute pooling at optimizer step `step`:
    linear from 0 to 1 over model.group_warmup_steps (docs/attention-groups.md, "Stability")."""
    warmup = config["model"].get("group_warmup_steps", 0)
    return min(1.0, step / warmup) if warmup else 1.0


def build_optimizer(model: torch.nn.Module, config: dict, steps_per_epoch: int | None = None):
    """Adam and its schedule: optim.schedule inverse_time (Keras' decay, the paper's) or cosine
    (to 0 over train.epochs × `steps_per_epoch` steps, which it then needs)."""
    o = config["optim"]
    optimizer = torch.optim.Adam(model.parameters(), lr=o["lr"], weight_decay=o["weight_decay"])
    if o["schedule"] == "cosine":
        if not steps_per_epoch:
            raise ValueError("optim.schedule cosine needs the number of steps per epoch")
        factor = CosineDecay(config["train"]["epochs"] * steps_per_epoch)
    else:
        factor = InverseTimeDecay(o["decay"])
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def images_on_device(batch: dict, device: torch.device, image_size: int, channels_last: bool) -> torch.Tensor:
    if "encoded" in batch:
        images = decode_on_device(batch, image_size, device)
    else:
        images = batch["image"].to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


TARGET_KEYS = ("heatmap", "has_pose", "category", "attributes", "group_heatmap", "group_has_pose")


def targets_on_device(batch: dict, device: torch.device) -> dict:
    return {key: batch[key].to(device, non_blocking=True) for key in TARGET_KEYS if key in batch}


# --- one epoch ---------------------------------------------------------------------------------

def train_one_epoch(model, criterion, optimizer, scheduler, loader, device, epoch: int, step: int, *,
                    config: dict, log=None) -> tuple[dict, int]:
    """Train over one epoch of `loader`. Returns (mean losses and throughput, global step after)."""
    model.train()
    autocast = _autocast(device, config)
    channels_last = config["train"]["channels_last"] and device.type == "cuda"
    image_size = config["model"]["image_size"]
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    n_items, started = 0, time.perf_counter()
    grouped = getattr(unwrap(model), "attention_kind", "single") == "groups"
    bar = tqdm(loader, total=len(loader.dataset), desc=f"epoch {epoch + 1}", disable=not (log and log.main),
               dynamic_ncols=True, mininterval=1.0)
    for batch in bar:
        if grouped:
            unwrap(model).set_pooling_mix(pooling_mix(step, config))
        images = images_on_device(batch, device, image_size, channels_last)
        targets = targets_on_device(batch, device)
        with autocast:
            outputs = model(images)
        loss, parts = criterion(outputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        batch_size = images.shape[0]
        # Kept on the device: reading a value back would wait for the GPU at every step.
        values = torch.stack([loss.detach().float(), parts["category"], parts["attributes"], parts["heatmap"]])
        sums += values.double() * batch_size
        n_items += batch_size
        if log and log.step(epoch, step, values, scheduler.get_last_lr()[0], batch["path"]):
            bar.set_postfix(loss=f"{log.last_loss:.4f}", refresh=False)
    seconds = time.perf_counter() - started
    totals = torch.cat([sums, torch.tensor([n_items], dtype=torch.float64, device=device)])
    if dist.is_initialized():
        dist.all_reduce(totals)
    totals = totals.cpu()
    if not math.isfinite(totals[0].item()):
        raise FloatingPointError(f"epoch {epoch + 1}: the training loss is not finite ({totals[0].item()})")
    means = (totals[:4] / totals[4].clamp(min=1)).tolist()
    stats = {"train_loss": means[0], "train_category_loss": means[1], "train_attribute_loss": means[2],
             "train_heatmap_loss": means[3], "train_images": int(totals[4].item()),
             "train_images_per_second": totals[4].item() / seconds if seconds else math.nan,
             "lr": scheduler.get_last_lr()[0]}
    return stats, step


@torch.inference_mode()
def evaluate(model, criterion, loader, device, *, config: dict) -> dict:
    """Losses and per-item outputs over `loader`: "loss" (and "category_loss", "attribute_loss",
    "heatmap_loss"), "attribute_scores" (N, A) sigmoid probabilities, "attribute_labels" (N, A)
    int8 (-1 unknown), "category_logits" (N, C) or None, "category_labels" (N,), "paths",
    "attention_mse" (mean squared error of Ŝ vs S over the items with a pose, or None),
    "attention_correlation" (Pearson correlation of Ŝ with S over the pixels of the items with a
    pose, or None) and, for the groups model on a loader with group heatmaps,
    "group_attention_correlation" ({group: correlation of its map with its own heatmap}, else None)."""
    model.eval()
    autocast = _autocast(device, config)
    channels_last = config["train"]["channels_last"] and device.type == "cuda"
    image_size = config["model"]["image_size"]
    sums, n_items = torch.zeros(4, dtype=torch.float64), 0
    group_names = getattr(unwrap(model), "group_names", None)
    correlation = CorrelationAccumulator(1)
    group_correlation = CorrelationAccumulator(len(group_names)) if group_names else None
    scores, labels, logits, categories, paths = [], [], [], [], []
    for batch in loader:
        images = images_on_device(batch, device, image_size, channels_last)
        targets = targets_on_device(batch, device)
        with autocast:
            outputs = model(images)
        loss, parts = criterion(outputs, targets)
        n = images.shape[0]
        sums += torch.stack([loss.float(), parts["category"], parts["attributes"], parts["heatmap"]]).cpu().double() * n
        n_items += n
        if outputs["attributes"] is not None:
            scores.append(torch.sigmoid(outputs["attributes"].float()).cpu())
        if outputs["category"] is not None:
            logits.append(outputs["category"].float().cpu())
        if outputs["attention"] is not None:
            correlation.update(outputs["attention"].float(), targets["heatmap"], targets["has_pose"])
        if group_correlation is not None and outputs.get("group_attention") is not None and "group_heatmap" in targets:
            group_correlation.update(outputs["group_attention"].float(), targets["group_heatmap"],
                                     targets["group_has_pose"])
        labels.append(batch["attributes"].to(torch.int8))
        categories.append(batch["category"])
        paths += batch["path"]
    means = (sums / max(n_items, 1)).tolist()
    posed = bool(correlation.sums[0, 0])   # pixels of items with a pose were counted
    return {
        "loss": means[0], "category_loss": means[1], "attribute_loss": means[2], "heatmap_loss": means[3],
        "n_items": n_items,
        "attribute_scores": torch.cat(scores).numpy() if scores else None,
        "attribute_labels": torch.cat(labels).numpy() if labels else np.zeros((0, 0), np.int8),
        "category_logits": torch.cat(logits).numpy() if logits else None,
        "category_labels": torch.cat(categories).numpy() if categories else np.zeros(0, np.int64),
        "paths": paths,
        "attention_mse": correlation.mean_squared_error()[0] if posed else None,
        "attention_correlation": correlation.compute()[0] if posed else None,
        "group_attention_correlation": (dict(zip(group_names, group_correlation.compute()))
                                        if group_correlation is not None and group_correlation.sums[:, 0].any()
                                        else None),
    }


def summarize(result: dict, vocabulary) -> dict:
    """The scalars of an evaluation worth a line in metrics.jsonl (prefixed "val_")."""

    summary = {"val_loss": result["loss"], "val_category_loss": result["category_loss"],
               "val_attribute_loss": result["attribute_loss"], "val_heatmap_loss": result["heatmap_loss"],
               "val_items": result["n_items"]}
    if result["attention_mse"] is not None:
        summary["val_attention_mse"] = result["attention_mse"]
    if result.get("attention_correlation") is not None:
        summary["val_attention_corr"] = result["attention_correlation"]
    for group, value in (result.get("group_attention_correlation") or {}).items():
        summary[f"val_attention_corr/{group}"] = value
    if result["attribute_scores"] is not None and result["n_items"]:
        metrics = compute_metrics(result["attribute_scores"], result["attribute_labels"], vocabulary,
                                  result["category_logits"], result["category_labels"])
        for key in ("P@k", "R@k", "F1@k", "AP", "category_top1", "category_top5"):
            if key in metrics:
                summary[f"val_{key}"] = metrics[key]
        for k in (3, 5):
            summary[f"val_top{k}_recall"] = metrics[f"top{k}_recall"]["all"]
            for group, value in metrics[f"top{k}_recall"].items():
                if group != "all":
                    summary[f"val_top{k}_recall/{group}"] = value
        if "group_top1" in metrics:
            summary["val_group_top1"] = metrics["group_top1"].get("mean")
    elif result["category_logits"] is not None and result["n_items"]:
        summary.update({f"val_{k}": v for k, v in
                        category_accuracy(result["category_logits"], result["category_labels"]).items()})
    return summary


def _autocast(device: torch.device, config: dict):
    if device.type == "cuda" and config["train"]["amp"]:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# --- logging -----------------------------------------------------------------------------------

class RunLog:
    """metrics.jsonl, steps.jsonl, TensorBoard (rank 0) and items/rank-R.jsonl (every rank)."""

    def __init__(self, run_dir: Path, rank: int, config: dict, resumed_step: int, resumed_epoch: int):
        self.run_dir, self.main = run_dir, rank == 0
        self.log_every = max(1, int(config["train"]["log_every"]))
        self.items_path = run_dir / "items" / f"rank-{rank}.jsonl" if config["train"]["log_items"] else None
        self.writer = None
        self.last_loss = math.nan
        # A resumed run repeats what followed its checkpoint: drop those lines first.
        if self.items_path:
            self.items_path.parent.mkdir(parents=True, exist_ok=True)
            _truncate_jsonl(self.items_path, lambda r: r["epoch"] <= resumed_epoch)
        if self.main:
            _truncate_jsonl(run_dir / "metrics.jsonl", lambda r: r["epoch"] <= resumed_epoch)
            _truncate_jsonl(run_dir / "steps.jsonl", lambda r: r["step"] <= resumed_step)
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resumed_step or None)

    def step(self, epoch: int, step: int, values: torch.Tensor, lr: float, paths: list[str]) -> bool:
        """Log one optimizer step; True when it was a logged step (its values were read back)."""
        if self.items_path:
            _append_jsonl(self.items_path, {"epoch": epoch + 1, "step": step, "paths": list(paths)})
        if not self.main or step % self.log_every:
            return False
        loss, category, attributes, heatmap = values.tolist()
        if not math.isfinite(loss):
            raise FloatingPointError(f"epoch {epoch + 1} step {step}: the loss is {loss}")
        self.last_loss = loss
        record = {"epoch": epoch + 1, "step": step, "loss": loss, "category_loss": category,
                  "attribute_loss": attributes, "heatmap_loss": heatmap, "lr": lr}
        _append_jsonl(self.run_dir / "steps.jsonl", record)
        for key in ("loss", "category_loss", "attribute_loss", "heatmap_loss", "lr"):
            self.writer.add_scalar(f"step/{key}", record[key], step)
        return True

    def epoch(self, record: dict) -> None:
        if not self.main:
            return
        _append_jsonl(self.run_dir / "metrics.jsonl", record)
        for key, value in record.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)) and value is not None:
                self.writer.add_scalar(f"epoch/{key}", value, record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def _append_jsonl(path: Path, record: dict) -> None:
    """One strict-JSON line: a diverged loss or an undefined metric is written as null, never as NaN, which
    jq, pandas' strict readers and JSON.parse refuse."""
    line = json.dumps(without_nan(record), allow_nan=False)
    with reporting_disk_full(path), open(path, "a") as f:   # a line cut by a full disk is dropped on --resume
        f.write(line + "\n")


def _truncate_jsonl(path: Path, keep) -> None:
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            if keep(json.loads(line)):
                kept.append(line)
        except json.JSONDecodeError:   # a line cut by a kill
            continue
    atomic_write_text(path, "".join(line + "\n" for line in kept))   # a full disk leaves the file as it was


# --- checkpoints -------------------------------------------------------------------------------

def checkpoint_state(model, optimizer, scheduler, epoch: int, step: int, config: dict, stream: ShardStream,
                     record: dict | None = None) -> dict:
    """What a checkpoint holds (checkpoint.py's docstring); `record`: the epoch's metrics.jsonl line,
    whose val_* figures travel with the weights (plain floats: numpy scalars would not load with
    weights_only=True)."""
    figures = stored_figures({key: value for key, value in (record or {}).items() if key.startswith("val_")})
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": epoch, "step": step, "rng": rng_states(), "config": config, "world_size": stream.world_size,
            "vocabulary": stream.vocabulary.to_json(), "model_name": config["model"]["name"],
            "image_size": config["model"]["image_size"], "heatmap": json.dumps(stream.info.heatmap),
            "val_metrics": figures}


def check_world_size(state: dict, world_size: int, batch_size: int, path: Path) -> None:
    """A resumed run must have the processes of the run it continues: with others, the global batch
    (train.batch_size per process), each process's share of the data and the order of the items
    would change, so it would neither compute what the run computed nor what its config says.
    Checkpoints written before the world size was recorded are taken as they are."""
    saved = state.get("world_size")
    if saved is None or int(saved) == world_size:
        return
    saved = int(saved)
    raise ConfigError(f"--resume: {path} was trained by {saved} process{'es' if saved > 1 else ''} (global batch "
                      f"{saved * batch_size}); this run has {world_size} (global batch {world_size * batch_size}). "
                      f"Resume it with as many processes (torchrun --nproc_per_node, times nodes: {saved} in all)"
                      + ("" if saved > 1 else ", that is without torchrun") + ", or train a new run into another --out")


def write_checkpoints(folder: Path, state: dict, keep_epoch: bool) -> Path:
    """checkpoints/epoch-NNN.pt (when kept) and checkpoints/last.pt, both atomic."""
    last = folder / "last.pt"
    if not keep_epoch:
        save_checkpoint(last, state)
        return last
    epoch_path = folder / f"epoch-{state['epoch']:03d}.pt"
    save_checkpoint(epoch_path, state)
    link = folder / ".last.pt.link"
    try:   # the same bytes under a second name without writing them twice
        link.unlink(missing_ok=True)
        os.link(epoch_path, link)
        os.replace(link, last)
    except OSError:
        save_checkpoint(last, state)
    return last


# --- main --------------------------------------------------------------------------------------

def main(config: dict, shards: str | Path, out: str | Path, *, resume: bool = False, device: str | None = None) -> dict:
    """Train as `config` says on the shard collection `shards`, into the run folder `out`.
    Returns {"run_dir", "checkpoint", "epochs": [metrics.jsonl records of this process's run],
    "epochs_done"}; on ranks other than 0, "epochs" is empty."""
    device_kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if config["data"]["decode"] == "gpu" and device_kind != "cuda":
        raise ConfigError("data.decode: gpu needs --device cuda")
    run_dir = Path(out)
    if _is_rank_zero():
        _check_is_run_folder(run_dir)
    with _run_folder_lock(run_dir):
        if _is_rank_zero():
            _check_run_folder(run_dir, resume)
            _remove_leftover_temporaries(run_dir)
        # Process-wide settings this run changes; restored for a caller that goes on (tests, notebooks).
        threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
        if config["train"]["cpu_threads"]:
            torch.set_num_threads(int(config["train"]["cpu_threads"]))
        try:
            # A full disk names the file where it can (checkpoints, config, logs), else the folder (TensorBoard).
            with reporting_disk_full(run_dir):
                return _train(config, shards, run_dir, resume, device_kind)
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic)


def _is_rank_zero() -> bool:
    """Rank 0 of a torchrun job, or a plain process (before the process group exists)."""
    return int(os.environ.get("RANK", "0")) == 0


def _run_folder_lock(run_dir: Path):
    """The run folder's lock, held by rank 0 for the run's life (raises lock.Busy at once). The
    other ranks of a torchrun job belong to rank 0's run: a second job's rank 0 stops, and torchrun
    stops its other ranks (a lock per rank could not tell two jobs apart)."""
    if not _is_rank_zero():
        return nullcontext()
    run_dir.mkdir(parents=True, exist_ok=True)
    return lock.exclusive(run_dir, lock.TRAIN_LOCK_NAME, "vsam train")


def _check_is_run_folder(run_dir: Path) -> None:
    """Refuse a non-empty folder that no run made, before the lock file and logs go into it."""
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    if not any((run_dir / name).exists() for name in RUN_FOLDER_MARKS):
        raise NotARunFolder(f"--out {run_dir} holds files but is not a vsam run folder (no "
                            f"{', '.join(RUN_FOLDER_MARKS)}): choose a new or empty folder")


def _check_run_folder(run_dir: Path, resume: bool) -> None:
    """Without --resume, refuse a folder that holds a run, also one killed before its first checkpoint."""
    if resume:
        return
    last = run_dir / "checkpoints" / "last.pt"
    if last.exists():
        raise RunFolderError(f"{run_dir} already holds a run ({last}); pass --resume to continue it or choose "
                             "another --out")
    started = run_dir / "config.yaml"
    if started.exists():
        raise RunFolderError(f"{run_dir} already holds a run that wrote no checkpoint yet ({started}); pass "
                             "--resume to start it over or choose another --out")


def _remove_leftover_temporaries(run_dir: Path) -> None:
    """Temporary files of writes a killed run left (pose_prep.atomic: one per writer, so nothing
    else would ever reuse them). Safe only under the run folder's lock: no other writer exists."""
    checkpoint_dir = run_dir / "checkpoints"
    leftovers = [*checkpoint_dir.glob(".*.tmp"), checkpoint_dir / ".last.pt.link",
                 *temporary_files(run_dir / "config.yaml")]
    for path in leftovers:
        path.unlink(missing_ok=True)


def _train(config: dict, shards, run_dir: Path, resume: bool, device_kind: str) -> dict:
    t, d = config["train"], config["data"]
    checkpoint_dir = run_dir / "checkpoints"
    last = checkpoint_dir / "last.pt"
    rank, world_size, device = setup_distributed(device_kind)
    seed_everything(t["seed"], t["deterministic"])

    group_joints = group_joints_for(config, read_collection(shards).vocabulary)
    train_stream = ShardStream(shards, d["train_split"], image_size=config["model"]["image_size"],
                               batch_size=t["batch_size"], train=True, augment=d["augment"], seed=t["seed"],
                               rank=rank, world_size=world_size, shuffle_buffer=d["shuffle_buffer"],
                               decode=d["decode"], max_batches=t["max_steps_per_epoch"], group_joints=group_joints,
                               heatmap_joints=d["heatmap_joints"], heatmap_sigma=d["heatmap_sigma"])
    vocabulary = train_stream.vocabulary
    val_loader = None
    if rank == 0 and d["val_split"]:
        val_stream = ShardStream(shards, d["val_split"], image_size=config["model"]["image_size"],
                                 batch_size=d["eval_batch_size"] or t["batch_size"], train=False,
                                 decode=d["decode"], max_batches=d["max_val_batches"],
                                 group_joints=group_joints, heatmap_joints=d["heatmap_joints"],
                                 heatmap_sigma=d["heatmap_sigma"])
        if val_stream.n_items:
            val_loader = make_loader(val_stream, d["num_workers"], pin_memory=device.type == "cuda")

    model = build_model(config, vocabulary).to(device)
    if t["channels_last"] and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(model, config, len(train_stream))
    criterion = VsamLoss.from_config(config["loss"])
    start_epoch, step = 0, 0
    if resume and last.exists():
        state = load_checkpoint(last, map_location=device)
        check_world_size(state, world_size, t["batch_size"], last)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch, step = int(state["epoch"]), int(state["step"])
            restore_rng_states(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{last}: does not fit this run's model and config ({error})") from None

    if rank == 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    trained = model
    if world_size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if t["compile"]:
        trained = torch.compile(trained)
    log = RunLog(run_dir, rank, config, step, start_epoch)
    train_loader = make_loader(train_stream, d["num_workers"], pin_memory=device.type == "cuda")
    records = []
    try:
        for epoch in range(start_epoch, t["epochs"]):
            train_stream.set_epoch(epoch)
            # Dropout masks from (seed, epoch, rank): the same after a resume, different per rank.
            torch.manual_seed(int(np.random.SeedSequence([t["seed"], epoch, rank]).generate_state(1)[0]))
            stats, step = train_one_epoch(trained, criterion, optimizer, scheduler, train_loader, device, epoch,
                                          step, config=config, log=log)
            record = {"epoch": epoch + 1, "step": step, "world_size": world_size, **stats}
            if val_loader is not None:
                record.update(summarize(evaluate(model, criterion, val_loader, device, config=config), vocabulary))
            if rank == 0:
                write_checkpoints(checkpoint_dir, checkpoint_state(model, optimizer, scheduler, epoch + 1, step,
                                                                   config, train_stream, record),
                                  t["keep_epoch_checkpoints"])
                log.epoch(record)
                records.append(record)
            if dist.is_initialized():
                dist.barrier()
    finally:
        log.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    return {"run_dir": str(run_dir), "checkpoint": str(last), "epochs": records, "epochs_done": t["epochs"]}
