"""`vsam export`: the exported file gives the checkpoint's outputs on real images."""
from __future__ import annotations

import os
import stat
import warnings

import numpy as np
import onnxruntime
import pytest
import torch
from click.testing import CliRunner

from cli import main as vsam
from fifo_reader import read_fifo_in_thread
from pose_prep.images import find_images, load
from vsam_train.checkpoint import load_for_inference
from vsam_train.data import preprocess
from vsam_train.export import ATOL, RTOL, ExportError, check_same_outputs, read_metadata

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _real_batch(df_val_images, image_size: int, n: int = 9) -> torch.Tensor:
    """Real photos, a batch size other than the export's probe batch (the batch axis is dynamic)."""
    return torch.stack([preprocess(load(path)[1].rgb, image_size) for path in find_images(df_val_images)[:n]])


def _run_exported(path, fmt: str, images: torch.Tensor) -> list[np.ndarray]:
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["images"]
        return session.run(None, {"images": images.numpy()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path))
    with torch.no_grad():
        return [t.numpy() for t in loaded(images)]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("which", ["vsam", "vgg16"])
def test_exported_model_gives_the_checkpoints_outputs_on_real_images(fmt, which, tiny_checkpoint,
                                                                      tiny_baseline_checkpoint, df_val_images,
                                                                      tmp_path):
    checkpoint = tiny_checkpoint if which == "vsam" else tiny_baseline_checkpoint
    out = tmp_path / f"model.{fmt}"
    result = CliRunner().invoke(vsam, ["export", "--checkpoint", str(checkpoint), "--format", fmt, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"{out}: outputs " in result.output and not list(tmp_path.glob(".*.tmp"))

    model, info = load_for_inference(checkpoint)
    meta = read_metadata(out)
    expected_outputs = ["attributes", "attention"] if which == "vsam" else ["attributes"]
    assert meta["outputs"] == expected_outputs and meta["model_name"] == which
    assert meta["vocabulary"]["attributes"] == info.vocabulary.attributes and meta["image_size"] == 64
    # What predict/eval --model need besides: the training config, heatmap parameters, the preprocessing.
    assert meta["config"] == info.config and meta["heatmap"] == info.heatmap and meta["step"] == info.step
    assert "antialias" in meta["preprocess"]["resize"] and meta["mean"] == pytest.approx([0.485, 0.456, 0.406])

    images = _real_batch(df_val_images, info.image_size)
    exported = _run_exported(out, fmt, images)
    with torch.no_grad():
        reference = model(images)
    assert len(exported) == len(expected_outputs)
    for name, got in zip(expected_outputs, exported):
        want = reference[name].numpy()
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL, err_msg=name)
    # The scores people read (sigmoid) agree far better than they are ever displayed.
    scores = 1 / (1 + np.exp(-exported[0]))
    assert np.abs(scores - torch.sigmoid(reference["attributes"]).numpy()).max() < 1e-5


def test_default_output_sits_beside_the_checkpoint(tiny_checkpoint, tmp_path):
    copy = tmp_path / "last.pt"
    copy.write_bytes(tiny_checkpoint.read_bytes())
    result = CliRunner().invoke(vsam, ["export", "--checkpoint", str(copy), "--format", "torchscript"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "last.torchscript.pt").is_file()


def test_a_mismatch_beyond_the_tolerance_is_refused_and_a_broken_checkpoint_named(tmp_path):
    want = [np.array([[1.0, -2.0]], np.float64)]
    assert check_same_outputs([want[0] + 5e-5], want, ["attributes"]) == pytest.approx(5e-5, rel=1e-3)
    with pytest.raises(ExportError, match="'attributes' differs from the model's by up to 0.01"):
        check_same_outputs([want[0] + 1e-2], want, ["attributes"])
    with pytest.raises(ExportError, match="shape"):
        check_same_outputs([want[0][:, :1]], want, ["attributes"])

    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"PK\x03\x04 not a checkpoint")
    result = CliRunner().invoke(vsam, ["export", "--checkpoint", str(broken), "--format", "onnx"])
    assert result.exit_code == 1 and f"{broken}: not a readable vsam checkpoint" in result.output
    assert not (tmp_path / "broken.onnx").exists()


def test_an_export_into_a_fifo_is_checked_first_then_streamed_and_the_fifo_stays(tiny_checkpoint, tmp_path):
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    reader, received = read_fifo_in_thread(fifo)
    result = CliRunner().invoke(vsam, ["export", "--checkpoint", str(tiny_checkpoint), "--format", "onnx",
                                       "--out", str(fifo)])
    reader.join(timeout=60)
    assert result.exit_code == 0, result.output
    session = onnxruntime.InferenceSession(received[0], providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["attributes", "attention"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_an_export_that_would_replace_its_checkpoint_or_names_the_other_format_is_refused(tiny_checkpoint, tmp_path):
    checkpoint = tmp_path / "ck.onnx"          # a checkpoint under an unlucky name: the default output's
    checkpoint.write_bytes(tiny_checkpoint.read_bytes())
    (tmp_path / "self.pt").hardlink_to(checkpoint)
    (tmp_path / "link.pt").symlink_to(checkpoint)
    original = checkpoint.read_bytes()
    refusals = [("onnx", None, "is the checkpoint"), ("torchscript", "self.pt", "is the checkpoint"),
                ("torchscript", "link.pt", "is the checkpoint"), ("onnx", "model.bin", "must end in .onnx"),
                ("torchscript", "model.ONNX", "must not end in .onnx")]
    for fmt, out, reason in refusals:
        options = ["--out", str(tmp_path / out)] if out else []
        result = CliRunner().invoke(vsam, ["export", "--checkpoint", str(checkpoint), "--format", fmt, *options])
        assert result.exit_code == 2, (fmt, out, result.output)
        assert reason in result.output and str(checkpoint) in result.output and len(result.output.splitlines()) == 1
    assert checkpoint.read_bytes() == original and (tmp_path / "link.pt").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.onnx", "link.pt", "self.pt"]


def test_a_checkpoint_whose_model_gives_nan_is_not_exported(tiny_checkpoint, tmp_path):
    state = torch.load(tiny_checkpoint, weights_only=True)
    first_weight = next(key for key, value in state["model"].items() if value.is_floating_point())
    state["model"][first_weight] = torch.full_like(state["model"][first_weight], float("nan"))
    broken = tmp_path / "nan.pt"
    torch.save(state, broken)
    result = CliRunner().invoke(vsam, ["export", "--checkpoint", str(broken), "--format", "torchscript"])
    assert result.exit_code == 1
    assert result.output.startswith(f"vsam export: {broken}: the model's output") and "not finite" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.pt"]
    want = [np.array([[1.0, -2.0]])]
    with pytest.raises(ExportError, match="differs"):                  # NaN from the exported file, too
        check_same_outputs([np.array([[np.nan, -2.0]])], want, ["attributes"])
