import json

import numpy as np
import pytest

import bad_images
import fixture_set
from pose_prep import images, keypoints as kp
from pose_prep.detectors import (DEFAULT, DetectorUnavailable, check_detector, main_person, make_detector)
from pose_prep.detectors.auto import looks_like_person
from pose_prep.detectors.mmpose import persons_from_mmpose
from pose_prep.detectors.openpose_json import OpenPoseJson, keypoints_file_name
from pose_prep.pose_eval import annotated_person, correct_joints

J = kp.JOINT_INDEX
# A front-view fashion model, head to feet (fashion-models/val.json, image id 1007).
FRONT_VIEW_PREFIX = "9982e4dc-1-"


@pytest.fixture(scope="module")
def photos():
    """Package photos, full size: front-view portraits."""
    return {"grace_hopper": np.asarray(bad_images.grace_hopper(max_side=10_000)),
            "astronaut": np.asarray(bad_images.astronaut(max_side=10_000))}


@pytest.fixture(scope="module")
def front_view(shared_data):
    """(rgb, annotated person) of a real full-body front view (a research-only fashion-model photo)."""
    folder = shared_data / "keypoints/fashion-models"
    data = json.loads((folder / "val.json").read_text())
    (entry,) = [i for i in data["images"] if i["file_name"].startswith(FRONT_VIEW_PREFIX)]
    (annotation,) = [a for a in data["annotations"] if a["image_id"] == entry["id"]]
    _, decoded = images.load(folder / "images" / entry["file_name"])
    return decoded.rgb, annotated_person(annotation)


def _y(person, *names):
    present = [person[J[n], 1] for n in names if person[J[n], 2] > 0]
    assert present, f"none of {names} detected"
    return float(np.mean(present))


@pytest.fixture(params=["blazepose", "yolo"])
def detector(request, blazepose_detector, yolo_detector):
    return {"blazepose": blazepose_detector, "yolo": yolo_detector}[request.param]


def test_portraits_have_plausible_geometry(detector, photos):
    for name, rgb in photos.items():
        person = main_person(detector, rgb)
        assert person is not None, f"{detector.name} found nobody in {name}"
        assert person.shape == (18, 3) and person.dtype == np.float32
        for joint in ("nose", "right_eye", "left_eye", "right_shoulder", "left_shoulder"):
            assert person[J[joint], 2] > 0, f"{detector.name}: no {joint} in {name}"
        assert _y(person, "right_eye", "left_eye") < _y(person, "right_shoulder", "left_shoulder"), name
        # Front view: the person's right side is on the image's left.
        assert person[J["right_shoulder"], 0] < person[J["nose"], 0] < person[J["left_shoulder"], 0], name
        assert person[J["right_eye"], 0] < person[J["left_eye"], 0], name
        height, width = rgb.shape[:2]
        present = person[person[:, 2] > 0]
        assert (present[:, 0] <= width - 1).all() and (present[:, 1] <= height - 1).all()
        assert ((present[:, 2] > 0) & (present[:, 2] <= 1)).all()


@pytest.mark.realdata
def test_full_body_front_view_matches_its_annotation(detector, front_view):
    rgb, annotated = front_view
    person = main_person(detector, rgb)
    assert person is not None
    order = [_y(person, "right_eye", "left_eye"), _y(person, "right_shoulder", "left_shoulder"),
             _y(person, "right_hip", "left_hip"), _y(person, "right_knee", "left_knee"),
             _y(person, "right_ankle", "left_ankle")]
    assert order == sorted(order), f"eyes, shoulders, hips, knees, ankles top to bottom: {order}"
    assert person[J["right_shoulder"], 0] < person[J["left_shoulder"], 0]
    assert person[J["right_hip"], 0] < person[J["left_hip"], 0]
    correct, _ = correct_joints(person, annotated, threshold=0.1)
    assert correct.sum() >= 10, f"{detector.name}: {correct.sum()}/12 body joints within PCK@0.1"


def test_nobody_in_photos_without_people(auto_detector):
    from skimage import data

    cat, cup = data.chelsea(), data.coffee()
    for rgb in (cat, cup):
        assert auto_detector.blazepose.detect(rgb) == []
        assert auto_detector.detect(rgb) == []
    assert auto_detector.yolo.detect(cup) == []
    # YOLO alone puts a face on the cat; auto's fallback rule (both lower legs) turns it down.
    assert auto_detector.yolo.detect(cat)


def test_yolo_keeps_several_people_and_main_person_is_deterministic(yolo_detector):
    _, decoded = images.load(_crowded_image())
    persons = yolo_detector.detect(decoded.rgb)
    assert len(persons) >= 2
    first = main_person(yolo_detector, decoded.rgb)
    again = main_person(yolo_detector, decoded.rgb)
    np.testing.assert_array_equal(first, again)
    index = kp.select_main_person(persons, decoded.width, decoded.height)
    np.testing.assert_array_equal(first, persons[index])


def _crowded_image():
    """The fixture set's COCO photo with the most annotated people."""
    data = fixture_set.keypoint_annotations()
    counts = {}
    for annotation in data["annotations"]:
        if annotation["num_keypoints"] >= 8:
            counts[annotation["image_id"]] = counts.get(annotation["image_id"], 0) + 1
    best = max(sorted(counts), key=counts.get)
    (entry,) = [i for i in data["images"] if i["id"] == best]
    return fixture_set.PHOTOS / entry["file_name"]


@pytest.fixture(scope="module")
def standing_cook():
    """(rgb, annotated person) of a real full-body view: a cook seen from behind, head to feet, in a
    kitchen (fixture photo coco-000000397133.jpg)."""
    data = fixture_set.keypoint_annotations()
    (entry,) = [i for i in data["images"] if i["file_name"] == "coco-000000397133.jpg"]
    annotation = max((a for a in data["annotations"] if a["image_id"] == entry["id"]),
                     key=lambda a: a["num_keypoints"])
    _, decoded = images.load(fixture_set.PHOTOS / entry["file_name"])
    return decoded.rgb, annotated_person(annotation, entry["width"], entry["height"])


def test_auto_recovers_a_head_cropped_person(auto_detector, standing_cook):
    rgb, annotated = standing_cook
    top = int(_y(annotated.keypoints, "right_hip", "left_hip"))     # cut at the hips: no face for BlazePose
    legs = np.ascontiguousarray(rgb[top:])
    assert auto_detector.blazepose.detect(legs) == []
    (person,) = auto_detector.detect(legs)
    shifted = annotated.keypoints.copy()
    shifted[:, 1] -= top
    for joint in ("right_knee", "left_knee", "right_ankle", "left_ankle"):
        distance = np.linalg.norm(person[J[joint], :2] - shifted[J[joint], :2])
        assert person[J[joint], 2] > 0 and distance < 0.1 * annotated.size, joint


@pytest.mark.realdata
def test_auto_keeps_legs_only_models_and_rejects_ghost_garments(auto_detector, shared_data):
    # Hand-labelled in benchmarks/person_labels.csv: 00017 legs of a model, 00243 a ghost blazer.
    images_folder = shared_data / "deepfashion-attr/img"
    _, legs = images.load(images_folder / "00017.jpg")
    _, blazer = images.load(images_folder / "00243.jpg")
    for decoded in (legs, blazer):
        assert auto_detector.blazepose.detect(decoded.rgb) == []
    assert auto_detector.yolo.detect(blazer.rgb), "YOLO alone poses the empty blazer"
    assert auto_detector.detect(blazer.rgb) == []
    (person,) = auto_detector.detect(legs.rgb)
    assert _y(person, "right_knee", "left_knee") < _y(person, "right_ankle", "left_ankle")


def test_fallback_rule():
    legs = kp.empty()
    for joint in ("right_knee", "right_ankle", "left_knee", "left_ankle"):
        legs[J[joint]] = (10, 10, 0.9)
    assert looks_like_person(legs, 0.6)
    assert not looks_like_person(legs, 0.4), "a doubtful box is not enough"
    torso = kp.empty()
    for joint in ("neck", "right_shoulder", "left_shoulder", "right_hip", "left_hip", "right_elbow"):
        torso[J[joint]] = (10, 10, 0.99)
    assert not looks_like_person(torso, 0.95), "a torso-shaped skeleton is what garments get"


def test_openpose_json_reads_nested_and_flat_layouts(tmp_path):
    person = kp.empty()
    person[J["neck"]] = (20, 30, 0.9)
    person[J["right_hip"]] = (500, 30, 0.9)     # outside a 100 px wide image: dropped
    kp.write_openpose_json(tmp_path / keypoints_file_name("shop/a/dress.jpg"), [person])
    body25 = np.zeros((25, 3), np.float32)
    body25[0] = (5, 6, 0.8)
    (tmp_path / "flat_keypoints.json").write_text(json.dumps({"version": 1.3, "people": [
        {"pose_keypoints_2d": body25.ravel().tolist()}]}))
    detector = make_detector(f"openpose-json:{tmp_path}")
    assert isinstance(detector, OpenPoseJson)
    rgb = np.zeros((80, 100, 3), np.uint8)
    (nested,) = detector.detect(rgb, "shop/a/dress.jpg")
    assert nested[J["neck"]].tolist() == pytest.approx([20, 30, 0.9]) and nested[J["right_hip"], 2] == 0
    (flat,) = detector.detect(rgb, "other/folder/flat.png")      # OpenPose writes every file flat
    assert flat[J["nose"]].tolist() == pytest.approx([5, 6, 0.8])
    with pytest.raises(FileNotFoundError, match="missing_keypoints.json"):
        detector.detect(rgb, "missing.jpg")


def test_mmpose_mapping_on_real_annotations():
    data = fixture_set.keypoint_annotations()
    annotations = [a for a in data["annotations"] if a["num_keypoints"] >= 10][:3]
    instances, expected = [], []
    for annotation in annotations:
        coco17 = np.asarray(annotation["keypoints"], np.float32).reshape(17, 3)
        scores = np.where(coco17[:, 2] > 0, 0.9, 0.05)
        # What MMPoseInferencer yields per instance: keypoints (17, 2), keypoint_scores (17,), bbox, bbox_score.
        instances.append({"keypoints": coco17[:, :2].tolist(), "keypoint_scores": scores.tolist(),
                          "bbox": [annotation["bbox"]], "bbox_score": 0.9})
        expected.append(kp.from_coco17(np.column_stack([coco17[:, :2], np.where(scores > 0.3, scores, 0)])))
    persons = persons_from_mmpose(instances, width=10_000, height=10_000)
    assert len(persons) == 3
    for person, wanted in zip(persons, expected):
        np.testing.assert_allclose(person, wanted)
    np.testing.assert_allclose(persons[0][J["right_shoulder"], :2], instances[0]["keypoints"][6])
    np.testing.assert_allclose(persons[0][J["left_ankle"], :2], instances[0]["keypoints"][15])
    with pytest.raises(ValueError, match="17 keypoints"):
        persons_from_mmpose([{"keypoints": [[0, 0]] * 26, "keypoint_scores": [1] * 26}], 10, 10)


def test_detector_names_and_missing_extras(tmp_path):
    assert DEFAULT == "auto"
    with pytest.raises(ValueError, match="unknown detector 'openpose'.*blazepose"):
        make_detector("openpose")
    with pytest.raises(ValueError, match="needs a folder"):
        make_detector("openpose-json:")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        check_detector(f"openpose-json:{tmp_path / 'nowhere'}")
    # mmcv has no wheel for this Python: mmpose is not installed here, and says which extra it needs.
    with pytest.raises(DetectorUnavailable, match=r"vsam\[mmpose\]"):
        make_detector("mmpose")
    for name in ("auto", "blazepose", "yolo", f"openpose-json:{tmp_path}"):
        check_detector(name)


def test_versions_name_library_and_weights(auto_detector):
    assert auto_detector.blazepose.version.startswith("mediapipe-0.10.21")
    # onnxruntime: the ONNX path ran (tests/test_yolo_onnx.py compares it with ultralytics' torch path).
    assert auto_detector.yolo.version.startswith("onnxruntime-") and "yolo11n-pose" in auto_detector.yolo.version
    assert auto_detector.version.endswith("+" + auto_detector.yolo.version)
    assert auto_detector.version.startswith("auto:")


def test_importing_yolo_leaves_pillow_alone(yolo_detector, tmp_path):
    # ultralytics patches PIL.Image.open to pip-install pi-heif on unknown files; the detector undoes it.
    (tmp_path / "notes.jpg").write_text("not a photo")
    with pytest.raises(images.BadImage, match="not an image"):
        images.load(tmp_path / "notes.jpg")
