import pickle
import random

import numpy as np
import pytest
import torch

from vsam_train.checkpoint import (CheckpointError, load_checkpoint, restore_rng_states, rng_states,
                                   save_checkpoint)


def test_save_is_atomic_and_load_is_weights_only(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    state = {"model": {"w": torch.arange(4.0)}, "epoch": 3, "config": {"a": [1, 2.5, "x", None]}, "rng": rng_states()}
    save_checkpoint(path, state)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]      # no temporary file left
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["config"] == state["config"]


class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_a_pickle_with_code_or_a_damaged_file_is_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, evil, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="evil.pt: not a readable vsam checkpoint"):
        load_checkpoint(evil)
    save_checkpoint(tmp_path / "cut.pt", {"w": torch.zeros(1000)})
    data = (tmp_path / "cut.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "none.pt")


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    save_checkpoint(tmp_path / "c.pt", {"rng": rng_states()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_states(load_checkpoint(tmp_path / "c.pt")["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


@pytest.mark.parametrize("command", ["predict", "eval", "explain", "export"])
def test_a_torch_file_that_is_not_a_checkpoint_is_one_line_naming_it_in_every_command(tmp_path, command):
    from click.testing import CliRunner

    from cli import EXIT_FAILED, main

    images = tmp_path / "img"
    images.mkdir()
    options = {"predict": ["--images", str(images)], "eval": ["--shards", str(tmp_path)],
               "explain": ["--images", str(images), "--out", str(tmp_path / "gallery")],
               "export": ["--format", "onnx"]}[command]
    tensor, partial = tmp_path / "x.pt", tmp_path / "y.pt"
    torch.save(torch.zeros(3), tensor)
    torch.save({"model": {"w": torch.zeros(1)}, "epoch": 1}, partial)
    for path, reason in ((tensor, "holds a Tensor, not a dict"),
                         (partial, "no config, vocabulary, model_name, image_size, step")):
        result = CliRunner().invoke(main, [command, "--checkpoint", str(path), *options])
        assert result.exit_code == EXIT_FAILED
        assert result.output == f"vsam {command}: {path}: not a vsam checkpoint ({reason})\n"


def test_loading_for_inference_leaves_the_optimizer_state_on_disk(tmp_path):
    """A checkpoint whose optimizer state weighs 256 MB loads for inference reading far less than
    that (the file is memory-mapped and only the weights are touched). Bytes read by this process
    while it loads, /proc/self/io's rchar (every read(2) of every thread; pages of a mapped file
    are not read(2)), not RSS: importing torch alone peaks higher than the state."""
    from pose_prep.shard_format import Vocabulary
    from vsam_train.checkpoint import load_for_inference
    from vsam_train.config import load_config
    from vsam_train.models import model_from_config

    def bytes_read() -> int:
        with open("/proc/self/io") as io:
            return int(next(line for line in io if line.startswith("rchar")).split()[1])

    config = load_config(None, {"model.width": 0.0625, "model.image_size": 64})
    vocabulary = Vocabulary(attributes=["a", "b"], attribute_groups=["", ""])
    state = {"model": model_from_config(config, vocabulary).state_dict(), "config": config,
             "vocabulary": vocabulary.to_json(), "model_name": "vsam", "image_size": 64, "epoch": 1, "step": 1,
             "optimizer": {"state": {0: {"exp_avg": torch.ones(64 * 2**20)}}}}      # 256 MB
    save_checkpoint(tmp_path / "big.pt", state)
    del state
    before = bytes_read()
    load_for_inference(tmp_path / "big.pt")
    read = (bytes_read() - before) / 2**20
    assert read < 64, f"read {read:.0f} MB to load a checkpoint with 256 MB of optimizer state"


def _small_state() -> dict:
    """The inference keys of a real (untrained) tiny VSAM checkpoint, 64 px."""
    from pose_prep.shard_format import Vocabulary
    from vsam_train.config import load_config
    from vsam_train.models import model_from_config

    config = load_config(None, {"model.width": 0.0625, "model.image_size": 64})
    vocabulary = Vocabulary(attributes=["a", "b"], attribute_groups=["", ""])
    return {"model": model_from_config(config, vocabulary).state_dict(), "config": config,
            "vocabulary": vocabulary.to_json(), "model_name": "vsam", "image_size": 64, "epoch": 1, "step": 1}


@pytest.mark.parametrize("image_size", [0, -64, 100000, 33, "abc"])
def test_a_stored_image_size_no_model_takes_is_refused_naming_the_checkpoint(tmp_path, image_size):
    """0 divided by zero in predict's resize, 100000 allocated until the kernel killed the process."""
    from vsam_train.checkpoint import load_for_inference

    save_checkpoint(tmp_path / "odd.pt", {**_small_state(), "image_size": image_size})
    with pytest.raises(CheckpointError, match=rf"odd.pt: image_size {image_size!r} is not usable "
                                              r"\(an integer in \[32, 1024\] and a multiple of 32\)"):
        load_for_inference(tmp_path / "odd.pt")


def test_a_checkpoint_written_before_val_figures_were_kept_loads_without_them(tmp_path):
    from pose_prep.shard_format import Vocabulary
    from vsam_train.checkpoint import load_for_inference
    from vsam_train.config import load_config
    from vsam_train.models import model_from_config

    config = load_config(None, {"model.width": 0.0625, "model.image_size": 64})
    vocabulary = Vocabulary(attributes=["a", "b"], attribute_groups=["", ""])
    state = {"model": model_from_config(config, vocabulary).state_dict(), "config": config,
             "vocabulary": vocabulary.to_json(), "model_name": "vsam", "image_size": 64, "epoch": 1, "step": 1}
    save_checkpoint(tmp_path / "old.pt", state)
    _, info = load_for_inference(tmp_path / "old.pt")
    assert info.val_metrics == {} and (info.epoch, info.step, info.image_size) == (1, 1, 64)
    save_checkpoint(tmp_path / "odd.pt", {**state, "val_metrics": {"val_AP": 0.5, "note": "text", "flag": True}})
    assert load_for_inference(tmp_path / "odd.pt")[1].val_metrics == {"val_AP": 0.5}
