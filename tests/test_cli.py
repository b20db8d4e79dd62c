"""cli.py: the exit codes every command shares (0 ok, 1 failed, 2 usage, 75 busy)."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

import fixture_set
from cli import EXIT_FAILED, main as vsam

TINY = "configs/tiny.yaml"


@pytest.mark.parametrize("command", ["pose", "prep-pose", "train", "predict", "explain", "export"])
def test_an_output_under_a_regular_file_is_one_line_naming_it_and_exit_1(command, tmp_path, request):
    """An output folder (or file) that cannot be created is not a traceback: one line naming it, exit 1."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "out"
    images = fixture_set.copy_photos(tmp_path / "img", sorted(p.name for p in fixture_set.PHOTOS.glob("*.jpg"))[:1])
    if command in ("pose", "prep-pose"):
        arguments = ["--images", str(images), "--out", str(out), "--detector", "blazepose", "--no-progress"]
    elif command == "train":
        arguments = ["--shards", str(request.getfixturevalue("df_shards")), "--out", str(out), "--config", TINY,
                     "--device", "cpu"]
    else:
        checkpoint = ["--checkpoint", str(request.getfixturevalue("tiny_checkpoint"))]
        arguments = {"predict": [*checkpoint, "--images", str(images), "--out", str(out), "--workers", "0"],
                     "explain": [*checkpoint, "--images", str(images), "--out", str(out)],
                     "export": [*checkpoint, "--format", "onnx", "--out", str(out)]}[command]
    result = CliRunner().invoke(vsam, [command, *arguments])
    assert result.exit_code == EXIT_FAILED, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    (line,) = result.output.strip().splitlines()[-1:]
    assert line.startswith(f"vsam {command}: ") and str(blocker) in line, result.output
