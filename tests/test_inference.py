"""vsam_train/inference.py: an ONNX export as a model, and `data.preprocess` without torch."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import fixture_set
from pose_prep.images import load
from vsam_train.checkpoint import load_for_inference
from vsam_train.data import MEAN, STD, preprocess
from vsam_train.errors import CheckpointError
from vsam_train.inference import finite_rows, load_onnx, preprocess_array, resize_antialiased

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_preprocess_array_is_data_preprocess_bit_for_bit():
    rng = np.random.default_rng(0)
    # Shrinking a lot and a little, enlarging, one side only, already square, tiny and thin images.
    shapes = [(300, 200), (200, 300), (224, 224), (225, 223), (1000, 700), (50, 1000), (17, 9), (3, 3), (224, 500)]
    for size in (224, 64):
        for height, width in shapes:
            rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            np.testing.assert_array_equal(preprocess_array(rgb, size, MEAN, STD), preprocess(rgb, size).numpy(),
                                          err_msg=f"{height}x{width} -> {size}")
    for path in sorted(fixture_set.PHOTOS.glob("*.jpg"))[:8]:         # real photos, up to 480 px
        rgb = load(path)[1].rgb
        np.testing.assert_array_equal(preprocess_array(rgb, 224, MEAN, STD), preprocess(rgb, 224).numpy(),
                                      err_msg=path.name)


def test_model_info_binds_the_preprocessing_to_the_model_and_reads_as_the_old_dict(tiny_checkpoint):
    _, info = load_for_inference(tiny_checkpoint)
    rgb = load(sorted(fixture_set.PHOTOS.glob("*.jpg"))[0])[1].rgb
    tensor = info.preprocess(rgb)
    assert tensor.shape == (3, info.image_size, info.image_size) == (3, 64, 64)
    np.testing.assert_array_equal(tensor.numpy(), preprocess(rgb, 64).numpy())
    np.testing.assert_array_equal(info.preprocess_array(rgb), tensor.numpy())
    with pytest.warns(DeprecationWarning, match=r'info\["image_size"\] is deprecated: use info.image_size'):
        assert info["image_size"] == 64
    with pytest.raises(KeyError):
        info["no_such_key"]


def test_the_resize_keeps_flat_colours_and_the_shape():
    grey = np.full((301, 199, 3), 117, np.uint8)
    resized = resize_antialiased(grey, 224)
    assert resized.shape == (224, 224, 3) and resized.dtype == np.uint8 and (resized == 117).all()


def test_an_export_carries_what_predict_and_eval_need(tiny_onnx, tiny_checkpoint):
    model, info = load_onnx(tiny_onnx)
    _, expected = load_for_inference(tiny_checkpoint)
    for key in ("config", "vocabulary", "model_name", "image_size", "epoch", "step", "heatmap", "val_metrics"):
        assert getattr(info, key) == getattr(expected, key), key
    assert info.val_metrics["val_AP"] > 0 and "val_group_top1" in info.val_metrics
    assert info.mean == pytest.approx(MEAN) and info.std == pytest.approx(STD)
    outputs = model.run(np.zeros((2, 3, 64, 64), np.float32))
    assert outputs["attributes"].shape == (2, 26) and outputs["category"] is None
    assert outputs["attention"].shape == (2, 1, 16, 16)


def test_files_that_are_not_vsam_exports_are_named(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match=r"garbage.onnx: not a readable ONNX model"):
        load_onnx(garbage)
    identity = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["images"], ["attributes"])], "identity",
        [onnx.helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1, 2])],
        [onnx.helper.make_tensor_value_info("attributes", onnx.TensorProto.FLOAT, [1, 2])]))
    foreign = tmp_path / "foreign.onnx"
    onnx.save(identity, str(foreign))
    with pytest.raises(CheckpointError, match=r"foreign.onnx: an ONNX model without vsam metadata"):
        load_onnx(foreign)
    entry = identity.metadata_props.add()
    entry.key, entry.value = "vsam", json.dumps({"outputs": ["attributes"], "model_name": "vsam"})
    onnx.save(identity, str(foreign))
    with pytest.raises(CheckpointError, match=r"its vsam metadata is not usable \(KeyError: 'vocabulary'\)"):
        load_onnx(foreign)
    with pytest.raises(CheckpointError, match="no such ONNX file"):
        load_onnx(tmp_path / "missing.onnx")


def _with_metadata(exported, folder, change) -> Path:
    """A copy of the export `exported` whose "vsam" metadata text is `change(metadata dict)` (a dict: as JSON)."""
    model = onnx.load(str(exported))
    entry = next(p for p in model.metadata_props if p.key == "vsam")
    changed = change(json.loads(entry.value))
    entry.value = changed if isinstance(changed, str) else json.dumps(changed)
    path = folder / "crafted.onnx"
    onnx.save(model, str(path))
    return path


def _fewer_attributes(meta: dict) -> dict:
    vocabulary = meta["vocabulary"]
    for key in ("attributes", "attribute_groups"):
        vocabulary[key] = vocabulary[key][:2]
    return meta


UNUSABLE = r"its vsam metadata is not usable \(ValueError: "
CRAFTED_METADATA = [
    (lambda meta: "[1]", r"its vsam metadata is not usable \(a JSON list, not an object\)"),
    (lambda meta: "{not json", r"its vsam metadata is not usable \(not JSON"),
    (lambda meta: {**meta, "image_size": 0}, r"image_size 0 is not usable \(an integer in \[32, 1024\]"),
    (lambda meta: {**meta, "image_size": -64}, r"image_size -64 is not usable"),
    # Loading it was enough to be OOM-killed in eval: refused before anything is allocated.
    (lambda meta: {**meta, "image_size": 100000}, r"image_size 100000 is not usable"),
    (lambda meta: {**meta, "image_size": 96}, r"its graph takes images of shape \['batch', 3, 64, 64\], "
                                              r"not \[batch, 3, 96, 96\]"),
    (lambda meta: {**meta, "mean": [0.5]}, UNUSABLE + r"mean must be 3 finite numbers, got \[0.5\]"),
    (lambda meta: {**meta, "std": [0, 0, 0]}, UNUSABLE + r"std must be 3 finite numbers, each > 0"),
    (lambda meta: {**meta, "std": ["a", 1, 1]}, UNUSABLE + r"std must be 3 finite numbers"),
    (_fewer_attributes, r"its attributes output has shape \['batch', 26\], but its metadata's vocabulary names 2"),
]


@pytest.mark.parametrize("change, message", CRAFTED_METADATA, ids=range(len(CRAFTED_METADATA)))
def test_metadata_a_model_cannot_run_with_is_refused_naming_the_file(tiny_onnx, tmp_path, change, message):
    with pytest.raises(CheckpointError, match=r"crafted.onnx: " + message):
        load_onnx(_with_metadata(tiny_onnx, tmp_path, change))


def test_predict_and_eval_with_a_huge_image_size_are_one_line_and_exit_1(tiny_onnx, df_val_images, df_shards,
                                                                         tmp_path):
    """predict died of a numpy MemoryError, eval was killed by the kernel (22 GB)."""
    from click.testing import CliRunner

    from cli import EXIT_FAILED, main

    crafted = _with_metadata(tiny_onnx, tmp_path, lambda meta: {**meta, "image_size": 100000})
    for arguments in (["predict", "--model", str(crafted), "--images", str(df_val_images),
                       "--out", str(tmp_path / "p.jsonl")],
                      ["eval", "--model", str(crafted), "--shards", str(df_shards)]):
        result = CliRunner().invoke(main, arguments)
        assert result.exit_code == EXIT_FAILED, result.output
        assert result.output == (f"vsam {arguments[0]}: {crafted}: image_size 100000 is not usable "
                                 "(an integer in [32, 1024] and a multiple of 32)\n")
    assert not (tmp_path / "p.jsonl").exists()


def test_eval_refuses_an_export_whose_config_is_not_a_config(tiny_onnx, df_shards, tmp_path):
    """eval reads its batch size and losses from the export's config (a TypeError traceback before)."""
    from click.testing import CliRunner

    from cli import EXIT_FAILED, main

    crafted = _with_metadata(tiny_onnx, tmp_path, lambda meta: {**meta, "config": "x"})
    result = CliRunner().invoke(main, ["eval", "--model", str(crafted), "--shards", str(df_shards)])
    assert result.exit_code == EXIT_FAILED
    assert result.output == (f"vsam eval: {crafted}: its stored config is not usable "
                             "(a config is a mapping of sections, got str)\n")


def test_a_missing_onnx_package_is_one_line_naming_the_extra(tiny_checkpoint, tiny_onnx, df_val_images, tmp_path,
                                                            monkeypatch):
    """Importing onnxruntime (predict --model) or onnx (export --format onnx) fails as it does for a
    package that is not installed (None in sys.modules: Python's own import refusal): one line naming
    the package and the 'export' extra, exit 1, nothing written (predict blamed the file; export
    ended in a traceback)."""
    from click.testing import CliRunner

    from cli import EXIT_FAILED, main

    out = tmp_path / "out"
    out.mkdir()
    runs = {"onnxruntime": ["predict", "--model", str(tiny_onnx), "--images", str(df_val_images),
                            "--out", str(out / "p.jsonl")],
            "onnx": ["export", "--checkpoint", str(tiny_checkpoint), "--format", "onnx", "--out", str(out / "m.onnx")]}
    for module, arguments in runs.items():
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, module, None)
            result = CliRunner().invoke(main, arguments)
        lines = result.output.splitlines()
        assert result.exit_code == EXIT_FAILED and len(lines) == 1, result.output
        assert lines[0].startswith(f"vsam {arguments[0]}: ONNX files need {module}, from the 'export' extra: "
                                   "pip install 'vsam[export]' ("), lines[0]
        assert list(out.iterdir()) == []


def test_the_package_front_door_imports_torch_only_when_a_torch_name_is_asked_for():
    code = ("import sys, vsam_train\n"
            "from vsam_train import ModelInfo, load_model\n"
            "assert 'torch' not in sys.modules, 'torch imported by the ONNX names'\n"
            "from vsam_train import create_model, load_for_inference, preprocess\n"
            "assert 'torch' in sys.modules and callable(create_model) and callable(preprocess)\n"
            "assert load_for_inference.__module__ == 'vsam_train.checkpoint'\n"
            "try:\n    vsam_train.no_such_name\nexcept AttributeError as error:\n    print(error)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "module 'vsam_train' has no attribute 'no_such_name'"


def test_only_the_rows_whose_scores_are_not_finite_are_flagged():
    attributes = np.array([[0.0, 1.0], [np.nan, 1.0], [2.0, np.inf], [-1.0, -3.0]], np.float32)
    category = np.array([[0.0], [0.0], [0.0], [-np.inf]], np.float32)
    assert finite_rows(attributes, None).tolist() == [True, False, False, True]
    assert finite_rows(attributes, category).tolist() == [True, False, False, False]
    assert finite_rows(attributes[:, :0], category[:, 0]).tolist() == [True, True, True, False]
