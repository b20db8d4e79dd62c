import errno
import json
import os
import pickle
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import fixture_set
from fifo_reader import read_fifo_in_thread
import small_disk as small_disk_module
from cli import main as vsam
from pose_prep.atomic import (DiskFull, UnusableOutput, atomic_path, atomic_write_text, check_folder_can_be_made,
                              disk_full, is_stream, temporary_files)
from pose_prep.prep import PrepOptions, catalog_problems, run
from pose_prep.shard_format import verify_collection
from vsam_train.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
VSAM = str(Path(sys.executable).with_name("vsam"))
TINY = REPO / "configs" / "tiny.yaml"


@pytest.mark.parametrize("durable", [False, True])
def test_the_new_content_replaces_the_file_only_when_the_block_completes(tmp_path, durable):
    target = tmp_path / "report.json"
    target.write_text("old")
    with atomic_path(target, durable=durable) as temporary:
        assert re.fullmatch(r"\.report\.json\.[0-9a-f]{8}\.tmp", temporary.name) and temporary.parent == tmp_path
        temporary.write_bytes(b"new")
        assert target.read_text() == "old"
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_each_writer_has_its_own_temporary_file_with_the_usual_permissions(tmp_path):
    target = tmp_path / "preds.jsonl"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second and temporary_files(target) == sorted([first, second])
        first.write_text("first")
        second.write_text("second")
    assert target.read_text() == "first"           # the last rename (the outer block's) wins, whole
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask    # not mkstemp's 0600


def test_a_single_writer_uses_the_fixed_name_a_later_run_cleans_up(tmp_path):
    with atomic_path(tmp_path / "shard-000001.h5", single_writer=True) as temporary:
        assert temporary == tmp_path / ".shard-000001.h5.tmp"
        temporary.write_bytes(b"rows")
    assert (tmp_path / "shard-000001.h5").read_bytes() == b"rows"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "last.pt"
    target.write_text("old")
    with pytest.raises(ZeroDivisionError):
        with atomic_path(target, durable=True) as temporary:
            temporary.write_text("half")
            1 / 0
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_text_is_written_as_utf8(tmp_path):
    atomic_write_text(tmp_path / "a.json", "größe")
    assert (tmp_path / "a.json").read_bytes() == "größe".encode("utf-8")



# --- what the output path already is: a link, a stream, something that is not a file -------------

def test_a_symlink_is_followed_and_the_file_it_leads_to_replaced_in_its_own_folder(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "links").mkdir()
    target = tmp_path / "runs" / "preds.jsonl"
    target.write_text("old")
    link = tmp_path / "links" / "preds.jsonl"
    link.symlink_to(Path("..") / "runs" / "preds.jsonl")
    with atomic_path(link) as temporary:
        assert temporary.parent == target.parent      # the rename stays within the target's filesystem
        temporary.write_text("new")
    assert link.is_symlink() and os.readlink(link) == str(Path("..") / "runs" / "preds.jsonl")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["links", "preds.jsonl", "preds.jsonl", "runs"]


def test_a_fifo_is_written_in_place_and_stays_a_fifo(tmp_path):
    fifo = tmp_path / "preds.jsonl"
    os.mkfifo(fifo)
    reader, received = read_fifo_in_thread(fifo)
    atomic_write_text(fifo, "line 1\nline 2\n", durable=True)
    reader.join(timeout=30)
    assert received == [b"line 1\nline 2\n"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and [p.name for p in tmp_path.iterdir()] == ["preds.jsonl"]


def test_a_character_device_is_written_in_place_and_stays_one(tmp_path):
    # Our own node of the null device (1, 3), so that a regression replaces a file of tmp_path, never /dev/null.
    device = tmp_path / "null"
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        device.write_text("probe")
    except OSError as error:       # not root, or a filesystem mounted nodev
        pytest.skip(f"cannot make a usable character device here: {error}")
    before = os.lstat(device)
    atomic_write_text(device, "discarded")
    after = os.lstat(device)
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev and after.st_ino == before.st_ino
    assert [p.name for p in tmp_path.iterdir()] == ["null"]
    assert is_stream("/dev/null")           # the real one is only looked at, never written


def test_a_file_a_shell_redirection_opened_is_written_in_place_through_dev_fd(tmp_path):
    # Replacing the file would leave the shell writing "after" into the deleted old one. /dev/fd/1, not
    # /dev/stdout: a regression must fail here (no temporary file can be made in /proc/PID/fd), not
    # rename a regular file over the machine's /dev/stdout.
    out = tmp_path / "log.txt"
    out.write_text("")
    writer = "from pose_prep.atomic import atomic_write_text; atomic_write_text('/dev/fd/1', 'new\\n')"
    with open(out, "a") as appended:
        subprocess.run(["sh", "-c", f'"{sys.executable}" -c "{writer}" && echo after'], stdout=appended,
                       check=True, cwd=REPO, timeout=60)
    assert out.read_text() == "new\nafter\n"


def test_a_folder_can_be_made_unless_a_file_is_in_its_way(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("kept")
    for folder in (tmp_path, tmp_path / "new" / "deeper"):
        check_folder_can_be_made(folder)
    for folder in (afile, afile / "run", afile / "deeper" / "run"):
        with pytest.raises(UnusableOutput, match=f"^not a folder: {re.escape(str(afile))}$"):
            check_folder_can_be_made(folder)
    assert afile.read_text() == "kept" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_folder_a_socket_and_a_path_under_a_file_are_refused_in_one_line_naming_them(tmp_path, monkeypatch):
    folder = tmp_path / "folder"
    folder.mkdir()
    afile = tmp_path / "afile"
    afile.write_text("kept")
    with pytest.raises(UnusableOutput, match=f"^a folder, not a file: {re.escape(str(folder))}$"):
        atomic_write_text(folder, "x")
    for under in (afile / "x.jsonl", afile / "deeper" / "x.jsonl"):
        with pytest.raises(UnusableOutput, match=f"^not a folder: {re.escape(str(afile))}$"):
            atomic_write_text(under, "x")
    listening = socket.socket(socket.AF_UNIX)
    monkeypatch.chdir(tmp_path)     # a short relative name: socket paths are limited to 107 bytes
    listening.bind("sock")
    try:
        with pytest.raises(UnusableOutput, match="^not a file, a character device or a FIFO: sock$"):
            atomic_write_text("sock", "x")
        assert stat.S_ISSOCK(os.lstat("sock").st_mode)
    finally:
        listening.close()
    assert afile.read_text() == "kept" and folder.is_dir() and not list(tmp_path.glob(".*.tmp"))

# --- two writers at once (real processes) -------------------------------------------------------

WRITER = """
import sys
from pose_prep.atomic import atomic_write_text
target, letter, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
for n in range(rounds):
    atomic_write_text(target, "".join(f"{letter} {n} {i}\\n" for i in range(20000)))
"""


def _whole(text: str) -> bool:
    """One writer's complete file: 20,000 lines of one letter and one round, numbered in order."""
    lines = text.splitlines()
    if len(lines) != 20000 or not text.endswith("\n"):
        return False
    letter, round_, _ = lines[0].split(" ")
    return lines == [f"{letter} {round_} {i}" for i in range(20000)]


def test_two_processes_writing_one_file_never_publish_a_mix(tmp_path):
    target = tmp_path / "preds.jsonl"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(target), letter, "40"], cwd=REPO)
               for letter in "AB"]
    seen = 0
    while any(w.poll() is None for w in writers):
        if target.exists():
            text = target.read_text()
            assert _whole(text), f"a mixed or partial file was published: {text[:80]!r} … ({len(text)} chars)"
            seen += 1
    assert [w.returncode for w in writers] == [0, 0]
    assert _whole(target.read_text()) and seen > 0
    assert [p.name for p in tmp_path.iterdir()] == ["preds.jsonl"]      # no temporary file left behind


def test_two_vsam_predict_into_one_file_leave_one_complete_output(tiny_onnx, df_val_images, tmp_path):
    # From the ONNX export: predict_to_file writes the same way for both model files, and neither
    # process spends 3 CPU-seconds importing torch (with the fixed temporary name of before 0ec04ff,
    # 6 of 6 trials of this test failed: rename of a vanished .tmp).
    out = tmp_path / "preds.jsonl"
    command = [VSAM, "predict", "--model", str(tiny_onnx), "--images", str(df_val_images),
               "--out", str(out), "--workers", "0", "--batch-size", "4", "--device", "cpu"]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for process in runs:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]   # NUL bytes would fail
    paths = [line["path"] for line in lines]
    expected = sorted(p.relative_to(df_val_images).as_posix() for p in df_val_images.rglob("*") if p.is_file())
    assert sorted(paths) == expected                    # every image once: one run's whole output
    assert [p.name for p in tmp_path.iterdir()] == ["preds.jsonl"]


# --- a full disk (a real small tmpfs: the small_disk fixture) ------------------------------------

def _last_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    return stderr.strip().splitlines()[-1]


def test_prep_on_a_full_disk_says_so_in_one_line_and_the_next_run_completes(tmp_path, small_disk):
    images = fixture_set.copy_photos(tmp_path / "img", sorted(p.name for p in fixture_set.PHOTOS.glob("*.jpg"))[:12])
    out = small_disk / "shards"
    ballast = small_disk_module.fill(small_disk, 300_000)          # room for a few of the 12 photos stored at full size
    result = subprocess.run([VSAM, "prep-pose", "--images", str(images), "--out", str(out), "--detector", "blazepose",
                             "--max-side", "0", "--shard-size", "2", "--no-progress"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert re.fullmatch(f"vsam prep-pose: no space left on device: {re.escape(str(out))}/\\S+",
                        _last_line(result.stderr)), result.stderr
    assert verify_collection(out) == []           # what was committed is sound, no temporary file left
    ballast.unlink()                              # the disk was freed: the next run stores the rest
    report = run(PrepOptions(images=images, out=out, detector="blazepose", max_side=0, shard_size=2, progress=False))
    assert report.exit_code == 0 and catalog_problems(out, images) == []


@pytest.mark.parametrize("leave", [8_000, 36_000])     # SQLite says SQLITE_FULL, or cannot grow its WAL -shm file
def test_prep_on_a_disk_too_full_for_the_index_names_the_index(tmp_path, small_disk, leave):
    images = fixture_set.copy_photos(tmp_path / "img", sorted(p.name for p in fixture_set.PHOTOS.glob("*.jpg"))[:1])
    small_disk_module.fill(small_disk, leave)
    with pytest.raises(DiskFull) as raised:
        run(PrepOptions(images=images, out=small_disk / "shards", detector="blazepose", progress=False))
    assert str(raised.value) == f"no space left on device: {small_disk / 'shards' / 'index.sqlite'}"


def test_disk_full_names_the_file_and_survives_a_worker_process_boundary():
    error = pickle.loads(pickle.dumps(disk_full("/runs/a/last.pt")))
    assert isinstance(error, DiskFull) and error.errno == errno.ENOSPC
    assert str(error) == "no space left on device: /runs/a/last.pt"
    assert str(disk_full("/q/x", errno.EDQUOT)) == "disk quota exceeded: /q/x"


def test_train_on_a_full_disk_says_so_in_one_line_and_resume_goes_on(df_shards, small_disk):
    run_dir = small_disk / "run"
    last = run_dir / "checkpoints" / "last.pt"
    settings = ["train.epochs=3", "train.batch_size=16", "train.max_steps_per_epoch=1",   # epochs of one step
                "train.keep_epoch_checkpoints=false", "data.num_workers=0", "data.max_val_batches=1"]
    command = ["train", "--shards", str(df_shards), "--out", str(run_dir), "--config", str(TINY), "--device", "cpu",
               *[arg for s in settings for arg in ("--set", s)]]
    # 1600 KiB hold one ~1 MB checkpoint but not a second one beside it: epoch 2's save fails.
    result = subprocess.run([VSAM, *command], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1
    assert _last_line(result.stderr) == f"vsam train: no space left on device: {last}", result.stderr
    assert load_checkpoint(last)["epoch"] == 1 and not list(last.parent.glob(".*.tmp"))
    small_disk_module.grow(small_disk, "8m")
    resumed = CliRunner().invoke(vsam, [*command, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert load_checkpoint(last)["epoch"] == 3


@pytest.mark.parametrize("command", ["predict", "eval", "export"])
def test_an_output_on_a_full_disk_is_one_line_naming_it(command, tiny_checkpoint, df_shards, df_val_images, small_disk):
    out = small_disk / {"predict": "preds.jsonl", "eval": "metrics.json", "export": "model.onnx"}[command]
    arguments = {"predict": ["--images", str(df_val_images), "--out", str(out), "--workers", "0"],
                 "eval": ["--shards", str(df_shards), "--json", str(out), "--workers", "0"],
                 "export": ["--format", "onnx", "--out", str(out)]}[command]
    small_disk_module.fill(small_disk, 2_000)
    result = CliRunner().invoke(vsam, [command, "--checkpoint", str(tiny_checkpoint), *arguments, "--device", "cpu"]
                                if command != "export" else [command, "--checkpoint", str(tiny_checkpoint), *arguments])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == f"vsam {command}: no space left on device: {out}"
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert sorted(p.name for p in small_disk.iterdir()) == ["ballast"]      # neither output nor temporary
