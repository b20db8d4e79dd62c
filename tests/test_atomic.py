import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pose_prep.atomic import atomic_path, atomic_write_text, temporary_files

REPO = Path(__file__).resolve().parents[1]
VSAM = str(Path(sys.executable).with_name("vsam"))


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


def test_two_vsam_predict_into_one_file_leave_one_complete_output(tiny_checkpoint, df_val_images, tmp_path):
    out = tmp_path / "preds.jsonl"
    command = [VSAM, "predict", "--checkpoint", str(tiny_checkpoint), "--images", str(df_val_images),
               "--out", str(out), "--workers", "0", "--batch-size", "4", "--device", "cpu"]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for run in runs:
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]   # NUL bytes would fail
    paths = [line["path"] for line in lines]
    expected = sorted(p.relative_to(df_val_images).as_posix() for p in df_val_images.rglob("*") if p.is_file())
    assert sorted(paths) == expected                    # every image once: one run's whole output
    assert [p.name for p in tmp_path.iterdir()] == ["preds.jsonl"]
