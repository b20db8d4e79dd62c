"""Attribute-group attention (model.attention: groups): plan, targets, model, loss, training, explain."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pose_prep.heatmaps import DEFAULT_SIGMA
from pose_prep.keypoints import JOINT_INDEX
from pose_prep.shard_format import Vocabulary
from vsam_train.config import DEFAULTS, ConfigError, load_config
from vsam_train.data import ShardStream, heatmap_target, make_loader, read_collection, split_group_heatmaps
from vsam_train.groups import (CorrelationAccumulator, GroupPlanError, attention_correlation, group_plan,
                               render_group_heatmaps)
from vsam_train.losses import VsamLoss, group_heatmap_loss, heatmap_loss
from vsam_train.models import count_parameters, create_model, model_from_config
from vsam_train.train import group_joints_for, pooling_mix, unwrap

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
REFERENCE = Path(__file__).resolve().parent / "data" / "single_attention_reference.pt"
SUBSET_GROUPS = ["texture"] * 7 + ["sleeve"] * 3 + ["length"] * 3 + ["neckline"] * 4 + ["fabric"] * 6 + ["fit"] * 3
ARMS = [("right_shoulder", "right_elbow"), ("right_elbow", "right_wrist"),
        ("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist")]
LEGS = [("right_hip", "right_knee"), ("right_knee", "right_ankle"), ("left_hip", "left_knee"), ("left_knee", "left_ankle")]


def _groups_config(**overrides):
    return load_config(TINY, {"model.attention": "groups", **overrides})


def _subset_plan():
    return group_plan(SUBSET_GROUPS, DEFAULTS["model"]["group_joints"])


def _tiny_groups_model(**kwargs):
    plan = _subset_plan()
    return create_model("vsam-groups", 0, 26, width=1 / 16, image_size=64, group_names=list(plan.names),
                        attribute_groups=list(plan.attribute_group), **kwargs)


# --- single is unchanged -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vsam", "vgg16"])
def test_single_attention_builds_and_outputs_what_it_did_before_groups_existed(name):
    """tests/data/single_attention_reference.pt was written by the models code of commit db686fc
    (tests/data/make_single_attention_reference.py): same seed → same parameters, same outputs."""
    reference = torch.load(REFERENCE, weights_only=True)[name]
    torch.manual_seed(0)
    model = create_model(name, 5, 26, width=1 / 16, image_size=64).eval()
    state = model.state_dict()
    assert list(state) == reference["names"]
    torch.testing.assert_close(torch.stack([v.double().sum() for v in state.values()]), reference["sums"],
                               rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.stack([v.flatten()[0].double() for v in state.values()]), reference["first"],
                               rtol=0, atol=0)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(images)
    torch.testing.assert_close(out["category"], reference["category"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["attributes"], reference["attributes"], rtol=1e-5, atol=1e-6)
    if name == "vsam":
        torch.testing.assert_close(out["attention"], reference["attention"], rtol=1e-5, atol=1e-6)
    assert out["group_attention"] is None
    # the trainer's path (config → model) builds that same single model
    vocabulary = Vocabulary(categories=list("abcde"), attributes=[f"a{i}" for i in range(26)],
                            attribute_groups=SUBSET_GROUPS)
    torch.manual_seed(0)
    from_config = model_from_config(load_config(TINY, {"model.name": name}), vocabulary)
    assert all(torch.equal(a, b) for a, b in zip(from_config.state_dict().values(), state.values()))


# --- the plan: groups and their joints ---------------------------------------------------------

def test_default_group_joints_cover_both_deepfashion_vocabularies():
    plan = _subset_plan()
    assert plan.names == ("texture", "sleeve", "length", "neckline", "fabric", "fit") and not plan.fallback
    joints = dict(zip(plan.names, plan.joints))
    named = {name: {k for k, v in JOINT_INDEX.items() if v in joints[name]} for name in plan.names}
    assert named["sleeve"] == {f"{side}_{j}" for side in ("left", "right") for j in ("shoulder", "elbow", "wrist")}
    assert named["length"] == {f"{side}_{j}" for side in ("left", "right") for j in ("hip", "knee", "ankle")}
    assert named["neckline"] == {"nose", "neck", "left_shoulder", "right_shoulder", "left_eye", "right_eye",
                                 "left_ear", "right_ear"}
    torso = {"neck", "left_shoulder", "right_shoulder", "left_hip", "right_hip"}
    assert named["texture"] == named["fabric"] == named["fit"] == torso
    assert plan.attribute_group == tuple(plan.names.index(g) for g in SUBSET_GROUPS)
    benchmark = group_plan(["texture", "fabric", "shape", "part", "style"], DEFAULTS["model"]["group_joints"])
    assert benchmark.supervised == (True,) * 5 and not benchmark.fallback
    assert all(len(j) == 13 for j in benchmark.joints[2:])            # shape, part, style: the body without the face


def test_unlisted_groups_fall_back_to_the_whole_body_and_empty_ones_get_no_heatmap():
    plan = group_plan(["collar", "collar", "sleeve", ""], {"sleeve": [], "texture": "torso"})
    assert plan.names == ("collar", "sleeve") and plan.fallback == ("collar",)
    assert plan.joints == (tuple(range(18)), None) and plan.supervised == (True, False)
    assert plan.attribute_group == (0, 0, 1, -1)
    with pytest.raises(GroupPlanError, match="has none"):
        group_plan(["", ""], {})
    with pytest.raises(GroupPlanError, match="model.group_joints.sleeve: 'elbows'"):
        group_plan(["sleeve"], {"sleeve": ["elbows"]})
    assert group_plan(["sleeve"], {"sleeve": ["left_wrist", 4, "neckline"]}).joints[0] == (0, 1, 2, 4, 5, 7, 14, 15, 16, 17)


def test_config_accepts_new_groups_and_names_bad_values(tmp_path):
    config = load_config(TINY, {"model.attention": "groups", "model.group_joints.collar": "neckline",
                                "model.group_joints.sleeve": "[right_wrist, left_wrist]"})
    assert config["model"]["group_joints"]["collar"] == "neckline"
    assert config["model"]["group_joints"]["sleeve"] == ["right_wrist", "left_wrist"]
    assert config["model"]["group_joints"]["length"] == "lower"              # the other defaults stay
    file = tmp_path / "groups.yaml"
    file.write_text("model:\n  attention: groups\n  group_joints:\n    belt: [right_hip, left_hip]\n")
    assert load_config(file)["model"]["group_joints"]["belt"] == ["right_hip", "left_hip"]
    with pytest.raises(ConfigError, match="model.group_joints.sleeve: 'hands'"):
        load_config(None, {"model.attention": "groups", "model.group_joints.sleeve": "hands"})
    with pytest.raises(ConfigError, match="applies to model.name vsam"):
        load_config(None, {"model.attention": "groups", "model.name": "vgg16"})
    with pytest.raises(ConfigError, match="model.attention is 'pose'"):
        load_config(None, {"model.attention": "pose"})


# --- targets: rendered in the loader, augmented with the image ---------------------------------

def _arm_and_leg_regions(keypoints, width, height, grid, reach):
    """Cells (grid × grid) nearer to an arm segment than to a leg segment and within `reach` cells
    of it, and the reverse."""
    centres = (np.arange(grid) + 0.5)
    cx, cy = np.meshgrid(centres, centres)

    def distance(segments):
        best = np.full((grid, grid), np.inf)
        for a, b in segments:
            pa, pb = keypoints[JOINT_INDEX[a], :2], keypoints[JOINT_INDEX[b], :2]
            pa, pb = pa * (grid / width, grid / height), pb * (grid / width, grid / height)
            d = pb - pa
            t = np.clip(((cx - pa[0]) * d[0] + (cy - pa[1]) * d[1]) / max(d @ d, 1e-9), 0, 1)
            best = np.minimum(best, np.hypot(cx - pa[0] - t * d[0], cy - pa[1] - t * d[1]))
        return best

    arms, legs = distance(ARMS), distance(LEGS)
    return (arms < legs) & (arms <= reach), (legs < arms) & (legs <= reach)


def _own_and_other_limb_shares(shards) -> np.ndarray:
    """Per item whose arms and legs were all detected, and per group (sleeve, then length): the share
    of the loader's group heatmap on its own limbs (arms, legs) and on the other ones."""
    plan = group_plan(read_collection(shards).vocabulary.attribute_groups, DEFAULTS["model"]["group_joints"])
    stream = ShardStream(shards, "train", image_size=224, batch_size=32, train=False, group_joints=list(plan.joints))
    sleeve, length = plan.names.index("sleeve"), plan.names.index("length")
    keypoints = _stored_keypoints(shards)
    shares = []
    for batch in make_loader(stream, num_workers=0):
        assert batch["group_heatmap"].shape == (len(batch["path"]), 6, 56, 56)
        for i, path in enumerate(batch["path"]):
            points, width, height = keypoints[path]
            limbs = [JOINT_INDEX[j] for pair in ARMS + LEGS for j in pair]
            if not (points[limbs, 2] > 0).all():
                continue
            arms, legs = _arm_and_leg_regions(points, width, height, 56, reach=3 * DEFAULT_SIGMA)
            for group, lit, dark in ((sleeve, arms, legs), (length, legs, arms)):
                heat = batch["group_heatmap"][i, group].numpy()
                assert batch["group_has_pose"][i, group]
                shares.append((heat[lit].sum() / heat.sum(), heat[dark].sum() / heat.sum()))
    return np.array(shares)


def test_sleeve_target_lights_the_arms_and_not_the_legs_on_real_photos(df_shards):
    """Real photos with detected keypoints (prep-pose), people standing, sitting, skating: on every
    item whose arms and legs were all detected, the loader's sleeve heatmap lies on the arms, the
    length one on the legs; where a seated person's hands rest on the knees the limbs' Gaussians overlap."""
    shares = _own_and_other_limb_shares(df_shards)
    assert len(shares) >= 2 * 8           # whole-body people among the 96 training items (9 in the fixture set)
    assert (shares[:, 0] > 0.75).all() and (shares[:, 1] < 0.25).all(), shares
    assert shares[:, 0].mean() > 0.9 and shares[:, 1].mean() < 0.1, shares.mean(axis=0)


@pytest.mark.realdata
def test_sleeve_target_lights_the_arms_and_not_the_legs_on_real_catalog_photos(deepfashion_shards):
    """The same on DeepFashion's catalog photos (models standing, facing the camera)."""
    shares = _own_and_other_limb_shares(deepfashion_shards)
    assert len(shares) >= 2 * 10          # full-body photos among the first 96 training images
    # Only the Gaussian tails of hands resting by the hips cross over (at most a few per cent).
    assert (shares[:, 0] > 0.9).all() and (shares[:, 1] < 0.1).all(), shares
    assert shares[:, 0].mean() > 0.95 and shares[:, 1].mean() < 0.04, shares.mean(axis=0)


def _stored_keypoints(folder):
    from pose_prep.shard_format import Shard, live_rows

    found = {}
    for shard_path, rows in live_rows(folder).items():
        with Shard(shard_path) as shard:
            data = shard.read(("keypoints", "width", "height", "path"))
        for row in rows:
            found[data["path"][row]] = (data["keypoints"][row], int(data["width"][row]), int(data["height"][row]))
    return found


def test_group_heatmaps_are_flipped_and_cropped_with_the_image_and_their_union_is_the_stored_heatmap(df_shards):
    """The union (max) of the default groups' joints and limbs is the whole body, so unaugmented the
    max over the group maps is the stored whole-body heatmap. Augmented, each group map must be
    its own render put through the very flip and crop of the item's stored heatmap (which
    test_data shows to follow the image); the map is flipped, never the keypoints as well."""
    from pose_prep.heatmaps import render, to_uint8

    joints = group_joints_for(load_config(None, {"model.attention": "groups"}), read_collection(df_shards).vocabulary)
    plain = ShardStream(df_shards, "train", image_size=224, batch_size=32, train=False, group_joints=joints)
    for batch in make_loader(plain, num_workers=0):
        torch.testing.assert_close(batch["group_heatmap"].amax(dim=1, keepdim=True), batch["heatmap"],
                                   rtol=0, atol=0.51 / 255)      # the stored one is rounded to uint8
        assert (batch["group_has_pose"].any(dim=1) == batch["has_pose"]).all()

    keypoints = _stored_keypoints(df_shards)
    augment = dict(DEFAULTS["data"]["augment"], p=1.0, jitter=0.0)
    stream = ShardStream(df_shards, "train", image_size=64, batch_size=32, train=True, augment=augment,
                         group_joints=joints)
    flipped = 0
    for batch in make_loader(stream, num_workers=0):
        assert (batch["augmentation"][:, 0] == 1).all()
        for i, path in enumerate(batch["path"]):
            points, width, height = keypoints[path]
            params = batch["augmentation"][i].numpy()
            expected = torch.cat([heatmap_target(to_uint8(render(points, (width, height), size=56, sigma=DEFAULT_SIGMA,
                                                                 joints=subset)), params, 16) for subset in joints])
            torch.testing.assert_close(batch["group_heatmap"][i], expected, rtol=0, atol=0.51 / 255)
        flipped += int(batch["augmentation"][:, 1].sum())
    assert flipped > 20

    first = next(iter(make_loader(ShardStream(df_shards, "train", image_size=64, batch_size=8, train=False,
                                              group_joints=joints), num_workers=0)))
    mirrored = ShardStream(df_shards, "train", image_size=64, batch_size=8, train=True, group_joints=joints,
                           augment=dict(augment, flip=1.0, crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0]))
    items, found = {p: i for i, p in enumerate(first["path"])}, 0
    for batch in make_loader(mirrored, num_workers=0):
        for i, path in enumerate(batch["path"]):
            if path in items:
                torch.testing.assert_close(batch["group_heatmap"][i], first["group_heatmap"][items[path]].flip(-1),
                                           rtol=0, atol=1e-6)
                found += 1
    assert found == 8


def test_a_split_rendered_at_once_matches_the_loader_for_in_memory_training(df_shards):
    """data.split_group_heatmaps: what a split held in (GPU) memory needs, in the stored order."""
    joints = group_joints_for(load_config(None, {"model.attention": "groups"}), read_collection(df_shards).vocabulary)
    maps, lit, paths = split_group_heatmaps(df_shards, "val", joints, max_items=20)
    stream = ShardStream(df_shards, "val", image_size=224, batch_size=20, train=False, group_joints=joints)
    batch = next(iter(make_loader(stream, num_workers=0)))
    assert paths == batch["path"] and maps.shape == (20, 6, 56, 56) and maps.dtype == np.uint8
    torch.testing.assert_close(torch.from_numpy(maps / np.float32(255)), batch["group_heatmap"], rtol=0, atol=0.51 / 255)
    assert torch.equal(torch.from_numpy(lit), batch["group_has_pose"])


def test_rendering_groups_once_per_distinct_joint_set_matches_one_render_each():
    from pose_prep.heatmaps import render

    rng = np.random.default_rng(0)
    keypoints = np.c_[rng.uniform(0, 200, (18, 2)), (rng.random(18) > 0.2)].astype(np.float32)
    joints = list(_subset_plan().joints) + [None]
    maps = render_group_heatmaps(keypoints, 200, 300, joints, (56, 56), 1.5)
    assert maps.shape == (7, 56, 56) and not maps[6].any()
    for g, subset in enumerate(joints[:6]):
        np.testing.assert_array_equal(maps[g], render(keypoints, (200, 300), size=56, sigma=1.5, joints=subset))


# --- the model ---------------------------------------------------------------------------------

def test_each_group_map_has_the_grid_of_s_hat_and_s_hat_is_their_union():
    for image_size in (64, 96):
        plan = _subset_plan()
        model = create_model("vsam-groups", 3, 26, width=1 / 16, image_size=image_size, group_names=list(plan.names),
                             attribute_groups=list(plan.attribute_group)).eval()
        with torch.no_grad():
            out = model(torch.randn(2, 3, image_size, image_size))
        grid = image_size // 4
        assert out["attention"].shape == (2, 1, grid, grid) and out["group_attention"].shape == (2, 6, grid, grid)
        assert torch.equal(out["attention"], out["group_attention"].amax(dim=1, keepdim=True))
        assert out["attributes"].shape == (2, 26) and out["category"].shape == (2, 3)
    # untrained maps start flat at the prior, not saturated
    assert 0.03 < out["group_attention"].min() and out["group_attention"].max() < 0.08
    full = create_model("vsam-groups", 0, 26, group_names=list(plan.names), attribute_groups=list(plan.attribute_group))
    single = create_model("vsam", 0, 26)
    assert 0 < count_parameters(full) - count_parameters(single) < 0.25e6      # 6 × (1×1 conv 512 → 64, 7×7 conv 2 → 1)
    with torch.no_grad():
        out = full.eval()(torch.randn(1, 3, 224, 224))
    assert out["group_attention"].shape == (1, 6, 56, 56) and out["attention"].shape == (1, 1, 56, 56)


def test_each_groups_attributes_are_pooled_under_its_own_map():
    torch.manual_seed(0)
    model = _tiny_groups_model(group_channels=64).eval()
    with torch.no_grad():                       # maps with structure, as a trained model's
        model.attention.conv.weight.normal_(0, 1.0)
        images = torch.randn(2, 3, 64, 64)
        out = model(images, return_features=True)
    features, maps = out["attribute_features"], out["group_attention"]
    assert features.shape == (2, 64, 2, 2)
    weights = F.adaptive_avg_pool2d(maps, features.shape[-2:])
    weights = weights / weights.sum(dim=(2, 3), keepdim=True)
    for a, g in enumerate(model.attribute_slot.tolist()):
        pooled = torch.einsum("bhw,bkhw->bk", weights[:, g], features)
        expected = pooled @ model.attribute_head.fc.weight[a] + model.attribute_head.fc.bias[a]
        torch.testing.assert_close(out["attributes"][:, a], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(weights[:, 1], weights[:, 2])    # sleeve and length pool differently
    # the trainer reaches the model through its wrappers (compile, DDP, recorders) to set the warm-up
    assert unwrap(_Wrapper(_Wrapper(model, "module"), "_orig_mod")) is model
    # warm-up: mix 0 is plain average pooling for every group
    model.set_pooling_mix(0.0)
    with torch.no_grad():
        plain = model(images, return_features=True)
    gap = plain["attribute_features"].mean(dim=(2, 3))
    torch.testing.assert_close(plain["attributes"], model.attribute_head.fc(gap), rtol=1e-4, atol=1e-5)


class _Wrapper(torch.nn.Module):
    def __init__(self, inner, name):
        super().__init__()
        setattr(self, name, inner)


def test_pooling_warm_up_is_linear_and_off_when_zero():
    config = _groups_config(**{"model.group_warmup_steps": 40})
    assert [pooling_mix(step, config) for step in (0, 10, 40, 400)] == [0.0, 0.25, 1.0, 1.0]
    assert pooling_mix(0, _groups_config(**{"model.group_warmup_steps": 0})) == 1.0


# --- the loss ----------------------------------------------------------------------------------

def test_group_heatmap_loss_sums_or_averages_supervised_groups_and_skips_items_without_pose():
    torch.manual_seed(0)
    maps, targets = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    mask = torch.tensor([[1, 0, 1], [1, 0, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)
    expected = ((maps[:2, 0] - targets[:2, 0]) ** 2).mean() + ((maps[[0, 2], 2] - targets[[0, 2], 2]) ** 2).mean()
    torch.testing.assert_close(group_heatmap_loss(maps, targets, mask), expected)
    torch.testing.assert_close(group_heatmap_loss(maps, targets, mask, reduction="mean"), expected / 2)
    released = group_heatmap_loss(maps, targets, mask, "softmax_l2")
    torch.testing.assert_close(released, heatmap_loss(maps[:, :1], targets[:, :1], mask[:, 0], "softmax_l2")
                               + heatmap_loss(maps[:, 2:], targets[:, 2:], mask[:, 2], "softmax_l2"))
    assert group_heatmap_loss(maps, targets, torch.zeros(4, 3, dtype=torch.bool)) == 0
    assert VsamLoss.from_config(load_config(None, {"loss.group_heatmap_reduction": "mean"})["loss"]).group_reduction \
        == "mean"
    criterion = VsamLoss()
    outputs = {"category": None, "attributes": torch.zeros(4, 2), "attention": maps.amax(1, keepdim=True),
               "group_attention": maps.requires_grad_()}
    batch = {"attributes": torch.zeros(4, 2), "category": torch.full((4,), -1), "heatmap": targets.amax(1, keepdim=True),
             "has_pose": mask.any(1), "group_heatmap": targets, "group_has_pose": mask}
    total, parts = criterion(outputs, batch)
    torch.testing.assert_close(parts["heatmap"], expected)
    total.backward()
    assert maps.grad[3].abs().sum() == 0 and maps.grad[:, 1].abs().sum() == 0   # no pose, no joints: no gradient
    without_groups = {k: v for k, v in batch.items() if not k.startswith("group_")}
    _, parts = criterion(outputs, without_groups)     # e.g. vsam eval's loader: the union vs the stored heatmap
    torch.testing.assert_close(parts["heatmap"], heatmap_loss(outputs["attention"], batch["heatmap"], batch["has_pose"]))


def test_correlation_is_pearsons_over_the_masked_items_pixels_and_streams():
    torch.manual_seed(0)
    maps, targets = torch.rand(6, 2, 5, 5), torch.rand(6, 2, 5, 5)
    targets[:, 0] = 0.5 * maps[:, 0] + 0.1 * targets[:, 0]
    mask = torch.tensor([[1, 1], [1, 0], [0, 1], [1, 1], [0, 0], [1, 1]], dtype=torch.bool)
    expected = [np.corrcoef(maps[mask[:, g], g].flatten(), targets[mask[:, g], g].flatten())[0, 1] for g in range(2)]
    np.testing.assert_allclose(attention_correlation(maps, targets, mask), expected, rtol=1e-10)
    streamed = CorrelationAccumulator(2)
    streamed.update(maps[:3], targets[:3], mask[:3])
    streamed.update(maps[3:], targets[3:], mask[3:])
    np.testing.assert_allclose(streamed.compute(), expected, rtol=1e-10)
    squared = [((maps[mask[:, g], g] - targets[mask[:, g], g]).double() ** 2).mean().item() for g in range(2)]
    np.testing.assert_allclose(streamed.mean_squared_error(), squared, rtol=1e-10)   # evaluate's attention_mse
    assert np.isnan(attention_correlation(maps, targets, torch.zeros(6, 2, dtype=torch.bool))).all()


# --- training, checkpoint, explain -------------------------------------------------------------

@pytest.fixture(scope="module")
def groups_run(df_shards, tmp_path_factory):
    from vsam_train.train import main

    previous = torch.get_num_threads()
    config = _groups_config(**{"train.epochs": 3, "train.batch_size": 16, "data.num_workers": 0,
                               "data.max_val_batches": None, "model.group_warmup_steps": 6})
    run = tmp_path_factory.mktemp("groups") / "run"
    try:
        summary = main(config, df_shards, run, device="cpu")
    finally:
        torch.set_num_threads(previous)
    return config, run, summary


def test_groups_model_trains_on_real_shards_and_its_maps_learn_their_heatmaps(groups_run):
    config, run, summary = groups_run
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3] and summary["epochs"] == metrics
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert all(m["train_heatmap_loss"] > 0 and m["val_items"] == 24 for m in metrics)
    groups = ("texture", "sleeve", "length", "neckline", "fabric", "fit")
    correlations = [[m[f"val_attention_corr/{g}"] for g in groups] for m in metrics]
    assert np.isfinite(correlations).all()
    assert np.mean(correlations[-1]) > np.mean(correlations[0])         # the maps move towards their heatmaps
    assert metrics[-1]["val_attention_corr"] > 0


def test_a_groups_checkpoint_loads_predicts_and_exports(groups_run, tmp_path):
    from vsam_train.checkpoint import load_for_inference
    from vsam_train.export import export_checkpoint

    config, run, _ = groups_run
    model, info = load_for_inference(run / "checkpoints" / "last.pt")
    assert model.group_names == ["texture", "sleeve", "length", "neckline", "fabric", "fit"]
    assert info.config["model"]["attention"] == "groups" and float(model.pooling_mix) == 1.0
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out["group_attention"].shape == (1, 6, 16, 16) and out["attributes"].shape == (1, 26)
    exported = export_checkpoint(run / "checkpoints" / "last.pt", "onnx", tmp_path / "groups.onnx")
    assert exported.outputs == ["attributes", "attention"] and exported.max_difference < 1e-4


def test_cli_trains_the_groups_model_with_attention_groups(df_shards, tmp_path):
    from click.testing import CliRunner

    from cli import main as vsam
    from vsam_train.checkpoint import load_checkpoint

    common = ["train", "--shards", str(df_shards), "--config", str(TINY), "--device", "cpu", "--epochs", "1",
              "--batch-size", "16", "--workers", "0", "--set", "train.max_steps_per_epoch=2",
              "--set", "data.max_val_batches=1"]
    previous = torch.get_num_threads()
    try:
        result = CliRunner().invoke(vsam, [*common, "--out", str(tmp_path / "run"), "--attention", "groups"])
        assert result.exit_code == 0, result.output
        refused = CliRunner().invoke(vsam, [*common, "--out", str(tmp_path / "b"), "--attention", "groups",
                                            "--model", "vgg16"])
    finally:
        torch.set_num_threads(previous)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["config"]["model"]["attention"] == "groups" and "attention.project.weight" in state["model"]
    assert refused.exit_code == 2 and "applies to model.name vsam" in refused.output


def test_explain_shows_one_overlay_per_group_for_the_groups_model(groups_run, df_val_images, tmp_path):
    from PIL import Image

    from vsam_train.explain import explain_folder

    _, run, _ = groups_run
    summary = explain_folder(run / "checkpoints" / "last.pt", df_val_images, tmp_path / "explain", limit=1,
                             progress=False, device="cpu")
    assert summary.n_explained == 1
    folder = next((tmp_path / "explain" / "images").iterdir())
    groups = ("texture", "sleeve", "length", "neckline", "fabric", "fit")
    for group in groups:
        picture = folder / f"model-attention-group-{group}.png"
        assert Image.open(picture).size == Image.open(folder / "input.png").size
    gallery = (tmp_path / "explain" / "index.html").read_text()
    assert all(f"Ŝ {group}" in gallery and f"model-attention-group-{group}.png" in gallery for group in groups)


def test_the_configured_sigma_widens_the_group_maps_as_it_widens_the_single_target(df_shards):
    """data.heatmap_sigma reaches every target the loader renders. The group maps once kept the stored σ
    whatever the config said: a σ ablation of the groups model trained bit for bit the same weights."""
    joints = group_joints_for(load_config(None, {"model.attention": "groups"}), read_collection(df_shards).vocabulary)
    stored = ShardStream(df_shards, "val", image_size=224, batch_size=20, train=False, group_joints=joints)
    wide = ShardStream(df_shards, "val", image_size=224, batch_size=20, train=False, group_joints=joints,
                       heatmap_sigma=3 * stored.heatmap_sigma)
    stored_batch, wide_batch = (next(iter(make_loader(s, num_workers=0))) for s in (stored, wide))
    lit = stored_batch["group_has_pose"]
    assert lit.any() and torch.equal(lit, wide_batch["group_has_pose"])
    # a wider Gaussian of the same peak covers more of the map, in every group map that has a pose
    assert (wide_batch["group_heatmap"][lit].sum((-1, -2)) > stored_batch["group_heatmap"][lit].sum((-1, -2))).all()
    maps, _, paths = split_group_heatmaps(df_shards, "val", joints, max_items=20, sigma=3 * stored.heatmap_sigma)
    assert paths == wide_batch["path"]
    torch.testing.assert_close(torch.from_numpy(maps / np.float32(255)), wide_batch["group_heatmap"], rtol=0,
                               atol=0.51 / 255)
