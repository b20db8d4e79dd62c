"""Shared fixtures. The default suite reads only the fixture set in tests/data (see tests/fixture_set.py and
tests/data/SOURCES.md) and files the tests create. Tests marked `realdata` read the large research-only sets
in ../shared/data, or in the folder VSAM_SHARED_DATA names (read-only, never copied): `make test-data`."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import fixture_set

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("VSAM_SHARED_DATA") or REPO_ROOT.parent / "shared" / "data")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """A test that reads ../shared/data is a real-data test, marked or not: `-m "not realdata"` (the
    default, see setup.cfg) leaves it out. Runs before the marker selection."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("realdata"):
            item.add_marker(pytest.mark.realdata)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data or $VSAM_SHARED_DATA: DeepFashion images, keypoint sets (see ../shared/README.md).
    Only for tests marked `realdata`; asked for and absent, they fail (never skip)."""
    assert SHARED_DATA.is_dir(), (f"the real-data suite needs {SHARED_DATA} (deepfashion-attr/, deepfashion-anno/, "
                                  "keypoints/): put ../shared/data beside the repository or set VSAM_SHARED_DATA")
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


@pytest.fixture(scope="session")
def df_source(tmp_path_factory) -> Path:
    """The attribute-challenge folder `df_shards` is built from (img/ and split/): the 32 train and 8
    val photos of the fixture set, each three ways (as taken, mirrored, cropped to its label box:
    distinct images, the photo's labels), so 96 train and 24 val images. Read-only."""
    folder = tmp_path_factory.mktemp("df-source") / "deepfashion-attr"
    fixture_set.write_attr_challenge_variants(folder, ("train", "val"))
    return folder


@pytest.fixture(scope="session")
def df_shards(tmp_path_factory, df_source) -> Path:
    """A real shard collection built by `pose_prep.prep` (real BlazePose: a third of the items show a
    person it finds) from `df_source` with its labels (26 attributes in 6 groups): 96 train and 24 val
    images, stored at 128 px, 40 items per shard (3 train shards). Read-only for tests: copy it
    before changing anything."""
    from pose_prep.prep import PrepOptions, run

    out = tmp_path_factory.mktemp("df-shards") / "shards"
    # BlazePose alone: the auto cascade would add YOLO on the two thirds without a person it finds
    # (~9 s of CPU); tests/test_detectors.py and test_prep.py cover auto.
    report = run(PrepOptions(images=df_source, labels=df_source, out=out, shard_size=40, max_side=128,
                             detector="blazepose", progress=False))
    assert report.exit_code == 0, report
    return out


@pytest.fixture(scope="session")
def deepfashion_shards(tmp_path_factory, shared_data) -> Path:
    """`realdata`: the collection `df_shards` was before the fixture set, from the first 96 train and
    24 val images of ../shared/data/deepfashion-attr (catalog photos) with their labels, stored at
    128 px, 40 items per shard. Read-only."""
    from pose_prep.prep import PrepOptions, run

    source, root = shared_data / "deepfashion-attr", tmp_path_factory.mktemp("deepfashion-shards")
    images = root / "deepfashion-attr"
    (images / "img").mkdir(parents=True)
    (images / "split").mkdir()
    (images / "split" / "list_attr_cloth.txt").write_bytes((source / "split" / "list_attr_cloth.txt").read_bytes())
    for split, count in {"train": 96, "val": 24}.items():
        names = (source / "split" / f"{split}.txt").read_text().split()[:count]
        rows = (source / "split" / f"{split}_attr.txt").read_text().splitlines()[:count]
        for name in names:
            (images / name).write_bytes((source / name).read_bytes())
        (images / "split" / f"{split}.txt").write_text("\n".join(names) + "\n")
        (images / "split" / f"{split}_attr.txt").write_text("\n".join(rows) + "\n")
    out = root / "shards"
    report = run(PrepOptions(images=images, labels=images, out=out, shard_size=40, max_side=128, progress=False))
    assert report.exit_code == 0, report
    return out


@pytest.fixture
def small_disk(tmp_path):
    """A real 1600 KiB tmpfs mounted on a fresh folder for the test (tests/small_disk.py: needs root,
    and fails rather than skips where mount is not permitted); small_disk.grow(path, size) frees it."""
    import small_disk

    with small_disk.mounted(tmp_path / "disk", "1600k") as folder:
        yield folder


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


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, tiny_checkpoint) -> Path:
    """`tiny_checkpoint` through `vsam export --format onnx` (checked against it on export). Read-only."""
    from vsam_train.export import export_checkpoint

    return export_checkpoint(tiny_checkpoint, "onnx", tmp_path_factory.mktemp("tiny-onnx") / "tiny.onnx").path
