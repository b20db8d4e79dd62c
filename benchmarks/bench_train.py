"""Training throughput of VSAM and plain VGG16 on the same shard data, and their ratio.

    .venv/bin/python benchmarks/bench_train.py --shards /tmp/vsam/df-shards            # tiny, CPU
    python3 benchmarks/bench_train.py --shards S --config configs/paper.yaml --device cuda \
        --batch-size 64 --steps 50 [--compile] [--decode gpu]                         # full size, GPU

Three figures per model, all images per second:

* pipeline: shards → loader workers → device → forward, backward, Adam step (what `vsam train` does);
* model: the same training step on one batch kept on the device (no loader);
* loader: the loader alone (once; both models read the same batches), printed for context.

The machine may be shared and noisy: the models are measured in alternating rounds and each keeps its
best round; the ratio vsam / vgg16 is the figure to read.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vsam_train.config import ConfigError, load_config, parse_assignments  # noqa: E402
from vsam_train.data import ShardStream, make_loader  # noqa: E402
from vsam_train.fast import synchronize  # noqa: E402
from vsam_train.losses import VsamLoss  # noqa: E402
from vsam_train.train import (_autocast, build_model, build_optimizer, images_on_device,  # noqa: E402
                              targets_on_device)

MODELS = ("vsam", "vgg16")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, type=Path)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "tiny.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--decode", choices=["cpu", "gpu"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="any config value, e.g. --set model.width=0.25 (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    try:
        args.settings = parse_assignments(args.assignments)
        make_config(args)              # a config it cannot use: a usage error now, not a traceback later
    except ConfigError as error:
        parser.error(str(error))
    return args


def make_config(args) -> dict:
    overrides = {"train.compile": args.compile}
    for key, value in (("train.batch_size", args.batch_size), ("data.num_workers", args.workers),
                       ("data.decode", args.decode)):
        if value is not None:
            overrides[key] = value
    return load_config(args.config, {**overrides, **args.settings})


class Batches:
    """An endless stream of training batches from the shards (epoch after epoch)."""

    def __init__(self, config: dict, shards: Path):
        d = config["data"]
        self.stream = ShardStream(shards, d["train_split"], image_size=config["model"]["image_size"],
                                  batch_size=config["train"]["batch_size"], train=True, augment=d["augment"],
                                  shuffle_buffer=d["shuffle_buffer"], decode=d["decode"])
        self.loader = make_loader(self.stream, d["num_workers"], pin_memory=torch.cuda.is_available())
        self.epoch, self.iterator = 0, iter(self.loader)

    def next(self) -> dict:
        try:
            return next(self.iterator)
        except StopIteration:
            self.epoch += 1
            self.stream.set_epoch(self.epoch)
            self.iterator = iter(self.loader)
            return next(self.iterator)


class Trainer:
    def __init__(self, name: str, config: dict, vocabulary, device: torch.device):
        config = {**config, "model": {**config["model"], "name": name}}
        self.config, self.device = config, device
        self.channels_last = config["train"]["channels_last"] and device.type == "cuda"
        model = build_model(config, vocabulary).to(device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.optimizer, self.scheduler = build_optimizer(model, config)
        self.model = torch.compile(model) if config["train"]["compile"] else model
        self.criterion = VsamLoss.from_config(config["loss"])
        self.autocast = _autocast(device, config)

    def on_device(self, batch: dict) -> tuple[torch.Tensor, dict]:
        images = images_on_device(batch, self.device, self.config["model"]["image_size"], self.channels_last)
        return images, targets_on_device(batch, self.device)

    def step(self, images: torch.Tensor, targets: dict) -> None:
        with self.autocast:
            outputs = self.model(images)
        loss, _ = self.criterion(outputs, targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()


def timed(device: torch.device, steps: int, images_per_step: int, work) -> float:
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        work()
    synchronize(device)
    return steps * images_per_step / (time.perf_counter() - started)


def main(argv=None) -> dict:
    args = parse_args(argv)
    config = make_config(args)
    if config["train"]["cpu_threads"]:
        torch.set_num_threads(int(config["train"]["cpu_threads"]))
    device = torch.device(args.device)
    torch.manual_seed(0)
    batches = Batches(config, args.shards)
    trainers = {name: Trainer(name, config, batches.stream.vocabulary, device) for name in MODELS}
    size = config["train"]["batch_size"]
    fixed = {name: trainer.on_device(batches.next()) for name, trainer in trainers.items()}
    best = {name: {"pipeline": 0.0, "model": 0.0} for name in MODELS}
    loader = 0.0
    for _ in range(args.rounds):
        loader = max(loader, timed(torch.device("cpu"), args.steps, size, batches.next))
        for name, trainer in trainers.items():
            for _ in range(args.warmup):
                trainer.step(*trainer.on_device(batches.next()))
            best[name]["pipeline"] = max(best[name]["pipeline"], timed(
                device, args.steps, size, lambda: trainer.step(*trainer.on_device(batches.next()))))
            best[name]["model"] = max(best[name]["model"], timed(
                device, args.steps, size, lambda: trainer.step(*fixed[name])))
    m = config["model"]
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "width": m["width"], "image_size": m["image_size"],
              "batch_size": size, "workers": config["data"]["num_workers"], "decode": config["data"]["decode"],
              "compile": config["train"]["compile"], "steps": args.steps, "rounds": args.rounds,
              "loader_images_per_s": loader,
              **{f"{name}_{kind}_images_per_s": best[name][kind] for name in MODELS for kind in ("pipeline", "model")},
              "ratio_pipeline": best["vsam"]["pipeline"] / best["vgg16"]["pipeline"],
              "ratio_model": best["vsam"]["model"] / best["vgg16"]["model"]}
    print(f"device {result['device']}, width {m['width']}, {m['image_size']} px, batch {size}, "
          f"{result['workers']} workers, decode {result['decode']}, compile {result['compile']}")
    print(f"{'':8}{'pipeline img/s':>16}{'model img/s':>14}")
    for name in MODELS:
        print(f"{name:8}{best[name]['pipeline']:16.1f}{best[name]['model']:14.1f}")
    print(f"{'ratio':8}{result['ratio_pipeline']:16.3f}{result['ratio_model']:14.3f}   (vsam / vgg16)")
    print(f"loader alone: {loader:.1f} img/s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
