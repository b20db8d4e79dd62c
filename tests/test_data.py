import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pose_prep.shard_format import Shard, live_items
from vsam_train.config import DEFAULTS
from vsam_train.data import (MEAN, STD, ShardStream, augmented_image, decode_on_device, draw_augmentation,
                             heatmap_target, make_loader, preprocess)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
AUGMENT = DEFAULTS["data"]["augment"]
GROUP_SIZES = (7, 3, 3, 4, 6, 3)


def _stream(folder, split="train", **kwargs):
    options = {"image_size": 64, "batch_size": 8, "train": split == "train", "augment": AUGMENT,
               "shuffle_buffer": 16}
    return ShardStream(folder, split, **{**options, **kwargs})


def _paths(batches):
    return [p for b in batches for p in b["path"]]


def _open_shard_files() -> list[str]:
    links = (os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
             if os.path.exists(f"/proc/self/fd/{fd}"))
    return [link for link in links if link.endswith(".h5")]


def test_preprocess_stretches_to_a_square_and_normalises_with_imagenet_statistics():
    rgb = np.empty((30, 50, 3), np.uint8)
    rgb[:] = np.round(np.array(MEAN) * 255).astype(np.uint8)
    tensor = preprocess(rgb, 64)
    assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.float32
    assert tensor.abs().max() < 0.01
    white = preprocess(np.full((10, 20, 3), 255, np.uint8), 32)
    torch.testing.assert_close(white[:, 0, 0], (1 - torch.tensor(MEAN)) / torch.tensor(STD))
    with pytest.raises(ValueError, match="uint8 RGB"):
        preprocess(np.zeros((10, 10), np.uint8), 32)


def test_normalisation_constants_are_made_once_per_device_and_serve_autograd_after_inference_mode():
    from vsam_train.data import _mean_std, normalize

    _mean_std.cache_clear()
    with torch.inference_mode():               # evaluate() may be the first to normalise
        normalize(torch.rand(3, 4, 4))
    pixels = torch.rand(3, 4, 4, requires_grad=True)
    normalize(pixels).sum().backward()         # e.g. a saliency map through the preprocessing
    torch.testing.assert_close(pixels.grad, (1 / torch.tensor(STD)).view(3, 1, 1).expand(3, 4, 4))
    assert _mean_std.cache_info().misses == 1


def test_train_batches_hold_real_labels_heatmaps_and_pose_flags(df_shards, df_source):
    batches = list(make_loader(_stream(df_shards), num_workers=0))
    items = {i["path"]: i for i in live_items(df_shards)}
    rows = (df_source / "split" / "train_attr.txt").read_text().splitlines()
    names = (df_source / "split" / "train.txt").read_text().split()
    assert len(batches) == 96 // 8
    for batch in batches:
        assert batch["image"].shape == (8, 3, 64, 64) and batch["heatmap"].shape == (8, 1, 16, 16)
        assert 0 <= batch["heatmap"].min() and batch["heatmap"].max() <= 1
        for i, path in enumerate(batch["path"]):
            assert items[path]["split"] == "train"
            assert bool(batch["has_pose"][i]) == items[path]["has_pose"]
            if not batch["has_pose"][i]:
                assert batch["heatmap"][i].max() == 0
            # the multi-hot row holds the true attribute of each of the 6 groups of train_attr.txt
            picks = [int(v) for v in rows[names.index(path)].split()]
            starts = np.cumsum((0,) + GROUP_SIZES[:-1])
            assert torch.nonzero(batch["attributes"][i]).flatten().tolist() == [s + p for s, p in zip(starts, picks)]
    posed = sum(int(b["has_pose"].sum()) for b in batches)
    assert posed == sum(i["has_pose"] for i in items.values() if i["split"] == "train")
    assert 0 < posed < 96, "items with and without a person, both kinds of heatmap"
    assert (batches[0]["category"] == -1).all()                          # the attribute subset has no categories


def test_an_epoch_is_deterministic_and_epochs_differ(df_shards):
    stream = _stream(df_shards)
    first = list(make_loader(stream, num_workers=0))
    again = list(make_loader(stream, num_workers=0))
    assert _paths(first) == _paths(again)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))
    stream.set_epoch(1)
    other = list(make_loader(stream, num_workers=0))
    assert _paths(other) != _paths(first) and sorted(_paths(other)) != _paths(other)
    augmented = torch.cat([b["augmentation"][:, 0] for b in first + other])
    assert 0.15 < augmented.mean() < 0.5                                 # p = 0.33


def test_ranks_and_workers_split_an_epoch_into_disjoint_equal_parts(df_shards):
    parts = []
    for rank in range(3):
        stream = _stream(df_shards, batch_size=10, rank=rank, world_size=3, seed=7)
        stream.set_epoch(2)
        batches = list(make_loader(stream, num_workers=2))
        assert len(batches) == len(stream) == 96 // 30
        assert all(len(b["path"]) == 10 for b in batches)
        assert sorted(_paths(batches)) == sorted(str(p) for p in _item_paths(stream))
        parts.append(set(_paths(batches)))
    assert sum(len(p) for p in parts) == len(set.union(*parts)) == 90


def _item_paths(stream):
    paths = {}
    for shard_path, row in stream.rank_items():
        if shard_path not in paths:
            with Shard(shard_path) as shard:
                paths[shard_path] = shard.read(("path",))["path"]
        yield paths[shard_path][row]


def _open_hdf5_files() -> list[str]:
    return [h5py.h5f.FileID(i).name.decode() for i in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE)]


def test_workers_open_the_shards_and_the_parent_never_does(df_shards):
    stream = _stream(df_shards)
    # The parent holds its snapshot's lease (a plain descriptor per shard, pose_prep.leases), never an HDF5 file.
    assert len(stream.snapshot.lease) == len(stream.shards) and _open_hdf5_files() == []
    assert {str(path) for path, _ in stream.shards} <= set(_open_shard_files())
    loader = make_loader(stream, num_workers=1)
    iterator = iter(loader)
    next(iterator)
    assert _open_hdf5_files() == []          # the worker holds them
    assert len([next(iterator) for _ in range(len(stream) - 1)]) == len(stream) - 1
    assert _open_hdf5_files() == []


def test_evaluation_stream_keeps_every_item_once_in_stored_order(df_shards):
    stream = _stream(df_shards, split="val", batch_size=10)
    batches = list(make_loader(stream, num_workers=0))
    assert [len(b["path"]) for b in batches] == [10, 10, 4]
    assert (torch.cat([b["augmentation"][:, 0] for b in batches]) == 0).all()
    stored = [i["path"] for i in live_items(df_shards) if i["split"] == "val"]
    assert _paths(batches) == stored


def test_gpu_mode_hands_over_jpeg_bytes_that_decode_to_the_same_batch(df_shards):
    cpu = next(iter(make_loader(_stream(df_shards), num_workers=0)))
    raw = next(iter(make_loader(_stream(df_shards, decode="gpu"), num_workers=0)))
    assert "image" not in raw and len(raw["encoded"]) == 8
    assert raw["encoded"][0][:2].tolist() == [0xFF, 0xD8]         # JPEG start of image
    assert raw["path"] == cpu["path"]
    # decode_on_device is what runs on CUDA; its nvjpeg call also decodes on the CPU
    torch.testing.assert_close(decode_on_device(raw, 64, "cpu"), cpu["image"])


def test_flip_and_crop_move_image_and_heatmap_together(df_shards):
    """An image painted with its own heatmap, augmented, must still match the augmented heatmap."""
    with Shard(next(df_shards.glob("shard-*.h5"))) as shard:
        data = shard.read(("heatmap", "has_pose"))
    stored = data["heatmap"][int(np.flatnonzero(data["has_pose"])[0])]
    big = F.interpolate(torch.from_numpy(stored.astype(np.float32))[None, None], size=(180, 120),
                        mode="bilinear", align_corners=False)[0]
    image = big.round().clamp(0, 255).to(torch.uint8).expand(3, -1, -1).contiguous()
    rng = np.random.default_rng(3)
    checked = 0
    while checked < 4:
        params = draw_augmentation(rng, dict(AUGMENT, p=1.0, jitter=0.0))
        if not params[1]:
            continue                                           # keep the flipped ones: the harder case
        augmented = augmented_image(image, torch.from_numpy(params), 224)
        gray = (augmented[0] * STD[0] + MEAN[0]) * 255 / 255.0
        shrunk = F.adaptive_avg_pool2d(gray[None, None], 56)[0, 0]
        target = heatmap_target(stored, params, 56)[0]
        correlation = np.corrcoef(shrunk.flatten().numpy(), target.flatten().numpy())[0, 1]
        assert correlation > 0.97, correlation
        peak = np.unravel_index(int(target.argmax()), target.shape)
        assert shrunk[peak] > 0.8 * float(shrunk.max())
        checked += 1
    unaugmented = heatmap_target(stored, draw_augmentation(rng, None), 56)[0]
    torch.testing.assert_close(unaugmented, torch.from_numpy(stored / np.float32(255)))


def test_too_small_a_split_and_gpu_decoding_of_other_formats_are_refused(df_shards):
    with pytest.raises(ValueError, match="fewer than one batch"):
        _stream(df_shards, split="val", batch_size=16, train=True, world_size=2)
    with pytest.raises(ValueError, match="decode must be"):
        _stream(df_shards, decode="nvjpeg")


def test_a_folder_without_an_index_is_named(tmp_path):
    from pose_prep.shard_format import ShardFormatError

    with pytest.raises(ShardFormatError, match=str(tmp_path)):
        _stream(Path(tmp_path))


def test_a_target_rendered_with_the_stored_joints_and_sigma_is_the_stored_heatmap(df_shards):
    """data.heatmap_joints / heatmap_sigma render the target from the stored keypoints; with the
    collection's own subset (items without a category: "full") and σ it is prep-pose's heatmap."""
    stored = _stream(df_shards, "val", batch_size=24)
    rendered = _stream(df_shards, "val", batch_size=24, heatmap_joints="full", heatmap_sigma=stored.heatmap_sigma)
    assert stored.target is None and rendered.target is not None
    a, b = next(iter(stored)), next(iter(rendered))
    assert a["path"] == b["path"] and a["has_pose"].any()
    torch.testing.assert_close(a["heatmap"], b["heatmap"], atol=1 / 255, rtol=0)


def test_the_body_target_leaves_the_face_dark_and_a_wider_sigma_lights_more(df_shards):
    from pose_prep.heatmaps import JOINT_GROUPS

    def target(**kwargs):
        stream = _stream(df_shards, "val", batch_size=24, **kwargs)
        reader_batch = next(iter(stream))
        return reader_batch["heatmap"], reader_batch["has_pose"]

    full, posed = target(heatmap_joints="full")
    body, _ = target(heatmap_joints="body")
    wide, _ = target(heatmap_joints="full", heatmap_sigma=3.0)
    assert set(JOINT_GROUPS["body"]).isdisjoint({0, 14, 15, 16, 17})
    assert (body <= full + 1e-6).all() and (body < full - 0.1).any()     # the face was lit, now it is not
    assert (wide[posed] > 0.05).sum() > (full[posed] > 0.05).sum()


def test_a_category_outside_the_vocabulary_stops_vsam_train_with_one_line_naming_shard_and_row(df_shards, tmp_path):
    """Met in a loader worker process (--workers 1): torch re-raises a worker's error in the parent
    with the worker's traceback in its message, which the command must not print."""
    import shutil

    from click.testing import CliRunner

    from cli import EXIT_FAILED, main
    from shard_faults import rewrite_value

    shards = tmp_path / "shards"
    shutil.copytree(df_shards, shards)
    damaged = shards / "shard-000002.h5"
    rewrite_value(damaged, "category", 5, 3)     # the attribute subset has no categories: only -1 fits
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    result = CliRunner().invoke(main, ["train", "--shards", str(shards), "--out", str(tmp_path / "run"), "--config",
                                       str(config), "--epochs", "1", "--workers", "1", "--device", "cpu"])
    assert result.exit_code == EXIT_FAILED
    assert result.output.splitlines()[-1] == (f"vsam train: {damaged}: row 5: category 3 is outside the vocabulary's "
                                              "0 categories (only -1, unknown)")
    assert "Traceback" not in result.output and "IndexError" not in result.output


@pytest.mark.parametrize("key, value", [("heatmap", '{"size": [56, 5'), ("heatmap", "[1, 2]"),
                                        ("vocabulary", '{"categories": 3}')])
def test_meta_values_a_faulty_writer_stored_are_named_not_a_traceback(df_shards, tmp_path, key, value):
    import shutil

    from pose_prep.shard_format import ShardFormatError, index_path, open_index, set_meta

    shards = tmp_path / "shards"
    shutil.copytree(df_shards, shards)
    with open_index(shards) as connection, connection:
        set_meta(connection, key, value)                 # with a matching checksum: no flipped byte
    with pytest.raises(ShardFormatError, match=f"^{index_path(shards)}: "):
        _stream(shards)
