"""cli.py: the exit codes every command shares (0 ok, 1 failed, 2 usage, 75 busy)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import fixture_set
from unprivileged import without_file_permission_override
from cli import EXIT_FAILED, main as vsam

TINY = "configs/tiny.yaml"
VSAM = str(Path(sys.executable).with_name("vsam"))


@pytest.mark.parametrize("command", ["pose", "prep-pose", "train", "predict", "explain", "export", "audit",
                                     "experiment label-noise", "experiment audit"])
def test_an_output_under_a_regular_file_is_one_line_naming_it_and_exit_1(command, tmp_path, request):
    """An output folder (or file) that cannot be created is not a traceback: one line naming the file in the
    way (not the OS's "Not a directory" about the folder it could not make), exit 1, the file untouched."""
    blocker = tmp_path / "a-file"
    blocker.write_text("kept")
    out = blocker / "deeper" / "out"
    images = fixture_set.copy_photos(tmp_path / "img", sorted(p.name for p in fixture_set.PHOTOS.glob("*.jpg"))[:1])
    if command in ("pose", "prep-pose"):
        arguments = ["--images", str(images), "--out", str(out), "--detector", "blazepose", "--no-progress"]
    elif command == "train":
        arguments = ["--shards", str(request.getfixturevalue("df_shards")), "--out", str(out), "--config", TINY,
                     "--device", "cpu"]
    elif command.startswith("experiment"):
        arguments = ["--shards", str(request.getfixturevalue("df_shards")), "--config", TINY, "--out", str(out),
                     {"experiment label-noise": "--attribute", "experiment audit": "--drop-attribute"}[command],
                     "floral"]
    else:
        checkpoint = ["--checkpoint", str(request.getfixturevalue("tiny_checkpoint"))]
        arguments = {"predict": [*checkpoint, "--images", str(images), "--out", str(out), "--workers", "0"],
                     "explain": [*checkpoint, "--images", str(images), "--out", str(out)],
                     "export": [*checkpoint, "--format", "onnx", "--out", str(out)],
                     "audit": [*checkpoint, "--shards", str(request.getfixturevalue("df_shards")), "--out",
                               str(out)]}[command]
    result = CliRunner().invoke(vsam, [*command.split(), *arguments])
    assert result.exit_code == EXIT_FAILED, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.output.strip().splitlines()[-1] == f"vsam {command}: not a folder: {blocker}", result.output
    assert blocker.read_text() == "kept"


@pytest.mark.parametrize("command", ["pose", "predict", "explain"])
def test_a_subfolder_that_cannot_be_listed_is_named_on_stderr_and_the_rest_is_processed(command, tmp_path, request):
    """Photos a command could not see are never silent: one `unreadable:` line naming the folder, exit 0,
    the other photos done. Run without CAP_DAC_OVERRIDE (as cron's user), since as root mode 000 is readable."""
    names = sorted(p.name for p in fixture_set.PHOTOS.glob("*.jpg"))[:2]
    images = tmp_path / "img"
    fixture_set.copy_photos(images / "tops", names[:1])
    locked = fixture_set.copy_photos(images / "dresses", names[1:])
    out = tmp_path / ("out.jsonl" if command == "predict" else "out")
    arguments = {"pose": ["--detector", "blazepose", "--no-progress"], "predict": ["--workers", "0", "--no-progress"],
                 "explain": ["--no-progress"]}[command]
    if command != "pose":
        arguments += ["--checkpoint", str(request.getfixturevalue("tiny_checkpoint"))]
    locked.chmod(0o000)
    try:
        result = subprocess.run([*without_file_permission_override(), VSAM, command, "--images", str(images),
                                 "--out", str(out), *arguments], capture_output=True, text=True, timeout=300)
    finally:
        locked.chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert f"unreadable: {locked}: Permission denied (its photos are skipped)" in result.stderr.splitlines()
    done = {"pose": lambda: [p.relative_to(out).as_posix() for p in out.rglob("*.json")],
            "predict": lambda: [json.loads(line)["path"] for line in out.read_text().splitlines()],
            "explain": lambda: [p.name for p in (out / "images").iterdir()]}[command]()
    assert len(done) == 1, done        # the photo under tops/ (explain's folders are numbered, not nested)
    assert command == "explain" or done[0].startswith("tops/"), done


@pytest.mark.parametrize("command", ["predict", "eval", "export"])
def test_an_empty_output_path_is_a_usage_error_and_one_under_a_file_names_that_file(command, tmp_path, request):
    checkpoint = ["--checkpoint", str(request.getfixturevalue("tiny_checkpoint"))]
    images = fixture_set.copy_photos(tmp_path / "img", sorted(p.name for p in fixture_set.PHOTOS.glob("*.jpg"))[:1])
    option, arguments = {"predict": ("--out", [*checkpoint, "--images", str(images), "--workers", "0"]),
                         "eval": ("--json", [*checkpoint, "--shards", str(request.getfixturevalue("df_shards")),
                                             "--workers", "0"]),
                         "export": ("--out", [*checkpoint, "--format", "onnx"])}[command]
    result = CliRunner().invoke(vsam, [command, *arguments, option, ""])
    assert result.exit_code == 2 and f"Invalid value for '{option}': an empty path; give a file name" in result.output
    blocker = tmp_path / "afile"
    blocker.write_text("kept")
    result = CliRunner().invoke(vsam, [command, *arguments, option, str(blocker / "deeper" / "x.onnx")])
    assert result.exit_code == EXIT_FAILED, result.output
    assert result.output.strip().splitlines()[-1] == f"vsam {command}: not a folder: {blocker}"
    assert blocker.read_text() == "kept"
    if command == "eval":        # said before the evaluation, not after it: no table printed
        assert "group top-1" not in result.output.lower() and len(result.output.strip().splitlines()) == 1
