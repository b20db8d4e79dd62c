"""YOLO11n-pose through onnxruntime (pose_prep/detectors/yolo_onnx.py) against ultralytics' torch path."""
import os
import subprocess
import sys

import numpy as np
import pytest

import fixture_set
from pose_prep import images
from pose_prep.detectors import yolo
from pose_prep.detectors.yolo_onnx import letterbox

# The tolerances yolo.py checks every export with; measured on 900 DeepFashion photos: 6e-4 px, 5e-6.
XY, SCORE = yolo.KEYPOINT_TOLERANCE_PX, yolo.SCORE_TOLERANCE


@pytest.fixture(scope="module")
def torch_yolo():
    return yolo.Yolo(runtime="torch")


@pytest.fixture(scope="module")
def people_photos():
    """The 12 fixture photos (real COCO photos) with the most annotated people, decoded."""
    data = fixture_set.keypoint_annotations()
    counts = {}
    for annotation in data["annotations"]:
        counts[annotation["image_id"]] = counts.get(annotation["image_id"], 0) + 1
    chosen = sorted(counts, key=lambda i: (-counts[i], i))[:12]
    names = {i["id"]: i["file_name"] for i in data["images"]}
    return {names[i]: images.load(fixture_set.PHOTOS / names[i])[1].rgb for i in chosen}


def test_the_default_runtime_is_onnx_and_the_version_says_so(yolo_detector, torch_yolo):
    assert yolo_detector.runtime == "onnx" and yolo_detector.version.startswith("onnxruntime-")
    assert torch_yolo.runtime == "torch" and torch_yolo.version.startswith("ultralytics-")
    # Same weights: the versions differ only in the library that ran them.
    assert yolo_detector.version.split("-yolo11n-pose-")[1] == torch_yolo.version.split("-yolo11n-pose-")[1]


def test_onnx_gives_the_torch_paths_people_boxes_and_keypoints_on_real_photos(yolo_detector, torch_yolo,
                                                                               people_photos):
    found = 0
    for name, rgb in people_photos.items():
        boxes, scores, points = yolo_detector._model.predict(rgb, yolo.MIN_BOX_SCORE)
        want_boxes, want_scores, want_points = torch_yolo._model.predict(rgb, yolo.MIN_BOX_SCORE)
        assert len(scores) == len(want_scores), name
        np.testing.assert_allclose(scores, want_scores, atol=SCORE, rtol=0, err_msg=name)
        np.testing.assert_allclose(boxes, want_boxes, atol=XY, rtol=0, err_msg=name)
        np.testing.assert_allclose(points[..., :2], want_points[..., :2], atol=XY, rtol=0, err_msg=name)
        np.testing.assert_allclose(points[..., 2], want_points[..., 2], atol=SCORE, rtol=0, err_msg=name)
        # And so the same COCO-18 persons, in the same order, once YOLO's thresholds are applied.
        persons, want = yolo_detector.detect_scored(rgb), torch_yolo.detect_scored(rgb)
        assert len(persons) == len(want), name
        for (person, _), (wanted, _) in zip(persons, want):
            np.testing.assert_array_equal(person[:, 2] > 0, wanted[:, 2] > 0, err_msg=name)
            np.testing.assert_allclose(person, wanted, atol=XY, rtol=0, err_msg=name)
        found += len(persons)
    assert found >= 20, "the photos hold enough people for the comparison to mean something"


def test_letterbox_is_ultralytics_letterbox():
    from ultralytics.data.augment import LetterBox

    theirs = LetterBox(640, auto=True, stride=32)
    rng = np.random.default_rng(0)
    # Portrait, landscape, odd sizes, tiny, thin, already 640 and larger than 640.
    for height, width in ((300, 200), (200, 300), (333, 517), (17, 9), (1000, 3), (640, 480), (1280, 960)):
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        ours, _, _ = letterbox(rgb)
        np.testing.assert_array_equal(ours, theirs(image=rgb), err_msg=f"{height}x{width}")
        assert ours.shape[0] % 32 == 0 and ours.shape[1] % 32 == 0 and max(ours.shape[:2]) == 640


def test_an_unusable_cache_falls_back_to_the_torch_path_and_says_so(tmp_path, monkeypatch, capfd):
    not_a_folder = tmp_path / "cache-is-a-file"
    not_a_folder.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(not_a_folder))
    detector = yolo.Yolo(runtime="onnx")
    assert detector.runtime == "torch" and detector.version.startswith("ultralytics-")
    assert "yolo: ultralytics' torch path instead of onnxruntime: exporting yolo11n-pose.pt" in capfd.readouterr().err


def test_a_damaged_cached_export_falls_back_to_the_torch_path_and_names_the_file(yolo_detector, tmp_path,
                                                                                monkeypatch, capfd):
    weights = yolo.weights_path()
    digest = yolo._short_digest(weights)
    export = yolo.onnx_path(weights, digest).read_bytes()     # the real export (yolo_detector made it)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    damaged = yolo.onnx_path(weights, digest)
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(export[:len(export) // 2])            # cut in half, as a full disk or a copy leaves it
    detector = yolo.Yolo(runtime="onnx")
    assert detector.runtime == "torch" and detector.version.startswith("ultralytics-")
    assert (f"yolo: ultralytics' torch path instead of onnxruntime: onnxruntime cannot load {damaged} "
            in capfd.readouterr().err)


def test_workers_that_start_at_once_on_an_empty_cache_export_once_and_all_use_onnx(tmp_path):
    """As the --jobs workers of a first run do: two processes want the export at the same moment."""
    code = "from pose_prep.detectors.yolo import Yolo; print(Yolo(runtime='onnx').runtime)"
    environment = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    workers = [subprocess.Popen([sys.executable, "-c", code], env=environment, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [worker.communicate(timeout=600) for worker in workers]
    assert [out.strip() for out, _ in outputs] == ["onnx", "onnx"], outputs
    assert sum(err.count("yolo: exporting yolo11n-pose.pt to ONNX once") for _, err in outputs) == 1, outputs
    assert len(list((tmp_path / "vsam" / "yolo").glob("*.onnx"))) == 1


def test_the_runtime_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(yolo.RUNTIME_ENV, "torch")
    assert yolo.check_runtime(None) == "torch" and yolo.check_runtime("onnx") == "onnx"
    monkeypatch.setenv(yolo.RUNTIME_ENV, "tensorrt")
    with pytest.raises(ValueError, match="VSAM_YOLO_RUNTIME='tensorrt': choose one of onnx, torch"):
        yolo.check_runtime(None)
