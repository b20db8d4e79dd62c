"""Shared fixtures. Real data lives beside the repository in ../shared/data (read-only, never copied)."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """/work/shared/data: DeepFashion images, keypoint sets (see ../shared/README.md)."""
    assert SHARED_DATA.is_dir(), f"real test data missing: {SHARED_DATA} (see ../shared/README.md)"
    return SHARED_DATA


@pytest.fixture(scope="session")
def auto_detector():
    """The real `auto` detector (BlazePose, then YOLO), built once per test session."""
    from pose_prep.detectors import make_detector

    return make_detector("auto")


@pytest.fixture(scope="session")
def blazepose_detector(auto_detector):
    """Real BlazePose (the instance inside `auto_detector`: one model load per session)."""
    return auto_detector.blazepose


@pytest.fixture(scope="session")
def yolo_detector(auto_detector):
    """Real YOLO11n-pose (the instance inside `auto_detector`)."""
    assert auto_detector.yolo is not None, "the yolo extra is part of the test environment"
    return auto_detector.yolo


def _write_attr_challenge_subset(source: Path, folder: Path, counts: dict[str, int]) -> None:
    """The first `counts[split]` labelled images of each split of ../shared/data/deepfashion-attr,
    copied with their label rows into `folder` in the same attribute-challenge layout."""
    (folder / "img").mkdir(parents=True)
    (folder / "split").mkdir()
    (folder / "split" / "list_attr_cloth.txt").write_bytes((source / "split" / "list_attr_cloth.txt").read_bytes())
    for split, count in counts.items():
        names = (source / "split" / f"{split}.txt").read_text().split()[:count]
        rows = (source / "split" / f"{split}_attr.txt").read_text().splitlines()[:count]
        for name in names:
            (folder / name).write_bytes((source / name).read_bytes())
        (folder / "split" / f"{split}.txt").write_text("\n".join(names) + "\n")
        (folder / "split" / f"{split}_attr.txt").write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="session")
def df_shards(tmp_path_factory, shared_data) -> Path:
    """A real shard collection built by `pose_prep.prep` (BlazePose) from 96 train and 24 val
    images of DeepFashion-attr with their labels, stored at 128 px, 40 items per shard (3 train
    shards). Read-only for tests: copy it before changing anything."""
    from pose_prep.prep import PrepOptions, run

    root = tmp_path_factory.mktemp("df-shards")
    images = root / "deepfashion-attr"
    _write_attr_challenge_subset(shared_data / "deepfashion-attr", images, {"train": 96, "val": 24})
    out = root / "shards"
    report = run(PrepOptions(images=images, labels=images, out=out, shard_size=40, max_side=128, progress=False))
    assert report.exit_code == 0, report
    return out


@pytest.fixture
def one_torch_thread():
    """Tiny models on a busy 2-core machine: one intra-op thread avoids OpenMP oversubscription
    (which makes a 30 ms step take seconds); the previous setting is restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _train_tiny(shards: Path, out: Path, model: str, epochs: int) -> Path:
    import torch

    from vsam_train.config import load_config
    from vsam_train.train import main

    previous = torch.get_num_threads()
    config = load_config(REPO_ROOT / "configs" / "tiny.yaml",
                         {"model.name": model, "train.epochs": epochs, "train.batch_size": 16,
                          "data.num_workers": 0, "data.max_val_batches": 1})
    try:
        return Path(main(config, shards, out, device="cpu")["checkpoint"])
    finally:
        torch.set_num_threads(previous)   # tiny.yaml's train.cpu_threads sets 1


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, df_shards) -> Path:
    """checkpoints/last.pt of a tiny VSAM (configs/tiny.yaml, 64 px) trained for 2 epochs (12 steps)
    on `df_shards`: for the eval, predict, explain and export tests. Read-only."""
    return _train_tiny(df_shards, tmp_path_factory.mktemp("tiny-vsam") / "run", "vsam", 2)


@pytest.fixture(scope="session")
def tiny_baseline_checkpoint(tmp_path_factory, df_shards) -> Path:
    """The same for the VGG16 baseline (no attention branch), 1 epoch. Read-only."""
    return _train_tiny(df_shards, tmp_path_factory.mktemp("tiny-vgg16") / "run", "vgg16", 1)


@pytest.fixture(scope="session")
def df_val_images(tmp_path_factory, df_shards) -> Path:
    """The val split of `df_shards` as image files: each item's stored JPEG bytes (the very pixels
    `vsam eval` sees) under its relative source path. Read-only."""
    from pose_prep.shard_format import Shard, live_rows

    folder = tmp_path_factory.mktemp("df-val-images")
    for shard_path, rows in live_rows(df_shards, ("val",)).items():
        with Shard(shard_path) as shard:
            paths = shard.read(("path",))["path"]
            for row in rows:
                target = folder / paths[row]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(shard.image(int(row)))
    return folder


@pytest.fixture(scope="session")
def category_shards(tmp_path_factory, df_shards) -> Path:
    """A real collection with categories (Jacket, Dress) and attributes (floral, long sleeve) in the
    DeepFashion benchmark format, built by `pose_prep.prep` from 56 of `df_shards`' photos: 40 train,
    16 val (tests/category_collection.py has the labels). Read-only."""
    import category_collection

    return category_collection.build(tmp_path_factory.mktemp("category-collection"), df_shards)


@pytest.fixture(scope="session")
def tiny_category_checkpoint(tmp_path_factory, category_shards) -> Path:
    """checkpoints/last.pt of a tiny VSAM with a category head trained 1 epoch on `category_shards`. Read-only."""
    return _train_tiny(category_shards, tmp_path_factory.mktemp("tiny-category") / "run", "vsam", 1)
