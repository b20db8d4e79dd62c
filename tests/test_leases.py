"""Readers beside a prep-pose run: a reader's snapshot stays readable to its end (pose_prep.leases), with
real reader processes (DataLoader workers forked per epoch), real prep-pose runs and real kill -9."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixture_set import copy_photos
from pose_prep import leases
from pose_prep import shard_format as sf
from pose_prep.prep import PrepOptions, catalog_problems, run

READER = Path(__file__).with_name("lease_reader.py")
PHOTOS = [f"coco-{n:012d}.jpg" for n in (234748, 790, 62554, 78499, 84284, 107438, 397133, 358083)]
CATEGORIES = ("Tee", "Jeans", "Dress")


def write_labels(path: Path, names: list[str], tee: str = "Tee") -> Path:
    """CSV labels; another `tee` renames a category, so the vocabulary changes and every row is relabelled."""
    rows = [f"{name},{CATEGORIES[i % 3].replace('Tee', tee)},floral,train" for i, name in enumerate(names)]
    path.write_text("path,category,attributes,split\n" + "\n".join(rows) + "\n")
    return path


def prep(images: Path, out: Path, labels: Path):
    report = run(PrepOptions(images=images, out=out, labels=labels, shard_size=2, detector="blazepose",
                             progress=False))
    assert report.exit_code == 0, report.error
    return report


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """Eight photos with CSV labels, built into four shards of two (copy before changing anything)."""
    root = tmp_path_factory.mktemp("leases")
    images = copy_photos(root / "img", PHOTOS)
    prep(images, root / "shards", write_labels(root / "labels.csv", PHOTOS))
    return root


@pytest.fixture
def collection(built, tmp_path) -> tuple[Path, Path]:
    """(images, shards): a copy of `built` for one test."""
    import shutil

    shutil.copytree(built / "img", tmp_path / "img")
    shutil.copytree(built / "shards", tmp_path / "shards")
    return tmp_path / "img", tmp_path / "shards"


def start_reader(shards: Path, signals: Path) -> subprocess.Popen:
    signals.mkdir()
    return subprocess.Popen([sys.executable, str(READER), str(shards), str(signals)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(path: Path, reader: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert reader.poll() is None, reader.communicate()
        assert time.monotonic() < deadline, f"no {path.name} within {timeout} s"
        time.sleep(0.02)
    return json.loads(path.read_text())


def retired(shards: Path) -> list[str]:
    return sorted(p.name for p in (shards / leases.RETIRED).glob("*.h5"))


def test_readers_started_before_a_relabelling_run_read_their_snapshot_and_a_killed_one_pins_nothing(collection,
                                                                                                    tmp_path):
    images, shards = collection
    before = sorted(p.name for p in shards.glob("shard-*.h5"))
    reader = start_reader(shards, tmp_path / "signals")
    killed = start_reader(shards, tmp_path / "killed")
    first_epoch = wait_for(tmp_path / "signals" / "epoch-0.json", reader)
    wait_for(tmp_path / "killed" / "epoch-0.json", killed)
    assert len(first_epoch) == len(PHOTOS)

    # Every row is copied into new shards with new labels: the four old shards leave the collection.
    report = prep(images, shards, write_labels(tmp_path / "new.csv", PHOTOS, tee="T-shirt"))
    assert report.counts["relabelled"] == len(PHOTOS)
    assert not set(before) & {p.name for p in shards.glob("shard-*.h5")}
    assert retired(shards) == before                 # kept: the readers' leases hold them
    assert report.retired_kept == before and sf.collection_info(shards)["retired"]["files"] == 4
    assert sf.verify_collection(shards) == [] and catalog_problems(shards, images) == []

    (tmp_path / "signals" / "go").touch()           # epoch 1: workers forked now open the old shards again
    _, stderr = reader.communicate(timeout=120)
    assert reader.returncode == 0, stderr
    assert json.loads((tmp_path / "signals" / "epoch-1.json").read_text()) == first_epoch   # the old labels
    prep(images, shards, tmp_path / "new.csv")
    assert retired(shards) == before                 # the other reader still holds them

    os.killpg(killed.pid, signal.SIGKILL)            # it and its loader worker, as the OOM killer would
    killed.communicate()
    prep(images, shards, tmp_path / "new.csv")       # nothing pins them any more
    assert retired(shards) == [] and sf.verify_collection(shards) == []


def test_a_snapshot_keeps_a_dead_shard_readable_until_it_is_closed(collection, tmp_path):
    images, shards = collection
    with sf.snapshot(shards) as snapshot:
        assert sum(len(rows) for rows in snapshot.rows.values()) == len(PHOTOS)
        assert len(snapshot.lease) == 4 and json.loads(snapshot.meta["vocabulary"])["categories"]
        path, rows = next(iter(snapshot.rows.items()))
        with sf.open_index(shards) as connection:   # as a deletion would: every row of the first shard retired
            sf.retire_files(connection, [item["path"] for item in sf.live_items(shards) if item["shard"] == path.name])
            sf.remove_orphans(shards, connection)
        assert not path.exists() and retired(shards) == [path.name]
        with sf.Shard(path) as shard:               # found in retired/
            assert [shard.item(int(row)).path for row in rows]
        with sf.open_index(shards) as connection:
            sf.remove_orphans(shards, connection)
            assert retired(shards) == [path.name]    # still held
    with sf.open_index(shards) as connection:
        sf.remove_orphans(shards, connection)
        assert retired(shards) == []
        # Its number is never used again, though no file of that name is left anywhere.
        assert sf.next_shard_number(shards, connection) == 5


def test_a_snapshot_of_a_shard_deleted_by_hand_says_the_collection_changed(collection):
    _, shards = collection
    with sf.snapshot(shards) as snapshot:
        path = next(iter(snapshot.rows))
        path.unlink()          # what an older prep-pose did, or rm
        with pytest.raises(sf.ShardFormatError, match="no such shard file: the collection changed under this reader"):
            sf.Shard(path).file
    with pytest.raises(leases.Gone):
        leases.hold([path])
