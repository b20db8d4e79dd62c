"""`vsam prep-pose` on the fixture set's real photos with the real BlazePose detector: incremental reruns,
relabelling, the bad-file zoo, real kill -9 of real processes, two concurrent runs, the Dask backend."""
from __future__ import annotations

import hashlib
import itertools
import json
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

import awkward_names
import bad_images
import fixture_set
from fixture_set import copy_photos
from unprivileged import without_file_permission_override
from pose_prep import lock
from pose_prep.images import printable_name
from pose_prep.prep import PrepError, PrepOptions, RetireLimit, catalog_problems, run
from pose_prep.shard_format import Shard, collection_info, live_items, open_index, verify_shard

VSAM = str(Path(sys.executable).with_name("vsam"))
LABELS = fixture_set.ATTR_CHALLENGE


def photo(number: int) -> str:
    return f"coco-{number:012d}.jpg"


# Six train, two val, one test and one photo that no split file lists; BlazePose finds a person in the
# first two (a man standing in the street, people at a dinner table), in the val photo of a cook too.
SUBSET = [photo(n) for n in (234748, 790, 62554, 78499, 84284, 107438, 397133, 358083, 423617, 557172)]
MORE_TRAIN = [photo(n) for n in (121647, 125870, 129648)]


def prep(images: Path, out: Path, **options) -> "Report":  # noqa: F821
    # BlazePose alone: these tests are about the job, and it loads in a second (auto also loads YOLO).
    return run(PrepOptions(images=images, out=out, progress=False, **{"detector": "blazepose", **options}))


def items_by_path(out: Path) -> dict[str, dict]:
    return {item["path"]: item for item in live_items(out)}


def shard_files(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.h5")}


def test_incremental_reruns_touch_only_what_changed(tmp_path):
    images, out = copy_photos(tmp_path / "img", SUBSET), tmp_path / "shards"
    labels = LABELS
    first = prep(images, out, labels=labels, shard_size=4)
    assert first.counts["new"] == 10 and first.processed == 10 and first.exit_code == 0
    assert collection_info(out)["splits"] == {"train": 6, "val": 2, "test": 1, "none": 1}
    assert catalog_problems(out, images) == []

    before = shard_files(out)
    # No --detector: the collection's own (blazepose), not the package default, so nothing is redone.
    again = run(PrepOptions(images=images, out=out, labels=labels, shard_size=4, progress=False))
    assert again.detector == "blazepose"
    assert again.counts["unchanged"] == 10 and again.processed == 0 and again.stored == 0
    assert shard_files(out) == before                               # not one shard rewritten

    copy_photos(images, MORE_TRAIN[:2])                                                        # 2 new
    (images / SUBSET[1]).write_bytes((fixture_set.PHOTOS / MORE_TRAIN[2]).read_bytes())       # changed
    (images / SUBSET[2]).unlink()                                                              # deleted
    os.utime(images / SUBSET[3], ns=(time.time_ns(), time.time_ns() + 10**9))                # touched only
    old = items_by_path(out)
    third = prep(images, out, labels=labels, shard_size=4, compact_below=0)   # shard 1 is half live: kept as it is
    c = third.counts
    assert (c["new"], c["changed"], c["deleted"], c["unchanged"], third.processed) == (2, 1, 1, 8, 3)
    now = items_by_path(out)
    assert set(now) == {p.name for p in images.iterdir()}
    assert now[SUBSET[1]]["sha256"] == hashlib.sha256((images / SUBSET[1]).read_bytes()).hexdigest()
    for untouched in (SUBSET[0], SUBSET[3], SUBSET[6]):
        assert (now[untouched]["shard"], now[untouched]["row"]) == (old[untouched]["shard"], old[untouched]["row"])
    assert catalog_problems(out, images) == []

    last = prep(images, out, labels=labels, shard_size=4)
    assert last.counts["unchanged"] == 11 and last.processed == 0
    report = json.loads((out / "reports" / "latest.json").read_text())
    assert report["status"] == "completed" and report["counts"]["unchanged"] == 11 and report["exit_code"] == 0


def test_new_labels_relabel_without_detecting_again(tmp_path):
    images, out = copy_photos(tmp_path / "img", SUBSET[:4]), tmp_path / "shards"
    csv = tmp_path / "labels.csv"
    csv.write_text(f"path,category,attributes,split,category_type\n{SUBSET[0]},Dress,floral,train,3\n"
                   f"{SUBSET[1]},Tee,,train,1\n{SUBSET[2]},Jeans,,val,2\n")
    prep(images, out, labels=csv)
    before = {i["path"]: Shard(out / i["shard"]).item(i["row"]) for i in live_items(out)}

    csv.write_text(csv.read_text().replace(f"{SUBSET[0]},Dress,floral,train,3", f"{SUBSET[0]},Jeans,floral;maxi,val,2"))
    report = prep(images, out, labels=csv)
    assert report.counts["relabelled"] == 4 and report.processed == 0   # a new vocabulary: every row copied
    after = {i["path"]: Shard(out / i["shard"]).item(i["row"]) for i in live_items(out)}
    jeans = after[SUBSET[0]]
    assert (jeans.category, jeans.attributes.tolist(), jeans.split) == (0, [1, 1], "val")   # no Dress left: Jeans, Tee
    np.testing.assert_array_equal(jeans.keypoints, before[SUBSET[0]].keypoints)
    assert jeans.image == before[SUBSET[0]].image
    # Jeans are a lower-body item: only hips, knees and ankles light the heatmap now.
    assert jeans.heatmap.sum() < before[SUBSET[0]].heatmap.sum()
    assert after[SUBSET[3]].split == "none" and after[SUBSET[3]].category == -1
    assert catalog_problems(out, images) == []

    with pytest.raises(PrepError, match="was built with the labels of .*labels.csv: pass --labels again"):
        prep(images, out)


def test_crop_bbox_stores_the_annotated_box(tmp_path):
    train, val = SUBSET[1], SUBSET[7]
    images, out = copy_photos(tmp_path / "img", [train, val]), tmp_path / "shards"
    prep(images, out, labels=LABELS, crop_bbox=True)
    stored = {i["path"]: Shard(out / i["shard"]).item(i["row"]) for i in live_items(out)}
    assert fixture_set.bboxes("train")[train] == (325, 101, 472, 316)       # train_bbox.txt row 1
    assert (stored[train].width, stored[train].height) == (472 - 325, 316 - 101)
    x1, y1, x2, y2 = fixture_set.bboxes("val")[val]
    assert (stored[val].width, stored[val].height) == (x2 - x1, y2 - y1)


def test_bad_file_zoo_each_recorded_with_its_reason_the_rest_processed(tmp_path):
    images, out = tmp_path / "zoo", tmp_path / "shards"
    expected = bad_images.make_bad_image_folder(images)
    report = prep(images, out)
    assert report.exit_code == 0
    rejected = {r["path"]: r["reason"] for r in collection_info(out)["rejected"]}
    live = items_by_path(out)
    for path, reason in expected.items():
        if reason is None:
            assert path in live, path
        else:
            assert reason in rejected.get(path, ""), (path, rejected.get(path))
    assert set(live) | set(rejected) == set(expected)                  # nothing followed nested/loop
    assert {r["path"] for r in report.rejected} == set(rejected)
    # Both copies of the same content are items; the detector ran once for them.
    assert live[bad_images.DUPLICATE_A]["sha256"] == live[bad_images.DUPLICATE_B]["sha256"]
    assert report.processed == len({i["sha256"] for i in live.values()}) + sum(
        1 for p in rejected if p != bad_images.DANGLING)
    upright = Shard(out / live[bad_images.EXIF_ROTATED]["shard"]).item(live[bad_images.EXIF_ROTATED]["row"])
    assert (upright.width, upright.height) == bad_images.EXIF_ROTATED_UPRIGHT_SIZE
    again = prep(images, out)                 # rejected files stay recorded, not retried until they change
    assert (again.counts["unchanged"], again.counts["rejected"], again.processed) == (len(expected), 0, 0)
    assert again.exit_code == 0 and again.rejected_total == len(rejected)
    assert prep(images, out, strict=True).exit_code == 1                 # --strict: a rejected file fails the run


def test_awkward_file_names_are_items_and_names_that_are_not_utf8_rejected_as_every_command_names_them(tmp_path):
    """A real prep-pose process on real files: valid UTF-8 names (spaces, a leading dash, #, %, ?, HTML
    characters, a newline) become items; names that are not UTF-8 are rejected with \\xNN escapes, one
    stderr line each (a newline in a name cannot split it), and the exactly-once audit agrees."""
    images, out = tmp_path / "drop", tmp_path / "shards"
    expected = awkward_names.make_awkward_name_folder(images)
    result = subprocess.run([VSAM, "prep-pose", "--images", str(images), "--out", str(out), "--no-progress",
                             "--detector", "blazepose"], capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
    stderr = result.stderr.decode("utf-8")
    rejected = {name: reason for name, reason in expected.items() if reason}
    assert {r["path"]: r["reason"] for r in collection_info(out)["rejected"]} == rejected
    assert set(items_by_path(out)) == set(expected) - set(rejected)
    for name, reason in rejected.items():
        assert f"rejected: {printable_name(name)}: {reason}\n" in stderr
    json.loads((out / "reports" / "latest.json").read_bytes().decode("utf-8"))
    assert catalog_problems(out, images) == []


def test_nothing_processable_is_a_failure(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    (images / "empty.jpg").write_bytes(b"")
    (images / "notes.jpg").write_text("not a photo")
    report = prep(images, tmp_path / "shards")
    assert report.exit_code == 1 and report.counts["rejected"] == 2
    (tmp_path / "none").mkdir()
    assert prep(tmp_path / "none", tmp_path / "shards2").exit_code == 1     # no image at all


def test_jobs_2_gives_the_same_items_as_one_job(tmp_path):
    images = copy_photos(tmp_path / "img", SUBSET[:6])
    prep(images, tmp_path / "one")
    prep(images, tmp_path / "two", jobs=2, shard_size=2)
    one, two = items_by_path(tmp_path / "one"), items_by_path(tmp_path / "two")
    assert {p: (i["sha256"], i["has_pose"]) for p, i in one.items()} == \
        {p: (i["sha256"], i["has_pose"]) for p, i in two.items()}
    for path in one:
        a = Shard(tmp_path / "one" / one[path]["shard"]).item(one[path]["row"])
        b = Shard(tmp_path / "two" / two[path]["shard"]).item(two[path]["row"])
        np.testing.assert_allclose(a.keypoints, b.keypoints, atol=0.5)


def test_dask_backend_against_a_local_cluster(tmp_path):
    from distributed import LocalCluster

    images = copy_photos(tmp_path / "img", SUBSET[:5])
    prep(images, tmp_path / "local")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp://",
                      dashboard_address=None, scheduler_kwargs={"dashboard_address": ":0"}) as cluster:
        # ":0": the scheduler's HTTP server (it has one even without a dashboard) takes a free port, not 8787
        assert cluster.scheduler_address.startswith("tcp://")
        report = prep(images, tmp_path / "dask", backend="dask", scheduler=cluster.scheduler_address, shard_size=2)
    assert report.processed == 5 and report.exit_code == 0
    local, dask = items_by_path(tmp_path / "local"), items_by_path(tmp_path / "dask")
    assert {p: (i["sha256"], i["has_pose"]) for p, i in local.items()} == \
        {p: (i["sha256"], i["has_pose"]) for p, i in dask.items()}
    assert catalog_problems(tmp_path / "dask", images) == []


def test_dask_without_a_scheduler_stops_before_anything_is_touched(tmp_path):
    images = copy_photos(tmp_path / "img", SUBSET[:1])
    with pytest.raises(PrepError, match="--backend dask needs --scheduler ADDRESS"):
        prep(images, tmp_path / "shards", backend="dask")
    assert not (tmp_path / "shards").exists()


@pytest.mark.parametrize("detector, message", [("openpose", "unknown detector 'openpose'; choose one of"),
                                               ("mmpose", "detector 'mmpose' needs the 'mmpose' extra")])
def test_an_unknown_detector_or_a_missing_extra_is_a_usage_error_exit_2_as_for_vsam_pose(tmp_path, detector, message):
    images = copy_photos(tmp_path / "img", SUBSET[:1])
    result = subprocess.run([VSAM, "prep-pose", "--images", str(images), "--out", str(tmp_path / "shards"),
                             "--detector", detector], capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr.splitlines()[-1], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "shards").exists()


# --- real processes ---------------------------------------------------------------------------

def start(images: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([VSAM, "prep-pose", "--images", str(images), "--out", str(out), "--no-progress",
                             "--detector", "blazepose", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def wait_for_lock(process: subprocess.Popen, out: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not lock.is_locked(out):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never took its lock"
        time.sleep(0.02)


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)    # the run and its workers, as a crash would
    except ProcessLookupError:
        pass                                      # it had already finished, workers included
    process.communicate()


@pytest.fixture(scope="module")
def kill_catalog(tmp_path_factory) -> Path:
    names = sorted(path.name for path in fixture_set.PHOTOS.glob("*.jpg"))[:24]
    return copy_photos(tmp_path_factory.mktemp("kill") / "img", names)


@pytest.mark.parametrize("trial", range(3))
def test_kill_9_at_a_random_instant_then_rerun_gives_every_image_exactly_once(tmp_path, kill_catalog, trial):
    out = tmp_path / "shards"
    rng = random.Random(trial)
    process = start(kill_catalog, out, "--shard-size", "3", "--jobs", "2" if trial == 2 else "1")
    wait_for_lock(process, out)
    time.sleep(rng.uniform(0.0, 2.0))      # from the lock to the last commits of this catalog
    finished = process.poll() is not None
    kill_group(process)
    for shard in out.glob("shard-*.h5"):     # whatever a reader can open is complete
        assert verify_shard(shard) == [], shard
    survivors = {i["path"] for i in live_items(out)} if (out / "index.sqlite").exists() else set()
    report = prep(kill_catalog, out, shard_size=3)
    assert report.counts["new"] == 24 - len(survivors) and report.counts["unchanged"] == len(survivors)
    assert catalog_problems(out, kill_catalog) == [], (trial, finished)
    assert sorted(items_by_path(out)) == sorted(p.name for p in kill_catalog.iterdir())


def test_two_concurrent_runs_the_second_exits_75_and_a_killed_run_blocks_nothing(tmp_path, kill_catalog):
    out = tmp_path / "shards"
    first = start(kill_catalog, out, "--shard-size", "4")
    wait_for_lock(first, out)
    # Stopped where it stands, the first run keeps its lock for as long as the second needs to start: on a busy
    # machine it could otherwise finish its 24 photos first (seen once: the second then ran and exited 0).
    os.killpg(first.pid, signal.SIGSTOP)
    try:
        second = subprocess.run([VSAM, "prep-pose", "--images", str(kill_catalog), "--out", str(out)],
                                capture_output=True, text=True, timeout=60)
    finally:
        kill_group(first)                          # SIGKILL ends a stopped process too
    assert second.returncode == 75, second.stderr
    assert f"another vsam prep-pose run is active (pid {first.pid}" in second.stderr, second.stderr
    # The kernel dropped the killed run's lock: the next run goes ahead and completes the catalog.
    assert prep(kill_catalog, out).exit_code == 0
    assert catalog_problems(out, kill_catalog) == []


def test_a_held_lock_blocks_at_once(tmp_path, kill_catalog):
    out = tmp_path / "shards"
    out.mkdir()
    with lock.exclusive(out):
        started = time.monotonic()
        with pytest.raises(lock.Busy, match=f"pid {os.getpid()}"):
            prep(kill_catalog, out)
        assert time.monotonic() - started < 5.0         # a lock wait would never end: 5 s is slack for a loaded machine
    assert not lock.is_locked(out)


# --- the retire guard: what a run may retire, and only what it positively saw gone ------------

_PHOTO_SIZES = itertools.count(64, 4)


def write_photos(folder: Path, names) -> Path:
    """Real photos (matplotlib's and scikit-image's portraits) under `names`, each file its own bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        side = next(_PHOTO_SIZES)
        (bad_images.grace_hopper if side % 8 else bad_images.astronaut)(side).save(folder / name, quality=90)
    return folder


def collection_state(out: Path) -> tuple:
    """Everything a refused run must leave as it was: live items, index rows, shard files."""
    with open_index(out, readonly=True) as connection:
        rows = sorted(connection.execute("SELECT path, size, mtime_ns, sha256, status, shard_id, row FROM files"))
    return sorted((i["path"], i["shard"], i["row"]) for i in live_items(out)), rows, shard_files(out)


TEN = [f"{n:02d}.jpg" for n in range(10)]


@pytest.fixture(scope="module")
def built_ten(tmp_path_factory) -> tuple[Path, Path]:
    """Ten photos and the collection built from them (copy both before changing anything)."""
    root = tmp_path_factory.mktemp("guard")
    images = write_photos(root / "img", TEN)
    assert prep(images, root / "shards", shard_size=4).exit_code == 0
    return images, root / "shards"


def copy_built(built: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    images, out = built
    shutil.copytree(images, tmp_path / "img")
    shutil.copytree(out, tmp_path / "shards")
    return tmp_path / "img", tmp_path / "shards"


def test_an_empty_images_folder_changes_nothing_and_exits_1_until_max_retire_100(tmp_path, built_ten):
    images, out = copy_built(built_ten, tmp_path)
    before = collection_state(out)
    for path in images.iterdir():                # an unmounted share: the mount point is an empty folder
        path.unlink()
    result = subprocess.run([VSAM, "prep-pose", "--images", str(images), "--out", str(out), "--no-progress"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "refused: no image found under" in result.stderr and "10 live items" in result.stderr
    assert "nothing was changed" in result.stderr and "--max-retire 100%" in result.stderr
    assert collection_state(out) == before                       # no row retired, no shard deleted
    report = json.loads((out / "reports" / "latest.json").read_text())
    assert (report["status"], report["exit_code"], report["would_retire"], report["max_retire"]) == \
        ("refused", 1, 10, "10%")
    assert "no image found" in report["error"] and report["counts"]["deleted"] == 0

    result = subprocess.run([VSAM, "prep-pose", "--images", str(images), "--out", str(out), "--no-progress",
                             "--max-retire", "100%"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr                   # asked for: the catalog is really empty
    assert "10 deleted" in result.stdout and "0 items live" in result.stdout
    assert list(out.glob("shard-*.h5")) == []


def test_retiring_more_than_the_limit_is_refused_before_anything_changes(tmp_path, built_ten):
    images, out = copy_built(built_ten, tmp_path)
    for name in TEN[:3]:                                          # 3 of 10 gone: 30% > 10%
        (images / name).unlink()
    write_photos(images, ["new.jpg"])                            # and one new photo
    before = collection_state(out)
    refused = prep(images, out)
    assert (refused.status, refused.exit_code, refused.would_retire, refused.stored) == ("refused", 1, 3, 0)
    assert "would retire 3 of 10 live items (30% > --max-retire 10%)" in refused.error
    assert collection_state(out) == before                       # the new photo waits too: nothing written
    assert prep(images, out, max_retire="2").status == "refused"
    done = prep(images, out, max_retire="3")
    assert (done.exit_code, done.counts["deleted"], done.counts["new"], done.items_total) == (0, 3, 1, 8)
    assert catalog_problems(out, images) == []


def test_a_smaller_splits_selection_counts_as_retiring(tmp_path, built_ten):
    images, out = copy_built(built_ten, tmp_path)
    labels = tmp_path / "labels.csv"
    labels.write_text("path,category,attributes,split\n" + "".join(
        f"{name},Tee,,{'train' if i < 7 else 'val'}\n" for i, name in enumerate(TEN)))
    assert prep(images, out, labels=labels).exit_code == 0        # relabelled: nothing retired
    before = collection_state(out)
    narrowed = prep(images, out, labels=labels, splits=("train",))               # drops the 3 val items: 30%
    assert narrowed.status == "refused" and narrowed.would_retire == 3
    assert collection_state(out) == before


def test_max_retire_reads_a_share_or_a_count():
    share, count, everything, none = (RetireLimit.parse(t) for t in ("10%", "500", "100%", "0"))
    assert [str(limit) for limit in (share, count, everything, none)] == ["10%", "500", "100%", "0"]
    assert share.allows(1, live=10) and not share.allows(2, live=10)        # more than 10% is refused
    assert count.allows(500, live=10 ** 6) and not count.allows(501, live=10 ** 6)
    assert everything.allows(10, live=10) and none.allows(0, live=10) and not none.allows(1, live=10)
    assert RetireLimit.parse("12.5%").allows(1, live=8) and not RetireLimit.parse("12.5%").allows(2, live=8)


@pytest.mark.parametrize("text", ["", "ten", "-1", "101%", "5.5", "%"])
def test_max_retire_refuses_what_is_not_a_share_or_a_count(text):
    with pytest.raises(ValueError, match="a share of the live items like 10% or a count like 500"):
        RetireLimit.parse(text)


@pytest.mark.parametrize("mode", [0o000, 0o644])   # not listable; listable but its files cannot be stat'ed
def test_an_unreadable_subfolder_keeps_its_items_and_the_rest_goes_on(tmp_path, mode):
    images, out = tmp_path / "img", tmp_path / "shards"
    write_photos(images / "tops", TEN[:3])
    write_photos(images / "dresses", TEN[3:6])
    assert prep(images, out).exit_code == 0
    write_photos(images / "tops", ["new.jpg"])
    (images / "dresses").chmod(mode)
    try:
        result = subprocess.run([*without_file_permission_override(), VSAM, "prep-pose", "--images", str(images),
                                 "--out", str(out), "--no-progress", "--detector", "blazepose", "--max-retire", "100%"],
                                capture_output=True, text=True, timeout=120)
    finally:
        (images / "dresses").chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert "unreadable: dresses" in result.stderr and "Permission denied" in result.stderr
    assert "1 new" in result.stdout and "0 deleted" in result.stdout and "7 items live" in result.stdout
    report = json.loads((out / "reports" / "latest.json").read_text())
    assert report["counts"]["unreadable"] == 3 and report["rejected"] == []
    assert {i["path"] for i in live_items(out)} == {f"{d}/{n}" for d, ns in
                                                    (("tops", TEN[:3] + ["new.jpg"]), ("dresses", TEN[3:6]))
                                                    for n in ns}
    again = prep(images, out)                                    # readable again: nothing to redo
    assert (again.counts["unchanged"], again.processed, again.counts["unreadable"]) == (7, 0, 0)
    assert catalog_problems(out, images) == []
