"""Compaction (pose_prep/compaction.py): shards at most half live are rewritten, on real prep-pose runs, with
a reader holding a snapshot, through `vsam shards compact`, and killed by a real kill -9 at random instants."""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import fixture_set
from cli import EXIT_BUSY, EXIT_FAILED, main
from fixture_set import copy_photos
from pose_prep import leases, lock
from pose_prep import shard_format as sf
from pose_prep.prep import PrepOptions, catalog_problems, run
from pose_prep.prep_worker import Settings, render_heatmap
from small_disk import fill

VSAM = str(Path(sys.executable).with_name("vsam"))
NAMES = sorted(path.name for path in fixture_set.PHOTOS.glob("*.jpg"))[:24]


def prep(images: Path, out: Path, **options):
    report = run(PrepOptions(images=images, out=out, detector="blazepose", progress=False, **options))
    assert report.exit_code == 0, report.error
    return report


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """24 photos in shards of 2 (12 shards); copy before changing anything."""
    root = tmp_path_factory.mktemp("compaction")
    prep(copy_photos(root / "img", NAMES), root / "shards", shard_size=2)
    return root


@pytest.fixture
def collection(built, tmp_path) -> tuple[Path, Path]:
    shutil.copytree(built / "img", tmp_path / "img")
    shutil.copytree(built / "shards", tmp_path / "shards")
    return tmp_path / "img", tmp_path / "shards"


def stored(out: Path) -> dict[str, tuple]:
    """Every live item's stored values (image bytes, heatmap, keypoints, labels), by path."""
    values = {}
    for item in sf.live_items(out):
        with sf.Shard(out / item["shard"]) as shard:
            row = shard.item(item["row"])
        values[item["path"]] = (row.image, row.heatmap.tobytes(), row.keypoints.tobytes(), row.category,
                                row.attributes.tobytes(), row.split, row.sha256, row.has_pose)
    return values


def shard_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("shard-*.h5"))


def delete_first_of_each_shard(images: Path, out: Path) -> list[str]:
    """Delete the photo in row 0 of every shard: each shard is then half live."""
    gone = [item["path"] for item in sf.live_items(out) if item["row"] == 0]
    for name in gone:
        (images / name).unlink()
    return gone


def test_a_run_that_leaves_shards_half_live_rewrites_them_and_a_reader_keeps_its_snapshot(collection):
    images, out = collection
    gone = delete_first_of_each_shard(images, out)
    before = {path: values for path, values in stored(out).items() if path not in gone}
    bytes_before = sum((out / name).stat().st_size for name in shard_files(out))
    with sf.snapshot(out) as reader:
        report = prep(images, out, shard_size=2, max_retire="100%")
        assert report.counts["deleted"] == 12
        assert sorted(report.compaction["shards"]) == [sf.shard_name(n) for n in range(1, 13)]
        assert report.compaction["rows"] == 12 and len(report.compaction["new_shards"]) == 6
        assert shard_files(out) == [sf.shard_name(n) for n in range(13, 19)]
        assert report.retired_kept == [sf.shard_name(n) for n in range(1, 13)]    # the reader holds them
        path, rows = next(iter(reader.rows.items()))
        with sf.Shard(path) as shard:
            assert shard.item(int(rows[0])).path in gone        # the reader still reads its snapshot
    assert stored(out) == before                                 # every byte and label moved unchanged
    assert sum((out / name).stat().st_size for name in shard_files(out)) < 0.6 * bytes_before
    assert catalog_problems(out, images) == [] and sf.verify_collection(out) == []
    again = prep(images, out, shard_size=2)                      # the reader is gone: the old files too
    assert again.compaction["shards"] == [] and again.retired_kept == [] and not leases.retired_files(out)
    assert again.counts["unchanged"] == 12


def test_a_path_back_with_the_bytes_of_a_live_item_is_copied_with_its_heatmap(tmp_path):
    images = copy_photos(tmp_path / "img", NAMES[:2])
    shutil.copyfile(images / NAMES[0], images / "copy.jpg")
    out = tmp_path / "shards"
    prep(images, out)
    (images / "copy.jpg").unlink()
    prep(images, out, max_retire="100%")
    shutil.copyfile(images / NAMES[0], images / "copy.jpg")
    report = prep(images, out)
    assert report.counts["new"] == 1 and report.processed == 0       # copied from the live row, not detected
    values = stored(out)
    assert values["copy.jpg"][:3] == values[NAMES[0]][:3]
    item = next(i for i in sf.live_items(out) if i["path"] == "copy.jpg")
    with sf.Shard(out / item["shard"]) as shard:
        row = shard.item(item["row"])
    np.testing.assert_array_equal(row.heatmap, render_heatmap(row.keypoints, row.width, row.height, "full", Settings()))


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def problems_but_leftovers(out: Path, images: Path) -> list[str]:
    """catalog_problems but the files an interrupted run leaves, which the next run removes."""
    leftovers = ("shard file not listed in the index", "temporary file of an interrupted run")
    return [p for p in catalog_problems(out, images) if not any(text in p for text in leftovers)]


def test_shards_compact_rewrites_below_its_threshold_and_refuses_a_busy_folder(collection, tmp_path):
    images, out = collection
    gone = delete_first_of_each_shard(images, out)
    assert prep(images, out, shard_size=2, max_retire="100%", compact_below=0).compaction["shards"] == []
    assert len(shard_files(out)) == 12
    with lock.exclusive(out):
        result = invoke("shards", "compact", str(out))
        assert result.exit_code == EXIT_BUSY and "another vsam prep-pose run is active" in result.output
    with lock.exclusive(out, command="vsam shards compact"):     # the message names the holder, not the asker
        with pytest.raises(lock.Busy, match="another vsam shards compact run is active"):
            prep(images, out, shard_size=2)
    assert invoke("shards", "compact", str(out), "--below", "40").output.startswith("compacted 0 shard(s)")
    result = invoke("shards", "compact", str(out), "--shard-size", "4")
    assert result.exit_code == 0 and result.output.startswith("compacted 12 shard(s)")
    assert "into 3 " in result.output and len(shard_files(out)) == 3
    assert catalog_problems(out, images) == [] and sf.verify_collection(out) == [] and gone
    result = invoke("shards", "compact", str(tmp_path / "img"))
    assert result.exit_code == EXIT_FAILED and "no shard index here" in result.output


def test_shards_compact_on_a_full_disk_says_so_in_one_line_whatever_fills_it(collection, small_disk):
    """Whichever write finds the disk full (the index's WAL at opening or at a commit, a new shard), the
    command ends with one line naming the file, exit 1, every row still live once; with room it completes."""
    images, out = collection
    delete_first_of_each_shard(images, out)
    prep(images, out, shard_size=2, max_retire="100%", compact_below=0)
    before, named = stored(out), set()
    copy = small_disk / "shards"
    for leave in range(0, 300_000, 25_000):
        shutil.copytree(out, copy)
        ballast = fill(small_disk, leave)
        result = invoke("shards", "compact", str(copy))
        assert result.exit_code == EXIT_FAILED and len(result.output.splitlines()) == 1, (leave, result.output)
        assert result.output.startswith(f"vsam shards compact: no space left on device: {copy}/"), result.output
        named.add(Path(result.output.split(": ")[-1].strip()).name.split("-")[0])
        assert stored(copy) == before and problems_but_leftovers(copy, images) == [], leave
        ballast.unlink()
        shutil.rmtree(copy)
    assert named == {"index.sqlite", "shard"}
    result = invoke("shards", "compact", str(shutil.copytree(out, copy)))      # room again
    assert result.exit_code == 0 and result.output.startswith("compacted 12 shard(s)"), result.output
    assert stored(copy) == before and catalog_problems(copy, images) == []


@pytest.mark.parametrize("trial", range(3))
def test_compaction_killed_at_a_random_instant_leaves_every_item_live_once(collection, trial):
    images, out = collection
    delete_first_of_each_shard(images, out)
    prep(images, out, shard_size=2, max_retire="100%", compact_below=0)
    process = subprocess.Popen([VSAM, "shards", "compact", str(out), "--shard-size", "1"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 60
    while not (out / sf.shard_name(13)).exists() and process.poll() is None:   # its first new shard
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(random.Random(trial).uniform(0, 0.15))
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.communicate()
    for shard in out.glob("shard-*.h5"):          # whatever a reader can open is complete
        assert sf.verify_shard(shard) == [], shard
    assert problems_but_leftovers(out, images) == []
    report = prep(images, out, shard_size=1)       # removes the leftovers, compacts what is still to compact
    assert report.counts["unchanged"] == 12 and catalog_problems(out, images) == []
    assert len(shard_files(out)) == 12             # one live row in each
