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
