"""The shard format: real HDF5 files and a real SQLite index, written and read back."""
from __future__ import annotations

import io
import json
import re
import signal
import sqlite3
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from pose_prep import shard_format as sf
from pose_prep.atomic import DiskFull
from pose_prep.keypoints import NUM_JOINTS
from shard_faults import flip_at, flip_byte, flip_text, object_header, rewrite_value
from small_disk import fill


def _jpeg(colour: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 32), (colour, 255 - colour, 40)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _items(n: int, split: str = "train") -> list[sf.ShardItem]:
    rng = np.random.default_rng(n)
    return [sf.ShardItem(image=_jpeg(40 * i), heatmap=rng.integers(0, 256, (56, 56), dtype=np.uint8),
                         keypoints=rng.random((NUM_JOINTS, 3), dtype=np.float32) * 100, has_pose=i % 2 == 0,
                         category=i - 1, attributes=np.array([1, 0, -1], np.int8), split=split,
                         path=f"shop/ünï_{i}.jpg", sha256=f"{i:064x}", width=24 + i, height=32)
            for i in range(n)]


METADATA = sf.ShardMetadata(
    vocabulary=sf.Vocabulary(categories=["Tee", "Jeans"], category_types=[1, 2], attributes=["a", "b", "c"],
                             attribute_groups=["g", "g", ""]),
    heatmap={"size": [56, 56], "sigma": 1.5}, detector="blazepose", detector_version="test-1",
    image_encoding={"format": "jpeg", "max_side": 256, "quality": 90})


def _collection(folder, counts=(3, 2)) -> list[list[sf.ShardItem]]:
    """Shards written and committed the way prep-pose does it."""
    written = []
    folder.mkdir(parents=True, exist_ok=True)
    with sf.open_index(folder) as connection:
        sf.write_collection_metadata(connection, METADATA)
        for n in counts:
            items = _items(n, split="val" if n == 2 else "train")
            items = [sf.ShardItem(**{**item.__dict__, "path": f"{n}/{item.path}"}) for item in items]
            number = sf.next_shard_number(folder, connection)
            sf.write_shard(folder / sf.shard_name(number), items, METADATA)
            sf.commit_shard(connection, number, [
                sf.FileRecord(i.path, 1, 1, i.sha256, "ok" if i.has_pose else "no_person", split=i.split)
                for i in items])
            written.append(items)
    return written


def test_round_trip(tmp_path):
    items = _items(3)
    sf.write_shard(tmp_path / "shard-000001.h5", items, METADATA)
    with sf.Shard(tmp_path / "shard-000001.h5") as shard:
        assert len(shard) == 3 and shard.vocabulary == METADATA.vocabulary
        data = shard.read()
        for row, item in enumerate(items):
            back = shard.item(row)
            assert back.image == item.image == shard.image(row, data["image_offsets"])
            np.testing.assert_array_equal(back.heatmap, item.heatmap)
            np.testing.assert_array_equal(back.keypoints, item.keypoints)
            np.testing.assert_array_equal(back.attributes, item.attributes)
            assert (back.path, back.sha256, back.split, back.has_pose, back.category, back.width) == \
                (item.path, item.sha256, item.split, item.has_pose, item.category, item.width)
        attrs = shard.attrs()
        assert attrs["schema_version"] == sf.SCHEMA_VERSION and attrs["detector"] == "blazepose"
        assert set(json.loads(attrs["checksums"])) == set(sf.ITEM_DATASETS)
        with pytest.raises(IndexError):
            shard.item(3)
    assert sf.verify_shard(tmp_path / "shard-000001.h5") == []
    assert not list(tmp_path.glob(".*.tmp"))            # the temporary file was renamed


def test_no_pickle_anywhere(tmp_path):
    sf.write_shard(tmp_path / "shard-000001.h5", _items(2), METADATA)
    with h5py.File(tmp_path / "shard-000001.h5") as f:
        for name, dataset in f.items():
            assert dataset.dtype.kind in "uifS" or h5py.check_string_dtype(dataset.dtype), name


def test_unknown_schema_version_is_refused_with_a_clear_message(tmp_path):
    path = tmp_path / "shard-000001.h5"
    sf.write_shard(path, _items(1), METADATA)
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = 99
    shard = sf.Shard(path)
    for _ in range(2):                                    # refused on every use, not only the first
        with pytest.raises(sf.ShardFormatError, match=r"shard-000001.h5: shard schema version 99 is not supported "
                                                      r"by this vsam \(it reads version 2\); rebuild the shards with "
                                                      r"`vsam prep-pose` of this version into a new --out folder"):
            len(shard)
    assert "schema version 99" in sf.verify_shard(path)[0]

    _collection(tmp_path / "c")
    with sf.open_index(tmp_path / "c") as connection, connection:
        sf.set_meta(connection, "schema_version", "7")
    with pytest.raises(sf.ShardFormatError, match="index.sqlite: shard schema version 7 is not supported"):
        sf.collection_info(tmp_path / "c")


def test_a_heatmap_without_fletcher32_from_an_early_version_2_build_says_to_rebuild(tmp_path):
    """An early build of version 2 wrote heatmaps with lzf alone, under the same schema_version: such a
    shard cannot pass for a sound one, and the error says what to do about it."""
    _collection(tmp_path)
    path = tmp_path / "shard-000001.h5"
    with h5py.File(path, "a") as f:                       # the heatmap as that build wrote it; attributes unchanged
        heatmap = f["heatmap"][...]
        del f["heatmap"]
        f.create_dataset("heatmap", data=heatmap, compression="lzf", chunks=(len(heatmap), 56, 56))
    expected = (f"{path}: dataset heatmap is not stored with lzf and Fletcher-32 (filters lzf, fletcher32=False): "
                "written by an early build of schema version 2, or damaged; rebuild the shards with `vsam prep-pose` "
                "of this version into a new --out folder")
    with pytest.raises(sf.ShardFormatError) as raised:
        sf.Shard(path).read()
    assert str(raised.value) == expected
    assert sf.verify_collection(tmp_path) == [expected]


def test_live_rows_items_and_info(tmp_path):
    written = _collection(tmp_path)
    assert {p.name: rows.tolist() for p, rows in sf.live_rows(tmp_path).items()} == \
        {"shard-000001.h5": [0, 1, 2], "shard-000002.h5": [0, 1]}
    assert list(sf.live_rows(tmp_path, ("val",))) == [tmp_path / "shard-000002.h5"]
    listed = list(sf.live_items(tmp_path))
    assert [(i["path"], i["shard"], i["row"], i["has_pose"]) for i in listed] == \
        [(item.path, f"shard-00000{s + 1}.h5", row, item.has_pose)
         for s, items in enumerate(written) for row, item in enumerate(items)]
    with sf.open_index(tmp_path) as connection:
        sf.record_files(connection, [sf.FileRecord("bad.jpg", 0, 1, None, "rejected", reason="empty file (0 bytes)")])
        sf.retire_files(connection, ["3/shop/ünï_0.jpg"])
    info = sf.collection_info(tmp_path)
    assert info["items"] == 4 and info["splits"] == {"train": 2, "val": 2, "test": 0, "none": 0}
    assert (info["with_pose"], info["without_pose"]) == (2, 2)
    assert info["vocabulary"]["categories"] == ["Tee", "Jeans"] and info["detector"] == "blazepose"
    assert info["rejected"] == [{"path": "bad.jpg", "reason": "empty file (0 bytes)"}]
    assert sf.collection_vocabulary(tmp_path) == METADATA.vocabulary
    assert sf.verify_collection(tmp_path) == []


def test_orphans_and_dead_shards_are_removed(tmp_path):
    _collection(tmp_path)
    orphan = tmp_path / "shard-000007.h5"                 # renamed, never committed
    sf.write_shard(orphan, _items(1), METADATA)
    (tmp_path / ".shard-000008.h5.tmp").write_bytes(b"partial")
    problems = sf.verify_collection(tmp_path)
    assert any("shard-000007.h5: shard file not listed" in p for p in problems)
    assert any(".shard-000008.h5.tmp: temporary file" in p for p in problems)
    with sf.open_index(tmp_path) as connection:
        assert sf.next_shard_number(tmp_path, connection) == 8   # past every listed or renamed file
        sf.retire_files(connection, [f"2/shop/ünï_{i}.jpg" for i in range(2)])   # shard 2 now unused
        removed = {p.name for p in sf.remove_orphans(tmp_path, connection)}
    assert removed == {"shard-000007.h5", ".shard-000008.h5.tmp", "shard-000002.h5"}
    assert sorted(p.name for p in tmp_path.glob("shard-*.h5")) == ["shard-000001.h5"]
    assert sf.verify_collection(tmp_path) == []


def test_verify_names_a_flipped_byte_and_an_index_mismatch(tmp_path):
    _collection(tmp_path)
    path = tmp_path / "shard-000001.h5"
    flip_byte(path, "image_bytes", 100)
    assert sf.verify_collection(tmp_path) == [f"{path}: dataset image_bytes does not match its checksum"]

    _collection(tmp_path / "b")
    with sf.open_index(tmp_path / "b") as connection:       # rows as a faulty writer would store them
        records = sf.file_records(connection)
        sf.record_files(connection, [replace(records["2/shop/ünï_1.jpg"], sha256="0"),
                                     replace(records["3/shop/ünï_2.jpg"], row=9)])
    problems = sf.verify_collection(tmp_path / "b")
    assert len(problems) == 2
    assert "shard-000002.h5: row 1 holds" in problems[1] and "the index says ('2/shop/ünï_1.jpg', '0'" in problems[1]
    assert "shard-000001.h5: index row 9 of 3/shop/ünï_2.jpg is outside 0..2" in problems[0]
    (tmp_path / "b/shard-000002.h5").unlink()
    assert f"{tmp_path / 'b/shard-000002.h5'}: listed in the index but missing" in sf.verify_collection(tmp_path / "b")


def test_a_snapshot_names_a_listed_shard_that_is_missing_as_verify_does(tmp_path):
    """Missing at every attempt while the index lists the same files: not a concurrent change (the
    reader said "the collection changed under this reader 5 times ... try again")."""
    _collection(tmp_path)
    missing = tmp_path / "shard-000002.h5"
    missing.unlink()
    with pytest.raises(sf.ShardFormatError) as error:
        sf.snapshot(tmp_path)
    assert str(error.value).startswith(f"{missing}: listed in the index but missing (vsam shards verify {tmp_path}")
    assert f"{missing}: listed in the index but missing" in sf.verify_collection(tmp_path)


def test_a_shard_retired_between_the_index_read_and_the_lease_makes_the_snapshot_read_again(tmp_path, monkeypatch):
    from pose_prep import leases

    _collection(tmp_path)
    hold, attempts = leases.hold, []

    def retire_then_hold(paths):
        if not attempts:       # what a prep-pose run does meanwhile: unlist shard 2, then remove it
            with sf.open_index(tmp_path) as connection:
                sf.retire_files(connection, [f"2/shop/ünï_{i}.jpg" for i in range(2)])
                sf.remove_orphans(tmp_path, connection)
        attempts.append([p.name for p in paths])
        return hold(paths)

    monkeypatch.setattr(leases, "hold", retire_then_hold)
    with sf.snapshot(tmp_path) as snapshot:
        assert [p.name for p in snapshot.rows] == ["shard-000001.h5"]
    assert attempts == [["shard-000001.h5", "shard-000002.h5"], ["shard-000001.h5"]]


@pytest.mark.parametrize("name", ["drop#2", "100%", "what?", "ünï code"])
def test_index_in_a_folder_with_uri_characters_is_opened_read_only(tmp_path, name):
    folder = tmp_path / name
    _collection(folder)
    assert sf.collection_info(folder)["items"] == 5 and sf.verify_collection(folder) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]     # no stray database next to it


def test_a_damaged_index_is_a_clear_error_naming_it(tmp_path):
    sf.index_path(tmp_path).write_bytes(b"not sqlite at all" * 512)
    for readonly in (True, False):
        with pytest.raises(sf.ShardFormatError, match=r"index.sqlite: not a readable shard index \(file is not"):
            with sf.open_index(tmp_path, readonly=readonly):
                pass
    assert sf.verify_collection(tmp_path) == [
        f"{sf.index_path(tmp_path)}: not a readable shard index (file is not a database)"]


# --- damage: every flipped byte is named, by verify and by the readers, never a traceback --------------

def _snapshot(folder):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from fault_shards import snapshot
    finally:
        sys.path.pop(0)
    return snapshot(folder)


def _read_everything(folder) -> None:
    """What prep-pose and training read: index meta and rows, every dataset and row of every shard."""
    sf.collection_metadata(folder)
    with sf.open_index(folder, readonly=True) as connection:
        sf.file_records(connection)
    for path, rows in sf.live_rows(folder).items():
        with sf.Shard(path) as shard:
            shard.read()
            for row in rows:
                shard.item(int(row))


@pytest.mark.parametrize("attribute, text, at", [
    ("heatmap", '"sigma": 1.5', 10),                    # 1.5 -> 1.4: a silent change of the training target
    ("detector", "blazepose", 4),                       # blazepose -> blazeqose
    ("vocabulary", '{"attribute_groups"', 0),            # no longer parses
    ("checksums", '{"attributes"', 3),
])
def test_a_flipped_attribute_is_named_by_verify_and_by_every_reader(tmp_path, attribute, text, at):
    _collection(tmp_path)
    path = tmp_path / "shard-000001.h5"
    flip_text(path, text, at)
    expected = f"{path}: file attributes do not match their checksum"
    assert sf.verify_shard(path) == [expected]
    assert sf.verify_collection(tmp_path) == [expected]     # and shard 2 was checked: it is sound
    with sf.Shard(path) as shard, pytest.raises(sf.ShardFormatError, match=re.escape(expected)):
        shard.vocabulary


def test_flips_in_a_dataset_header_are_caught_or_change_nothing(tmp_path):
    """The datatype, shape, layout and filter messages of `category`: a flip there used to give h5py
    errors inside verify, or a different type read from intact bytes."""
    _collection(tmp_path)
    path = tmp_path / "shard-000001.h5"
    pristine, original = path.read_bytes(), _snapshot(tmp_path)
    rng = np.random.default_rng(0)
    caught = 0
    for position in rng.choice(object_header(path, "category"), 60, replace=False):
        flip_at(path, int(position), int(rng.integers(1, 256)))
        problems = sf.verify_shard(path)
        if problems:
            caught += 1
            with sf.Shard(path) as shard, pytest.raises(sf.ShardFormatError, match=re.escape(str(path))):
                shard.read()
        else:
            assert _snapshot(tmp_path) == original, f"byte {position}: verify passed a change"
        path.write_bytes(pristine)
    assert caught > 10


@pytest.mark.parametrize("target", ["shard-000001.h5", "index.sqlite"])
def test_random_flips_are_caught_or_change_nothing_and_never_raise_anything_else(tmp_path, target):
    _collection(tmp_path)
    path = tmp_path / target
    pristine, original = path.read_bytes(), _snapshot(tmp_path)
    rng = np.random.default_rng(1)
    caught = 0
    for _ in range(60):
        flip_at(path, int(rng.integers(len(pristine))), int(rng.integers(1, 256)))
        problems = sf.verify_collection(tmp_path)
        try:
            _read_everything(tmp_path)
        except sf.ShardFormatError as error:
            assert str(error).startswith(str(path)) and problems, error
        if problems:
            caught += 1
        else:
            assert _snapshot(tmp_path) == original
        path.write_bytes(pristine)
    assert caught > 0


def test_a_flipped_index_value_is_named_with_its_table_and_key_by_verify_and_readers(tmp_path):
    _collection(tmp_path)
    index = sf.index_path(tmp_path)
    with sf.open_index(tmp_path) as connection:
        sf.record_files(connection, [sf.FileRecord("bad.jpg", 0, 1, None, "rejected", reason="empty file (0 bytes)")])
    flip_text(index, '"sigma": 1.5', at=10)                 # the heatmap sigma the trainer reads: 1.5 -> 1.4
    flip_text(index, "empty file (0 bytes)", at=11, mask=0x02)   # 0 bytes -> 2 bytes
    assert sf.verify_collection(tmp_path) == [f"{index}: meta row 'heatmap' does not match its checksum",
                                              f"{index}: files row 'bad.jpg' does not match its checksum"]
    for read in (sf.collection_metadata, sf.collection_info):
        with pytest.raises(sf.ShardFormatError, match=re.escape(f"{index}: meta row 'heatmap'")):
            read(tmp_path)
    for read in (sf.live_rows, lambda folder: list(sf.live_items(folder))):
        with pytest.raises(sf.ShardFormatError, match=re.escape(f"{index}: files row 'bad.jpg'")):
            read(tmp_path)


def test_a_label_outside_the_vocabulary_is_named_with_its_row_by_readers_and_verify(tmp_path):
    _collection(tmp_path)
    path = tmp_path / "shard-000001.h5"
    rewrite_value(path, "category", 2, 7)              # checksums match: a faulty writer, not a flipped byte
    expected = f"{path}: row 2: category 7 is outside the vocabulary's 2 categories (0..1, -1 unknown)"
    assert sf.verify_shard(path) == [expected]
    for read in (lambda s: s.read(("category",)), lambda s: s.item(0)):
        with sf.Shard(path) as shard, pytest.raises(sf.ShardFormatError, match=re.escape(expected)):
            read(shard)
    rewrite_value(path, "category", 2, 1)
    rewrite_value(path, "attributes", 1, [1, 3, 0])
    assert sf.verify_shard(path) == [f"{path}: row 1: attribute 1 is 3, not 1, 0 or -1 (unknown)"]
    bad = _items(2)
    bad[1].category = 2
    with pytest.raises(ValueError, match="row 1: category 2 is outside"):
        sf.write_shard(tmp_path / "shard-000009.h5", bad, METADATA)


def test_a_damaged_shard_id_stops_remove_orphans_instead_of_deleting_a_sound_shard(tmp_path):
    _collection(tmp_path)
    index = sf.index_path(tmp_path)
    with sqlite3.connect(index) as connection:
        n_items, created, checksum = connection.execute(
            "SELECT n_items, created, checksum FROM shards WHERE id=2").fetchone()
    # The shards row as SQLite stores it: header (size, serial types: id is the rowid, stored as NULL), values.
    record = bytes([5, 0, 1, 13 + 2 * len(created), 13 + 2 * len(checksum), n_items]) + (created + checksum).encode()
    rowid = index.read_bytes().index(record) - 1        # the rowid varint comes just before the record
    assert index.read_bytes()[rowid] == 2
    flip_at(index, rowid, 0x01)                         # shard 2 is now listed as shard 3
    with sf.open_index(tmp_path) as connection:
        with pytest.raises(sf.ShardFormatError, match=f"{re.escape(str(index))}: shards row 3 does not match"):
            sf.remove_orphans(tmp_path, connection)
    assert (tmp_path / "shard-000002.h5").exists()
    assert any("shards row 3 does not match its checksum" in p for p in sf.verify_collection(tmp_path))


@pytest.mark.parametrize("text, at, mask", [("CREATE TABLE meta", 8, 0x80), ("value TEXT NOT NULL", 15, 0xAA),
                                           ("sqlite_autoindex_meta_1", 2, 0xC4), ("n_items INTEGER", 3, 0x80)])
def test_a_damaged_table_definition_is_named_not_a_traceback(tmp_path, text, at, mask):
    """SQLite's error message then quotes the definition, bytes that are no longer UTF-8 included,
    which Python's sqlite3 cannot decode (UnicodeDecodeError, not an sqlite3 error)."""
    _collection(tmp_path)
    index = sf.index_path(tmp_path)
    flip_text(index, text, at=at, mask=mask)
    problems = sf.verify_collection(tmp_path)
    assert len(problems) == 1 and problems[0].startswith(f"{index}: "), problems
    with pytest.raises(sf.ShardFormatError, match=re.escape(f"{index}: ")):
        sf.collection_info(tmp_path)
    with pytest.raises(sf.ShardFormatError, match=re.escape(f"{index}: ")):
        with sf.open_index(tmp_path) as connection:
            sf.next_shard_number(tmp_path, connection)


def test_a_flip_in_a_compressed_heatmap_chunk_is_caught_on_every_read(tmp_path):
    """A damaged LZF stream can decode short, leaving the rest of the chunk to whatever the buffer
    held (the right values, when the same chunk was decoded before): the chunk's Fletcher-32
    checksum, checked before decompression, makes every read fail alike."""
    _collection(tmp_path)
    path = tmp_path / "shard-000001.h5"
    with h5py.File(path) as f:
        chunk = f["heatmap"].id.get_chunk_info(0)
    rng = np.random.default_rng(3)
    pristine = path.read_bytes()
    for position in rng.integers(chunk.byte_offset, chunk.byte_offset + chunk.size, 12):
        flip_at(path, int(position), int(rng.integers(1, 256)))
        first, second = sf.verify_shard(path), sf.verify_shard(path)
        assert first == second and len(first) == 1 and "dataset heatmap unreadable" in first[0], (position, first)
        path.write_bytes(pristine)


def test_a_shard_written_on_a_full_disk_is_disk_full_at_every_fill_level(tmp_path, small_disk, monkeypatch):
    """Written by HDF5 itself, a shard whose data fit but whose metadata did not failed while HDF5 flushed
    at close: a RuntimeError, and a traceback on stderr for every object freed after it. Built in
    memory, it is one write: DiskFull naming the shard, whatever room there was, and nothing left."""
    items = _items(3)
    sf.write_shard(tmp_path / "shard-000001.h5", items, METADATA)
    size = (tmp_path / "shard-000001.h5").stat().st_size
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    path = small_disk / "shard-000001.h5"
    for leave in range(0, size - 4096, 512):
        ballast = fill(small_disk, leave)
        with pytest.raises(DiskFull, match=re.escape(f"no space left on device: {path}")):
            sf.write_shard(path, items, METADATA)
        assert sorted(small_disk.iterdir()) == [ballast] and unraisable == [], leave
        ballast.unlink()
    sf.write_shard(path, items, METADATA)
    assert sf.verify_shard(path) == []


def test_a_kill_9_while_the_index_is_made_leaves_no_index_a_reader_refuses(tmp_path):
    """Killed (SIGKILL, a real one) after the tables exist and before the schema version is committed:
    no index.sqlite, so readers say "no shard index here" and the next writer makes a whole one and
    clears the temporary file the kill left."""
    folder = tmp_path / "shards"
    folder.mkdir()
    code = ("import os, signal, sys\n"
            "from pose_prep import shard_format\n"
            "shard_format.set_meta = lambda *args: os.kill(os.getpid(), signal.SIGKILL)\n"
            "with shard_format.open_index(sys.argv[1]):\n"
            "    pass\n")
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert not (folder / sf.INDEX_NAME).exists()
    left = [p.name for p in folder.iterdir()]
    assert left and all(name.startswith(f".{sf.INDEX_NAME}.") for name in left), left
    with pytest.raises(sf.ShardFormatError, match="no shard index here"):
        with sf.open_index(folder, readonly=True):
            pass
    with sf.open_index(folder) as connection:
        sf.remove_orphans(folder, connection)
    assert [p.name for p in folder.iterdir() if not p.name.startswith(f"{sf.INDEX_NAME}-")] == [sf.INDEX_NAME]
    with sf.open_index(folder, readonly=True) as connection:
        assert sf._schema_version(connection) == str(sf.SCHEMA_VERSION)
