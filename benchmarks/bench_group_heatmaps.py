"""What rendering the attribute-group heatmaps in the loader costs, and what storing them would.

    .venv/bin/python benchmarks/bench_group_heatmaps.py --shards /tmp/vsam/df-shards

Over the live items of a shard collection (their stored keypoints, width and height), with the
groups of its vocabulary and the default `model.group_joints`:

* render: `groups.render_group_heatmaps` of every group (groups with the same joints rendered once),
  and the naive one render per group, in ms per item;
* warp: the same flip and crop as the stored heatmap (`data.group_heatmap_targets`), ms per item;
* loader: a ShardStream's items/s on one process (decode, augment, collate) without and with the
  group heatmaps, and their ratio: the share of a worker's time the groups take;
* storing them instead: the bytes per item the group maps would add to a shard (uint8, lzf as the
  stored heatmap), against the bytes per item the shard holds now.

Per-item figures are the best of `--rounds` rounds (the machine may be shared and noisy).
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pose_prep.heatmaps import render, to_uint8  # noqa: E402
from pose_prep.shard_format import Shard, live_rows  # noqa: E402
from vsam_train.config import DEFAULTS  # noqa: E402
from vsam_train.data import (ShardStream, draw_augmentation, group_heatmap_targets, heatmap_geometry,  # noqa: E402
                             make_loader, read_collection)
from vsam_train.groups import group_plan, render_group_heatmaps  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, type=Path)
    parser.add_argument("--split", default="train")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args(argv)


def stored_poses(folder: Path, split: str) -> tuple[list, int]:
    """[(keypoints, width, height)] of the split's live items, and the bytes per item of the shards."""
    poses, n_items, n_bytes = [], 0, 0
    for shard_path, rows in live_rows(folder, (split,)).items():
        with Shard(shard_path) as shard:
            data = shard.read(("keypoints", "width", "height"))
            n_items += len(shard)
        n_bytes += shard_path.stat().st_size
        poses += [(data["keypoints"][r], int(data["width"][r]), int(data["height"][r])) for r in rows]
    return poses, n_bytes // max(n_items, 1)


def best_ms_per_item(work, items, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for item in items:
            work(item)
        best = min(best, (time.perf_counter() - started) / len(items))
    return best * 1e3


def loader_items_per_second(folder, split, image_size, batch_size, joints, rounds) -> float:
    best = 0.0
    for _ in range(rounds):
        stream = ShardStream(folder, split, image_size=image_size, batch_size=batch_size, train=True,
                             augment=DEFAULTS["data"]["augment"], group_joints=joints)
        started, n = time.perf_counter(), 0
        for batch in make_loader(stream, num_workers=0):
            n += len(batch["path"])
        best = max(best, n / (time.perf_counter() - started))
    return best


def stored_bytes_per_item(maps: np.ndarray) -> float:
    """Bytes per item of the group maps written as the shards write heatmaps (uint8, lzf chunks of 64)."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f.create_dataset("group_heatmaps", data=maps, compression="lzf", chunks=(min(len(maps), 64), *maps.shape[1:]))
    return len(buffer.getvalue()) / len(maps)


def main(argv=None) -> None:
    args = parse_args(argv)
    info = read_collection(args.shards)
    plan = group_plan(info.vocabulary.attribute_groups, DEFAULTS["model"]["group_joints"])
    joints = list(plan.joints)
    size, sigma = heatmap_geometry(info)
    poses, shard_bytes = stored_poses(args.shards, args.split)
    print(f"{len(poses)} items of {args.shards} ({args.split}), {len(plan.names)} groups: "
          f"{', '.join(plan.names)}; {len(set(j for j in joints if j))} distinct joint sets; heatmaps {size}, σ {sigma}")

    grouped = best_ms_per_item(lambda p: render_group_heatmaps(*p, joints, size, sigma), poses, args.rounds)
    naive = best_ms_per_item(lambda p: [render(p[0], (p[1], p[2]), size=size, sigma=sigma, joints=j)
                                        for j in joints if j], poses, args.rounds)
    rng = np.random.default_rng(0)
    rendered = [render_group_heatmaps(*p, joints, size, sigma) for p in poses]
    params = [draw_augmentation(rng, dict(DEFAULTS["data"]["augment"], p=1.0)) for _ in poses]
    grid = args.image_size // 4
    warp = best_ms_per_item(lambda i: group_heatmap_targets(rendered[i], params[i], grid), range(len(poses)),
                            args.rounds)
    print(f"render: {grouped:.3f} ms/item for all {len(joints)} groups ({naive:.3f} ms rendering each group "
          f"separately); warp (flip + crop to {grid}×{grid}): {warp:.3f} ms/item")

    plain = loader_items_per_second(args.shards, args.split, args.image_size, args.batch_size, None, args.rounds)
    with_groups = loader_items_per_second(args.shards, args.split, args.image_size, args.batch_size, joints,
                                          args.rounds)
    print(f"loader, one process, {args.image_size} px: {plain:.0f} items/s without group heatmaps, "
          f"{with_groups:.0f} with them: ratio {with_groups / plain:.2f} "
          f"({1e3 / with_groups - 1e3 / plain:.2f} ms/item more)")

    stored = stored_bytes_per_item(np.stack([to_uint8(m) for m in rendered]))
    print(f"storing them instead: +{stored:.0f} bytes/item (uint8, lzf) on {shard_bytes} bytes/item now "
          f"(+{100 * stored / shard_bytes:.1f} %), a new shard schema version, and a re-prep for every change "
          "of model.group_joints")


if __name__ == "__main__":
    main()
