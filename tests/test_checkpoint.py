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


def test_an_empty_file_or_another_file_named_pt_is_named_for_what_it_is(tmp_path):
    """torch's message for both was "mmap can only be used with files saved with
    torch.save(_use_new_zipfile_serialization=True)", which says neither what the file is nor what is wrong."""
    empty, text = tmp_path / "empty.pt", tmp_path / "json.pt"
    empty.write_bytes(b"")
    text.write_text('{"model": 1}')
    for mmap in (True, False):
        with pytest.raises(CheckpointError, match=r"empty.pt: not a vsam checkpoint \(empty file, 0 bytes\)"):
            load_checkpoint(empty, mmap=mmap)
        with pytest.raises(CheckpointError, match=r"json.pt: not a torch checkpoint \(a file torch.save writes starts "
                                                  r"with a zip or pickle header; this one starts with b'\{\"mo'\)"):
            load_checkpoint(text, mmap=mmap)


def test_a_legacy_torch_file_loads_even_when_memory_mapping_is_asked_for(tmp_path):
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(3.0)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(load_checkpoint(legacy, mmap=True)["w"], torch.arange(3.0))


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


def _with_config(state: dict, section: str, key: str | None, value) -> dict:
    config = {name: dict(values) for name, values in state["config"].items()}
    if key is None:
        config[section] = value
    else:
        config[section][key] = value
    return {**state, "config": config}


MALFORMED_CONFIGS = [
    (("train", "batch_size", 0), "train.batch_size must be an integer >= 1, got 0"),
    (("data", "eval_batch_size", "x"), "data.eval_batch_size must be an integer >= 1 or null, got 'x'"),
    (("data", None, None), "data is a section ("),
    (("model", "image_size", 7), "model.image_size must be an integer in [32, 1024] and a multiple of 32, got 7"),
    (("model", "width", 1000.0), "model.width must be a number in (0, 4], got 1000.0"),
]


@pytest.mark.parametrize("change, reason", MALFORMED_CONFIGS, ids=[r for _, r in MALFORMED_CONFIGS])
def test_a_stored_config_that_a_config_file_could_not_hold_is_refused_naming_the_checkpoint_and_key(
        tmp_path, change, reason):
    from vsam_train.checkpoint import load_for_inference

    save_checkpoint(tmp_path / "odd.pt", _with_config(_small_state(), *change))
    with pytest.raises(CheckpointError) as error:
        load_for_inference(tmp_path / "odd.pt")
    assert str(error.value).startswith(f"{tmp_path / 'odd.pt'}: its stored config is not usable ({reason}")


def test_a_stored_config_key_this_vsam_no_longer_has_is_dropped_and_the_model_loads(tmp_path):
    from vsam_train.checkpoint import load_for_inference

    state = _small_state()
    save_checkpoint(tmp_path / "older.pt", _with_config(state, "train", "epochz", 3))
    _, info = load_for_inference(tmp_path / "older.pt")
    assert "epochz" not in info.config["train"] and info.config["train"] == state["config"]["train"]


def test_a_stored_config_that_is_not_a_mapping_or_lacks_a_section_is_refused(tmp_path):
    from vsam_train.checkpoint import load_for_inference

    state = _small_state()
    save_checkpoint(tmp_path / "text.pt", {**state, "config": "str"})
    with pytest.raises(CheckpointError, match=r"text.pt: its stored config is not usable "
                                              r"\(a config is a mapping of sections, got str\)"):
        load_for_inference(tmp_path / "text.pt")
    without_model = {section: values for section, values in state["config"].items() if section != "model"}
    save_checkpoint(tmp_path / "part.pt", {**state, "config": without_model})
    with pytest.raises(CheckpointError, match=r"part.pt: its stored config is not usable \(no section model\)"):
        load_for_inference(tmp_path / "part.pt")


@pytest.mark.parametrize("command", ["eval", "audit"])
def test_eval_and_audit_refuse_a_zero_batch_size_in_one_line_with_exit_1(tmp_path, command):
    """Both read their batch size from the stored config: a ZeroDivisionError traceback before."""
    from click.testing import CliRunner

    from cli import EXIT_FAILED, main

    bad = tmp_path / "bs0.pt"
    save_checkpoint(bad, _with_config(_with_config(_small_state(), "train", "batch_size", 0),
                                      "data", "eval_batch_size", 0))
    extra = ["--out", str(tmp_path / "audit")] if command == "audit" else []
    result = CliRunner().invoke(main, [command, "--checkpoint", str(bad), "--shards", str(tmp_path), *extra])
    assert result.exit_code == EXIT_FAILED, result.output
    assert result.output == (f"vsam {command}: {bad}: its stored config is not usable "
                             "(train.batch_size must be an integer >= 1, got 0)\n")


def test_the_config_training_saves_passes_its_own_validation(tiny_checkpoint):
    from vsam_train.checkpoint import load_for_inference

    stored = load_checkpoint(tiny_checkpoint)["config"]
    assert load_for_inference(tiny_checkpoint)[1].config == stored


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
