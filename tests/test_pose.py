import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import awkward_names
import bad_images
from cli import main as vsam
from pose_prep import keypoints as kp
from pose_prep.detectors.openpose_json import keypoints_file_name
from pose_prep.images import printable_name
from pose_prep.pose import FAILURES_FILE, main_person_first, run
from pose_prep.sample_images import NOBODY, PEOPLE, write_sample_images

VSAM = str(Path(sys.executable).with_name("vsam"))


@pytest.fixture(scope="module")
def sample_folder(tmp_path_factory):
    """The demo's package photos, a nested folder with an upper-case suffix, and two bad files."""
    folder = tmp_path_factory.mktemp("catalog")
    write_sample_images(folder)
    (folder / "spring" / "looks").mkdir(parents=True)
    shutil.move(folder / "astronaut.png", folder / "spring" / "looks" / "Astronaut.PNG")
    jpeg = (folder / "grace_hopper.jpg").read_bytes()
    (folder / "spring" / "cut_short.jpg").write_bytes(jpeg[: len(jpeg) // 4])
    (folder / "readme.jpg").write_text("this is not a photo")
    return folder


def _people(path: Path) -> list:
    data = json.loads(path.read_text())
    assert data["version"] == 1.3 and set(data) == {"version", "people"}
    return data["people"]


def test_cli_writes_openpose_json_overlays_and_a_summary(sample_folder, tmp_path):
    out = tmp_path / "pose"
    result = CliRunner().invoke(vsam, ["pose", "--images", str(sample_folder), "--out", str(out), "--overlays"])
    assert result.exit_code == 0, result.output
    images_total = len(PEOPLE) + len(NOBODY) + 2
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"vsam pose: {images_total} images: 3 with a person, 2 without, 2 failed"), summary

    for stem in ("grace_hopper", "camera", "spring/looks/Astronaut"):
        (person,) = _people(out / f"{stem}_keypoints.json")[:1]
        values = person["pose_keypoints_2d"]
        assert len(values) == 54 and max(values[2::3]) <= 1
    for stem in ("chelsea", "coffee"):
        assert _people(out / f"{stem}_keypoints.json") == []
    assert not (out / "readme_keypoints.json").exists() and not (out / "spring/cut_short_keypoints.json").exists()

    failures = [json.loads(line) for line in (out / FAILURES_FILE).read_text().splitlines()]
    assert {f["file"]: f["reason"].split(" (")[0] for f in failures} == {
        "readme.jpg": "not an image", "spring/cut_short.jpg": "corrupt or truncated image"}
    for failure in failures:
        assert f"failed: {sample_folder / failure['file']}: " in result.stderr

    photo = np.asarray(Image.open(sample_folder / "grace_hopper.jpg").convert("RGB"))
    overlay = np.asarray(Image.open(out / "grace_hopper_overlay.png"))
    assert overlay.shape == photo.shape
    neck = np.array(_people(out / "grace_hopper_keypoints.json")[0]["pose_keypoints_2d"][3:5]).astype(int)
    y, x = neck[1], neck[0]
    assert np.abs(overlay[y - 5:y + 5, x - 5:x + 5].astype(int) - photo[y - 5:y + 5, x - 5:x + 5]).mean() > 20, \
        "heatmap and skeleton drawn at the neck"
    assert (out / "chelsea_overlay.png").exists() and (out / "spring/looks/Astronaut_overlay.png").exists()


def test_keypoints_feed_openpose_json_back(sample_folder, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    run(sample_folder, first, "blazepose", progress=False)
    summary = run(sample_folder, second, f"openpose-json:{first}", progress=False)
    assert summary.with_person == 3 and summary.without_person == 2
    for path in first.rglob("*_keypoints.json"):
        assert json.loads(path.read_text()) == json.loads((second / path.relative_to(first)).read_text())


def test_two_worker_processes_give_the_same_keypoints(sample_folder, tmp_path):
    in_process, workers = tmp_path / "one", tmp_path / "two"
    run(sample_folder, in_process, "blazepose", progress=False)
    completed = subprocess.run([VSAM, "pose", "--images", str(sample_folder), "--out", str(workers),
                                "--detector", "blazepose", "--jobs", "2", "--no-progress"],
                               capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "7 images: 3 with a person, 2 without, 2 failed" in completed.stdout
    expected = sorted(p.relative_to(in_process) for p in in_process.rglob("*_keypoints.json"))
    assert sorted(p.relative_to(workers) for p in workers.rglob("*_keypoints.json")) == expected
    for relative in expected:
        ours, theirs = kp.read_openpose_json(in_process / relative), kp.read_openpose_json(workers / relative)
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            np.testing.assert_allclose(a, b, atol=1.0)


def test_every_bad_image_gets_one_record_and_the_run_goes_on(tmp_path):
    expected = bad_images.make_bad_image_folder(tmp_path / "bad")
    summary = run(tmp_path / "bad", tmp_path / "out", "blazepose", progress=False)
    failing = {name: reason for name, reason in expected.items() if reason is not None}
    assert summary.images == len(expected)
    assert summary.failed == len(failing)
    assert {f.relative_path: f.reason for f in summary.failures}.keys() == failing.keys()
    for failure in summary.failures:
        assert failing[failure.relative_path] in failure.reason
    records = (tmp_path / "out" / FAILURES_FILE).read_text().splitlines()
    assert len(records) == len(failing)
    for name in set(expected) - set(failing):
        assert (tmp_path / "out" / (str(Path(name).with_suffix("")) + "_keypoints.json")).exists(), name
    # The photos of people, whatever their encoding, all show someone.
    assert summary.with_person == len(expected) - len(failing)


def test_a_file_gone_bad_leaves_no_stale_keypoints(tmp_path):
    folder = tmp_path / "images"
    write_sample_images(folder)
    run(folder, tmp_path / "out", "blazepose", overlays=True, progress=False)
    assert (tmp_path / "out" / "grace_hopper_keypoints.json").exists()
    (folder / "grace_hopper.jpg").write_bytes(b"")
    summary = run(folder, tmp_path / "out", "blazepose", overlays=True, progress=False)
    assert [f.relative_path for f in summary.failures] == ["grace_hopper.jpg"]
    assert not (tmp_path / "out" / "grace_hopper_keypoints.json").exists()
    assert not (tmp_path / "out" / "grace_hopper_overlay.png").exists()


def test_an_output_folder_inside_the_images_is_not_read_back(tmp_path):
    folder = tmp_path / "images"
    write_sample_images(folder)
    first = run(folder, folder / "pose", "blazepose", overlays=True, progress=False)
    again = run(folder, folder / "pose", "blazepose", overlays=True, progress=False)
    assert first.images == again.images == len(PEOPLE) + len(NOBODY)


def test_two_images_with_one_output_name(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    bad_images.grace_hopper().save(folder / "look.jpg")
    bad_images.astronaut().save(folder / "look.png")
    summary = run(folder, tmp_path / "out", "blazepose", progress=False)
    (failure,) = summary.failures
    assert failure.relative_path == "look.png" and "look_keypoints.json" in failure.reason
    assert summary.with_person == 1


def test_exit_codes(tmp_path):
    runner = CliRunner()
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "empty.jpg").write_bytes(b"")
    result = runner.invoke(vsam, ["pose", "--images", str(only_bad), "--out", str(tmp_path / "o1"),
                                  "--detector", "blazepose"])
    assert result.exit_code == 1 and "1 images: 0 with a person, 0 without, 1 failed" in result.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(vsam, ["pose", "--images", str(empty), "--out", str(tmp_path / "o2"),
                                  "--detector", "blazepose"])
    assert result.exit_code == 1 and "nothing could be processed" in result.stderr
    result = runner.invoke(vsam, ["pose", "--images", str(empty), "--out", str(tmp_path / "o3"),
                                  "--detector", "openpose"])
    assert result.exit_code == 2 and "unknown detector 'openpose'" in result.stderr
    result = runner.invoke(vsam, ["pose", "--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o4")])
    assert result.exit_code == 2


def test_help_texts():
    runner = CliRunner()
    for command in ([], ["pose"], ["pose-eval"]):
        result = runner.invoke(vsam, command + ["--help"])
        assert result.exit_code == 0 and "Usage:" in result.output
    assert "--overlays" in runner.invoke(vsam, ["pose", "--help"]).output


def test_main_person_comes_first():
    small, large = kp.empty(), kp.empty()
    small[[2, 11]] = [(10, 10, 1), (20, 20, 1)]
    large[[2, 11]] = [(40, 40, 1), (90, 90, 1)]
    ordered = main_person_first([small, large], 100, 100)
    assert ordered[0] is large and ordered[1] is small
    assert main_person_first([], 100, 100) == []


def test_awkward_file_names_are_processed_and_names_that_are_not_utf8_rejected(tmp_path):
    """Real files: valid UTF-8 names (spaces, a leading dash, #, %, ?, HTML characters, a newline) get
    their keypoints; a name that is not valid UTF-8 is a failure named with \\xNN escapes, as every
    command names it; every output file name and pose_failures.jsonl are valid UTF-8."""
    images, out = tmp_path / "drop", tmp_path / "out"
    expected = awkward_names.make_awkward_name_folder(images)
    result = CliRunner().invoke(vsam, ["pose", "--images", str(images), "--out", str(out), "--detector", "blazepose"])
    assert result.exit_code == 0, result.output
    rejected = {name: reason for name, reason in expected.items() if reason}
    assert f"{len(expected)} images: {len(expected) - len(rejected)} with a person, 0 without, " \
           f"{len(rejected)} failed" in result.output
    failures = [json.loads(line) for line in (out / FAILURES_FILE).read_bytes().decode("utf-8").splitlines()]
    assert {f["file"]: f["reason"] for f in failures} == rejected
    for name, reason in rejected.items():
        assert f"failed: {images}/{printable_name(name)}: {reason}\n" in result.output
    for name in set(expected) - set(rejected):
        assert (out / keypoints_file_name(name)).is_file(), name
    for folder, _, files in os.walk(os.fsencode(out)):
        for file in files:
            os.path.join(folder, file).decode("utf-8")      # strict: no output named with the bad bytes
