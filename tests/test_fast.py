"""vsam_train.fast: a split decoded once into memory, batched augmentation equal to the streaming
loader's per-item functions, batches that train.train_one_epoch / train.evaluate accept."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from pose_prep.shard_format import Shard, live_rows
from vsam_train.data import ShardStream, augmented_image, draw_augmentation, heatmap_target, preprocess_tensor
from vsam_train.fast import (AttentionRecorder, ResidentBatches, attention_agreement, augment_batch, heatmap_batch,
                             load_resident_split)

AUGMENT = {"p": 1.0, "flip": 0.5, "crop_scale": [0.6, 1.0], "crop_ratio": [0.75, 1.3333], "jitter": 0.2}


@pytest.fixture(scope="module")
def resident_val(df_shards):
    return load_resident_split(df_shards, "val", 64, "cpu")


def test_resident_split_holds_the_stored_items_resized_as_preprocess_does(df_shards, resident_val):
    rows = live_rows(df_shards, ("val",))
    first_shard, first_rows = next(iter(rows.items()))
    with Shard(first_shard) as shard:
        data = shard.read(("path", "attributes", "heatmap", "has_pose"))
        image = shard.image(int(first_rows[0]))
    assert len(resident_val) == sum(len(r) for r in rows.values()) == 24
    assert resident_val.paths[0] == data["path"][first_rows[0]]
    assert resident_val.images.dtype == torch.uint8 and resident_val.images.shape == (24, 3, 64, 64)
    np.testing.assert_array_equal(resident_val.attributes[0].numpy(), data["attributes"][first_rows[0]])
    np.testing.assert_array_equal(resident_val.heatmaps[0, 0].numpy(), data["heatmap"][first_rows[0]])
    assert bool(resident_val.has_pose[0]) == bool(data["has_pose"][first_rows[0]])
    from torchvision.io import decode_image
    with warnings.catch_warnings():   # torchvision 0.29 deprecates its codecs (still the ones in use)
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = decode_image(torch.frombuffer(bytearray(image), dtype=torch.uint8))
    expected = preprocess_tensor(decoded, 64)
    got = augment_batch(resident_val.images[:1], torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1]], dtype=torch.float32), 64)
    torch.testing.assert_close(got[0], expected, rtol=0, atol=1e-6)
    assert resident_val.decode_seconds > 0


def test_max_items_keeps_the_first_items_in_stored_order(df_shards, resident_val):
    part = load_resident_split(df_shards, "val", 64, "cpu", max_items=5, chunk=2)
    assert part.paths == resident_val.paths[:5]
    assert torch.equal(part.images, resident_val.images[:5])


def test_batched_augmentation_equals_the_per_item_functions(resident_val):
    rng = np.random.default_rng(3)
    params = np.stack([draw_augmentation(rng, AUGMENT if i % 3 else None) for i in range(len(resident_val))])
    assert 0 < params[:, 0].sum() < len(params) and params[:, 1].sum() > 0   # augmented, plain and flipped items
    images = augment_batch(resident_val.images, torch.from_numpy(params), 64)
    heatmaps = heatmap_batch(resident_val.heatmaps, torch.from_numpy(params), 16)
    for i, row in enumerate(params):
        expected = augmented_image(resident_val.images[i], torch.from_numpy(row), 64)
        torch.testing.assert_close(images[i], expected, rtol=0, atol=1e-5)
        expected_heatmap = heatmap_target(resident_val.heatmaps[i, 0].numpy(), row, 16)
        torch.testing.assert_close(heatmaps[i], expected_heatmap, rtol=0, atol=1e-6)


def test_extra_maps_are_augmented_like_the_heatmap_and_extra_items_gathered(resident_val):
    from dataclasses import replace

    doubled = replace(resident_val, extra_maps={"pair": resident_val.heatmaps.repeat(1, 2, 1, 1)},
                      extra_items={"number": torch.arange(len(resident_val))})
    batches = ResidentBatches(doubled, image_size=64, batch_size=6, train=True, augment=AUGMENT, seed=2)
    for batch in batches:
        assert batch["pair"].shape == (6, 2, 16, 16)
        assert torch.equal(batch["pair"][:, :1], batch["heatmap"])
        assert torch.equal(batch["pair"][:, 1:], batch["heatmap"])
        assert [resident_val.paths[i] for i in batch["number"].tolist()] == batch["path"]
    assert doubled.nbytes == resident_val.nbytes + resident_val.heatmaps.numel() * 2 + 8 * len(resident_val)


def test_training_batches_cover_each_item_once_per_epoch_and_change_with_the_epoch(resident_val):
    batches = ResidentBatches(resident_val, image_size=64, batch_size=5, train=True, augment=AUGMENT, seed=1)
    assert len(batches) == len(batches.dataset) == 4   # 24 items: 4 full batches, 4 left out
    epoch0 = [b["path"] for b in batches]
    paths0 = [p for b in epoch0 for p in b]
    assert len(set(paths0)) == 20 and set(paths0) <= set(resident_val.paths)
    assert [b["path"] for b in batches] == epoch0   # same epoch, same batches
    batches.set_epoch(1)
    assert [b["path"] for b in batches] != epoch0
    batch = next(iter(batches))
    assert batch["image"].shape == (5, 3, 64, 64) and batch["heatmap"].shape == (5, 1, 16, 16)
    assert batch["augmentation"][:, 0].all()   # p = 1
    val = ResidentBatches(resident_val, image_size=64, batch_size=10, train=False)
    assert [len(b["path"]) for b in val] == [10, 10, 4]
    assert [p for b in val for p in b["path"]] == resident_val.paths
    assert not next(iter(val))["augmentation"][:, 0].any()


def test_resident_batches_drive_train_one_epoch_and_evaluate(resident_val, one_torch_thread):
    from vsam_train.config import load_config
    from vsam_train.losses import VsamLoss
    from vsam_train.train import build_model, build_optimizer, evaluate, train_one_epoch

    config = load_config(None, {"model.width": 0.0625, "model.image_size": 64, "optim.lr": 1e-3})
    torch.manual_seed(0)
    model = build_model(config, resident_val.vocabulary)
    optimizer, scheduler = build_optimizer(model, config)
    criterion = VsamLoss.from_config(config["loss"])
    batches = ResidentBatches(resident_val, image_size=64, batch_size=8, train=True, augment=AUGMENT)
    stats, step = train_one_epoch(model, criterion, optimizer, scheduler, batches, torch.device("cpu"), 0, 0,
                                  config=config)
    assert step == 3 and stats["train_images"] == 24 and np.isfinite(stats["train_loss"])
    recorder = AttentionRecorder(model)
    val = ResidentBatches(resident_val, image_size=64, batch_size=10, train=False)
    result = evaluate(recorder, criterion, val, torch.device("cpu"), config=config)
    assert result["n_items"] == 24 and result["paths"] == resident_val.paths
    maps = recorder.attention()
    assert maps.shape == (24, 1, 16, 16)
    target = torch.cat([b["heatmap"] for b in val])
    agreement = attention_agreement(maps, target, resident_val.has_pose)
    assert agreement["n_items"] == int(resident_val.has_pose.sum())
    assert agreement["mse"] == pytest.approx(result["attention_mse"], rel=1e-6)
    assert -1 <= agreement["pearson_mean"] <= 1


def test_attention_agreement_against_numpy():
    rng = np.random.default_rng(0)
    target = rng.random((6, 1, 8, 8))
    predicted = 0.5 * target + 0.5 * rng.random((6, 1, 8, 8))
    predicted[2] = 0.3                                  # a constant map has no correlation
    has_pose = np.array([1, 1, 1, 0, 1, 1], bool)
    got = attention_agreement(torch.from_numpy(predicted), torch.from_numpy(target), torch.from_numpy(has_pose))
    expected = [np.corrcoef(predicted[i].ravel(), target[i].ravel())[0, 1] for i in (0, 1, 4, 5)]
    assert got["n_items"] == 5 and got["n_constant"] == 1
    assert got["pearson_mean"] == pytest.approx(np.mean(expected))
    assert got["mse"] == pytest.approx(np.mean((predicted[has_pose] - target[has_pose]) ** 2))
    none = attention_agreement(torch.from_numpy(predicted), torch.from_numpy(target), torch.zeros(6, dtype=torch.bool))
    assert none["n_items"] == 0 and none["pearson_mean"] is None


def test_streaming_and_resident_see_the_same_labels(df_shards, resident_val):
    stream = ShardStream(df_shards, "val", image_size=64, batch_size=24, train=False)
    batch = next(iter(stream))
    assert batch["path"] == resident_val.paths
    assert torch.equal(batch["attributes"], resident_val.attributes)
    torch.testing.assert_close(batch["image"], augment_batch(resident_val.images, batch["augmentation"], 64),
                               rtol=0, atol=1e-6)
