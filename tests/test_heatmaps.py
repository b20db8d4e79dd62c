import numpy as np
import pytest

import fixture_set
from pose_prep import heatmaps, keypoints as kp

IMAGE = (224, 224)   # (width, height): 4 image pixels per cell of the 56×56 grid


def _pixel_of_cell(column: int, row: int) -> tuple[float, float]:
    """Image pixel at the centre of a heatmap cell (for a 224×224 image and a 56 grid)."""
    return (column + 0.5) * 4, (row + 0.5) * 4


def _person(**joints) -> np.ndarray:
    person = kp.empty()
    for name, (column, row) in joints.items():
        person[kp.JOINT_INDEX[name]] = (*_pixel_of_cell(column, row), 0.9)
    return person


def test_peak_is_where_the_joint_is():
    heatmap = heatmaps.render(_person(nose=(20, 11)), IMAGE)
    assert heatmap.shape == (56, 56) and heatmap.dtype == np.float32
    assert np.unravel_index(heatmap.argmax(), heatmap.shape) == (11, 20)
    assert heatmap[11, 20] == pytest.approx(1.0)
    # A Gaussian of sigma 1.5 cells: exp(-d² / 2σ²) two cells away, and nothing far away.
    assert heatmap[11, 22] == pytest.approx(np.exp(-4 / (2 * 1.5 ** 2)), rel=1e-5)
    assert heatmap[40, 40] == 0


def test_limb_mid_point_is_lit_and_only_near_the_segment():
    person = _person(right_shoulder=(10, 10), right_elbow=(10, 40))
    heatmap = heatmaps.render(person, IMAGE)
    assert heatmap[25, 10] == pytest.approx(1.0)             # on the segment, far from both joints
    assert heatmap[25, 13] == pytest.approx(np.exp(-9 / (2 * 1.5 ** 2)), rel=1e-5)  # 3 cells aside
    assert heatmap[50, 10] < 1e-3                            # beyond the elbow
    joints_only = heatmaps.render(person, IMAGE, limbs=False)
    assert joints_only[25, 10] < 1e-3, "without limbs the mid-point is dark"


def test_missing_joints_and_half_missing_limbs_are_absent():
    person = _person(right_shoulder=(10, 10), right_elbow=(10, 40), left_hip=(40, 40))
    person[kp.JOINT_INDEX["right_elbow"], 2] = 0       # the elbow goes missing
    heatmap = heatmaps.render(person, IMAGE)
    assert heatmap[10, 10] == pytest.approx(1.0)
    assert heatmap[40, 10] < 1e-6 and heatmap[25, 10] < 1e-6
    assert heatmap[40, 40] == pytest.approx(1.0), "the lone hip is a joint Gaussian of its own"
    assert not heatmaps.render(kp.empty(), IMAGE).any()


def test_overlaps_are_max_merged_not_summed():
    person = _person(right_eye=(20, 20), left_eye=(21, 20))
    heatmap = heatmaps.render(person, IMAGE, joints=[14, 15], limbs=False)
    assert heatmap.max() <= 1.0
    assert heatmap[20, 20] == pytest.approx(1.0) and heatmap[20, 21] == pytest.approx(1.0)


def test_joint_subsets_by_group_and_by_indices():
    person = _person(nose=(28, 4), neck=(28, 10), right_shoulder=(20, 10), left_shoulder=(36, 10),
                     right_hip=(24, 30), left_hip=(32, 30), right_knee=(24, 42), left_knee=(32, 42),
                     right_ankle=(24, 53), left_ankle=(32, 53))
    lower = heatmaps.render(person, IMAGE, joints="lower")
    assert lower[42, 24] == pytest.approx(1.0) and lower[53, 32] == pytest.approx(1.0)
    assert lower[10, 20] == 0 and lower[4, 28] == 0, "upper joints are not drawn for trousers"
    assert lower[20, 24] == 0, "the neck-hip limb needs both ends in the subset"
    upper = heatmaps.render(person, IMAGE, joints="upper")
    assert upper[10, 20] == pytest.approx(1.0) and upper[20, 26] > 0.9    # neck → right hip is lit
    assert upper[42, 24] < 1e-3 and upper[4, 28] < 1e-3
    explicit = heatmaps.render(person, IMAGE, joints=[0])
    assert explicit[4, 28] == pytest.approx(1.0) and explicit.sum() < 20
    full = heatmaps.render(person, IMAGE)
    np.testing.assert_array_equal(full, np.maximum(full, np.maximum(lower, upper)))


def test_groups_follow_the_papers_figure_2():
    names = lambda group: {kp.JOINT_NAMES[j] for j in heatmaps.JOINT_GROUPS[group]}  # noqa: E731
    assert names("upper") == {"neck", "right_shoulder", "left_shoulder", "right_elbow", "left_elbow",
                              "right_wrist", "left_wrist", "right_hip", "left_hip"}
    assert names("lower") == {"right_hip", "left_hip", "right_knee", "left_knee", "right_ankle", "left_ankle"}
    assert names("body") == set(kp.JOINT_NAMES) - {"nose", "right_eye", "left_eye", "right_ear", "left_ear"}
    assert heatmaps.group_for_category_type(1) == "upper"
    assert heatmaps.group_for_category_type(2) == "lower"
    assert heatmaps.group_for_category_type(3) == "body"
    assert heatmaps.group_for_category_type(None) == heatmaps.group_for_category_type(7) == "full"


def test_bad_subsets_are_rejected():
    with pytest.raises(ValueError, match="unknown joint group"):
        heatmaps.render(kp.empty(), IMAGE, joints="hats")
    with pytest.raises(ValueError, match="0..17"):
        heatmaps.render(kp.empty(), IMAGE, joints=[18])


def test_non_square_images_and_grids_scale_each_axis():
    person = kp.empty()
    person[0] = (300, 100, 1)               # in a 600×200 image: half way across, half way down
    heatmap = heatmaps.render(person, (600, 200), size=(20, 60))
    assert heatmap.shape == (20, 60)
    row, column = np.unravel_index(heatmap.argmax(), heatmap.shape)
    assert (row, column) in {(9, 29), (9, 30), (10, 29), (10, 30)}


def test_real_annotated_person_lights_each_joint():
    data = fixture_set.keypoint_annotations()
    image = {i["id"]: i for i in data["images"]}
    # The tallest person with 16 or 17 labelled joints (a man standing in the street, head to feet).
    annotation = max((a for a in data["annotations"] if a["num_keypoints"] >= 16), key=lambda a: a["bbox"][3])
    size = image[annotation["image_id"]]["width"], image[annotation["image_id"]]["height"]
    coco17 = np.asarray(annotation["keypoints"], np.float32).reshape(17, 3)
    coco17[:, 2] = coco17[:, 2] > 0
    person = kp.from_coco17(coco17)
    heatmap = heatmaps.render(person, size)
    for x, y, score in person:
        if score > 0:
            column, row = int(x * 56 / size[0]), int(y * 56 / size[1])
            assert heatmap[row, column] > 0.7
    assert 0.02 < (heatmap > 0.5).mean() < 0.4


def test_uint8_round_trip():
    heatmap = heatmaps.render(_person(neck=(28, 28), right_hip=(20, 45)), IMAGE)
    stored = heatmaps.to_uint8(heatmap)
    assert stored.dtype == np.uint8 and stored.max() == 255
    np.testing.assert_allclose(heatmaps.from_uint8(stored), heatmap, atol=0.5 / 255 + 1e-6)
