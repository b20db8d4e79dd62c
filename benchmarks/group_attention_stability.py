"""Do the attribute-group maps learn, seed after seed? An ablation of the groups model's stability choices.

    .venv/bin/python benchmarks/group_attention_stability.py --shards SHARDS --seeds 3 --epochs 6 \
        --json benchmarks/results/group_attention_stability_cpu.json

Each variant is trained by `vsam_train.train.main` on the same shards, config and seeds (the tiny
config unless --config says otherwise); after the last epoch the validation split gives each group
map's correlation with its own group heatmap (`val_attention_corr/<group>`) and the mean group
top-1 accuracy. A map "learned" when its correlation exceeds --learned (0.2). Variants:

* groups: the defaults: per-group 1×1 projection + the paper's [mean, max] → 7×7 → sigmoid,
  maps starting flat at the prior, each map's heatmap term weighted by λ
  (loss.group_heatmap_reduction: sum), pooling under the maps from the first step;
* groups-warmup: attribute pooling moves from uniform to the maps over the first epoch (46 steps);
* groups-mean: the maps' heatmap terms averaged (λ shared by all maps);
* groups-kaiming: the 7×7 conv Kaiming-initialised with a zero bias (maps start around 0.5 with
  structure, as every other conv of the model is initialised);
* conv3x3: the prototype of the issue: one sigmoid map per group straight from a 3×3 conv of the
  combined features (Kaiming);
* vsam: the single whole-body Ŝ, for reference (its one correlation is against the whole body);
* (--variants only) groups-long-warmup: 3 epochs of warm-up; groups-detached: the attribute
  pooling does not back-propagate into the maps (they learn from their heatmaps and block 5 only).

On a CPU this runs at tiny scale; the figures say whether a choice matters there, not on a GPU at
full size.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import vsam_train.train as training  # noqa: E402
from vsam_train.config import ConfigError, load_config, parse_assignments  # noqa: E402
from vsam_train.models.heads import init_from_scratch  # noqa: E402

VARIANTS = ("groups", "groups-warmup", "groups-mean", "groups-kaiming", "conv3x3", "vsam")
# Config changes of the groups model (the code changes are in `modify`); more with --variants.
EXTRA = {
    "groups-warmup": {"model.group_warmup_steps": 46},             # one epoch of 1500 items at batch 32
    "groups-mean": {"loss.group_heatmap_reduction": "mean"},      # λ shared by the maps instead of λ each
    "groups-long-warmup": {"model.group_warmup_steps": 3 * 46},
    "groups-detached": {},                                       # attribute pooling does not train the maps
}


class Conv3x3Maps(nn.Module):
    """The prototype's maps: sigmoid of a 3×3 conv, one output channel per group."""

    def __init__(self, in_channels: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, groups, kernel_size=3, padding=1)

    def forward(self, x):
        return torch.sigmoid(self.conv(x))


def _detached_pooling(model: nn.Module) -> None:
    pooled = model._group_pooled_attributes
    model._group_pooled_attributes = lambda features, maps: pooled(features, maps.detach())


def modify(model: nn.Module, variant: str) -> nn.Module:
    if variant == "groups-detached":
        _detached_pooling(model)
    if variant == "groups-kaiming":
        init_from_scratch(model.attention)
    elif variant == "conv3x3":
        model.attention = Conv3x3Maps(model.combine.out_channels, len(model.group_names))
        init_from_scratch(model.attention)
    return model


def run_one(variant: str, seed: int, args) -> dict:
    overrides = {"train.seed": seed, "train.epochs": args.epochs, "data.num_workers": args.workers,
                 "data.max_val_batches": None, "train.max_steps_per_epoch": None, "train.keep_epoch_checkpoints": False}
    if variant != "vsam":
        overrides["model.attention"] = "groups"
    overrides.update(EXTRA.get(variant, {}))
    config = load_config(args.config, {**overrides, **args.settings})
    build = training.build_model
    training.build_model = lambda c, v: modify(build(c, v), variant)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as folder:
            summary = training.main(config, args.shards, Path(folder) / "run", device="cpu")
    finally:
        training.build_model = build
    last = summary["epochs"][-1]
    correlations = {key.split("/", 1)[1]: value for key, value in last.items() if key.startswith("val_attention_corr/")}
    if not correlations and "val_attention_corr" in last:
        correlations = {"body": last["val_attention_corr"]}
    return {"variant": variant, "seed": seed, "steps": last["step"], "seconds": time.perf_counter() - started,
            "correlations": correlations, "group_top1": last.get("val_group_top1"),
            "train_loss": [e["train_loss"] for e in summary["epochs"]]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, type=Path)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "tiny.yaml")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--learned", type=float, default=0.2, help="correlation above which a map counts as learned")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    try:
        args.settings = parse_assignments(args.assignments)
        load_config(args.config, args.settings)   # a config it cannot use: a usage error now, not a traceback later
    except ConfigError as error:
        parser.error(str(error))
    runs = []
    for variant in args.variants.split(","):
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            runs.append(run_one(variant, seed, args))
            r = runs[-1]
            print(f"{variant:17s} seed {seed}: group top-1 {r['group_top1']:.3f}  correlations "
                  + " ".join(f"{g} {c:.2f}" for g, c in r["correlations"].items()) + f"  ({r['seconds']:.0f} s)",
                  flush=True)
    print(f"\n{'variant':17s} {'maps learned':>12s} {'min corr':>9s} {'mean corr':>10s} {'group top-1':>16s}")
    table = {}
    for variant in args.variants.split(","):
        mine = [r for r in runs if r["variant"] == variant]
        values = np.array([list(r["correlations"].values()) for r in mine], dtype=float)
        top1 = np.array([r["group_top1"] for r in mine], dtype=float)
        table[variant] = {"maps_learned": int((values > args.learned).sum()), "maps": int(values.size),
                          "min_correlation": float(np.nanmin(values)), "mean_correlation": float(np.nanmean(values)),
                          "group_top1_mean": float(top1.mean()), "group_top1_std": float(top1.std())}
        t = table[variant]
        print(f"{variant:17s} {t['maps_learned']:>5d} of {t['maps']:<4d} {t['min_correlation']:9.2f} "
              f"{t['mean_correlation']:10.2f} {t['group_top1_mean']:10.3f} ± {t['group_top1_std']:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": str(args.config), "shards": str(args.shards), "epochs": args.epochs,
                                         "seeds": args.seeds, "learned_threshold": args.learned,
                                         "settings": args.assignments, "summary": table, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
