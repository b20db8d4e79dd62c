import json

import numpy as np
import pytest

import fixture_set
from pose_prep import keypoints as kp

# README of ../shared: 18-order index i takes COCO index [...][i]; the neck (1) is mid-shoulders.
COCO17_SOURCE = [0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3]


@pytest.fixture(scope="module")
def coco_people():
    """Real annotated people (COCO-17 x, y, v) of the fixture set's COCO photos."""
    annotations = fixture_set.keypoint_annotations()
    people = [np.asarray(a["keypoints"], np.float32).reshape(17, 3) for a in annotations["annotations"]
              if a["num_keypoints"] >= 10]
    assert len(people) >= 5
    return people


def test_joint_names_and_openpose_limbs():
    assert len(kp.JOINT_NAMES) == kp.NUM_JOINTS == 18
    assert kp.JOINT_NAMES[:2] == ("nose", "neck") and kp.JOINT_NAMES[-1] == "left_ear"
    assert kp.LIMBS == ((1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13), (1, 2), (2, 3), (3, 4), (2, 16),
                        (1, 5), (5, 6), (6, 7), (5, 17), (1, 0), (0, 14), (0, 15), (14, 16), (15, 17))
    assert [kp.JOINT_NAMES[j] for j in kp.BODY12] == [
        "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow", "left_wrist",
        "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle"]


def test_from_coco17_on_real_annotations(coco_people):
    for person in coco_people:
        scored = person.copy()
        scored[:, 2] = (person[:, 2] > 0).astype(np.float32)
        converted = kp.from_coco17(scored)
        for i, source in enumerate(COCO17_SOURCE):
            if source is None:
                continue
            if scored[source, 2] > 0:
                np.testing.assert_allclose(converted[i], scored[source])
            else:
                assert (converted[i] == 0).all(), "a missing joint stays missing, x and y zeroed"
        shoulders = scored[[5, 6]]
        if (shoulders[:, 2] > 0).all():
            np.testing.assert_allclose(converted[1, :2], shoulders[:, :2].mean(axis=0))
            assert converted[1, 2] == 1
        else:
            assert converted[1, 2] == 0, "no neck without both shoulders"


def test_from_body25_and_blazepose33_index_maps():
    body25 = np.stack([np.arange(25) * 10.0, np.arange(25) + 1.0, np.full(25, 0.9)], axis=1)
    converted = kp.from_body25(body25)
    expected_source = [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]
    np.testing.assert_allclose(converted[:, 0], np.array(expected_source) * 10.0)

    blaze = np.stack([np.arange(33) * 10.0, np.arange(33) + 1.0, np.full(33, 0.8)], axis=1)
    converted = kp.from_blazepose33(blaze)
    # right shoulder 12, left shoulder 11, right hip 24, left ankle 27, right eye 5, left ear 7
    assert converted[2, 0] == 120 and converted[5, 0] == 110 and converted[8, 0] == 240
    assert converted[13, 0] == 270 and converted[14, 0] == 50 and converted[17, 0] == 70
    assert converted[1, 0] == pytest.approx(115.0)        # neck: mid-shoulders


def test_conversion_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="COCO-17"):
        kp.from_coco17(np.zeros((18, 3)))
    with pytest.raises(ValueError, match="54 .*75"):
        kp.from_openpose_flat([1.0] * 60)


def test_openpose_json_round_trip(tmp_path, coco_people):
    persons = []
    for person in coco_people[:3]:
        scored = person.copy()
        scored[:, 2] = np.where(person[:, 2] > 0, 0.75, 0)
        persons.append(kp.from_coco17(scored))
    path = tmp_path / "sub" / "photo_keypoints.json"
    kp.write_openpose_json(path, persons)

    written = json.loads(path.read_text())
    assert written["version"] == 1.3
    assert [len(p["pose_keypoints_2d"]) for p in written["people"]] == [54, 54, 54]
    back = kp.read_openpose_json(path)
    assert len(back) == 3
    for original, read in zip(persons, back):
        np.testing.assert_allclose(read, original, atol=1e-3)


def test_nobody_round_trip(tmp_path):
    path = tmp_path / "empty_keypoints.json"
    kp.write_openpose_json(path, [])
    assert json.loads(path.read_text()) == {"version": 1.3, "people": []}
    assert kp.read_openpose_json(path) == []


def test_reads_body25_openpose_files(tmp_path):
    body25 = np.zeros((25, 3), np.float32)
    body25[1] = (100, 50, 0.9)     # neck
    body25[8] = (100, 150, 0.8)    # mid-hip: not in COCO-18
    body25[9] = (90, 150, 0.7)     # right hip
    body25[22] = (80, 300, 0.6)    # left big toe: not in COCO-18
    path = tmp_path / "op_keypoints.json"
    path.write_text(json.dumps({"version": 1.3, "people": [{"pose_keypoints_2d": body25.ravel().tolist(),
                                                            "face_keypoints_2d": []}]}))
    (person,) = kp.read_openpose_json(path)
    assert person.shape == (18, 3)
    np.testing.assert_allclose(person[1], (100, 50, 0.9))
    np.testing.assert_allclose(person[8], (90, 150, 0.7))
    assert kp.visible(person).sum() == 2


def test_unreadable_json_names_the_file(tmp_path):
    path = tmp_path / "broken_keypoints.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="broken_keypoints.json"):
        kp.read_openpose_json(path)
    path.write_text(json.dumps({"people": [{"hand": []}]}))
    with pytest.raises(ValueError, match="not an OpenPose keypoints file"):
        kp.read_openpose_json(path)


def test_clean_and_drop_outside():
    points = kp.empty()
    points[0] = (10, 10, np.nan)
    points[1] = (50, 50, 1.7)
    points[2] = (-3, 20, 0.9)        # left of the image
    points[3] = (20, 120, 0.9)       # below it
    points[4] = (30, 30, 0.2)        # low score
    points[5] = (40, 40, 0.6)
    cleaned = kp.clean(points)
    assert cleaned[0].tolist() == [0, 0, 0] and cleaned[1, 2] == 1.0
    kept = kp.drop_outside(points, width=100, height=100, min_score=0.3)
    assert kp.visible(kept).tolist() == [False, True, False, False, False, True] + [False] * 12


def _person_box(x1, y1, x2, y2):
    person = kp.empty()
    person[2] = (x1, y1, 1)
    person[11] = (x2, y2, 1)
    return person


def test_main_person_is_largest_and_central_and_deterministic():
    small_centre = _person_box(90, 90, 110, 110)
    large_corner = _person_box(0, 0, 60, 60)
    large_centre = _person_box(70, 70, 130, 130)
    persons = [small_centre, large_corner, large_centre]
    assert kp.select_main_person(persons, 200, 200) == 2
    assert kp.select_main_person([large_centre, large_centre.copy()], 200, 200) == 0   # tie: lower index
    assert kp.select_main_person([kp.empty()], 200, 200) is None
    assert kp.select_main_person([], 200, 200) is None
    assert kp.bounding_box(large_corner) == (0, 0, 60, 60)
