"""`vsam predict` on real images with a tiny checkpoint trained on real DeepFashion-attr shards."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import average_precision_score

from awkward_names import make_awkward_name_folder
from bad_images import make_bad_image_folder
from cli import main as vsam
from fifo_reader import read_fifo_in_thread
from pose_prep.images import printable_name
from vsam_train.evaluate import predict_split

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]


def _predict(checkpoint, images, out, *extra):
    return CliRunner().invoke(vsam, ["predict", "--checkpoint", str(checkpoint), "--images", str(images),
                                     "--out", str(out), "--workers", "0", *extra])


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_ap_from_predict_scores_matches_vsam_eval(tiny_checkpoint, df_shards, df_val_images, tmp_path):
    """The val split's images, as stored in the shards, through `vsam predict`; labels from the
    shards; AP recomputed with scikit-learn equals what `vsam eval` reports."""
    result = _predict(tiny_checkpoint, df_val_images, tmp_path / "preds.jsonl", "--batch-size", "5")
    assert result.exit_code == 0, result.output
    evaluated = tmp_path / "eval.json"
    result = CliRunner().invoke(vsam, ["eval", "--checkpoint", str(tiny_checkpoint), "--shards", str(df_shards),
                                       "--json", str(evaluated), "--workers", "0"])
    assert result.exit_code == 0, result.output

    predictions = {record["path"]: record for record in _lines(tmp_path / "preds.jsonl")}
    reference, info = predict_split(tiny_checkpoint, df_shards, "val")
    assert sorted(predictions) == sorted(reference["paths"]) and len(predictions) == 24
    names = info.vocabulary.attributes
    scores = np.array([[predictions[path]["attributes"][name] for name in names] for path in reference["paths"]])
    labels = reference["attribute_labels"]
    ap = np.mean([average_precision_score(labels[:, a] == 1, scores[:, a])
                  for a in range(len(names)) if (labels[:, a] == 1).any()])
    assert ap == pytest.approx(json.loads(evaluated.read_text())["AP"], abs=1e-9)
    # Both decode the same JPEG bytes with libjpeg-turbo and share `preprocess`: same scores.
    np.testing.assert_allclose(scores, reference["attribute_scores"], atol=1e-6)


def test_each_line_names_the_image_and_scores_every_attribute(tiny_checkpoint, df_val_images, tmp_path):
    images = tmp_path / "catalog"
    shutil.copytree(df_val_images, images / "summer")
    result = _predict(tiny_checkpoint, images, tmp_path / "preds.jsonl", "--threshold", "0.45", "--batch-size", "7")
    assert result.exit_code == 0, result.output
    assert "24 images: 24 predicted, 0 failed" in result.output
    records = _lines(tmp_path / "preds.jsonl")
    assert [r["path"] for r in records] == sorted(r["path"] for r in records)
    from vsam_train.checkpoint import load_for_inference
    vocabulary = load_for_inference(tiny_checkpoint)[1].vocabulary
    for record in records:
        assert record["path"].startswith("summer/img/") and (images / record["path"]).is_file()
        assert record["category"] is None and record["category_prob"] is None   # no categories in this subset
        scores = record["attributes"]
        assert list(scores) == vocabulary.attributes and all(0 < s < 1 for s in scores.values())
        assert record["predicted"] == sorted((n for n in scores if scores[n] >= 0.45), key=lambda n: -scores[n])
        assert list(record["groups"]) == vocabulary.group_names
        for group, indices in vocabulary.group_indices().items():
            best = max((vocabulary.attributes[i] for i in indices), key=lambda n: scores[n])
            assert record["groups"][group] == best
    assert any(record["predicted"] for record in records)


def test_batch_size_and_worker_processes_do_not_change_the_scores(tiny_checkpoint, df_val_images, tmp_path):
    assert _predict(tiny_checkpoint, df_val_images, tmp_path / "one.jsonl", "--batch-size", "1").exit_code == 0
    result = _predict(tiny_checkpoint, df_val_images, tmp_path / "many.jsonl", "--batch-size", "16",
                      "--workers", "2")
    assert result.exit_code == 0, result.output
    one, many = _lines(tmp_path / "one.jsonl"), _lines(tmp_path / "many.jsonl")
    assert [r["path"] for r in one] == [r["path"] for r in many]
    for a, b in zip(one, many):
        np.testing.assert_allclose(list(a["attributes"].values()), list(b["attributes"].values()), atol=1e-6)


def test_bad_files_get_an_error_line_and_a_stderr_line_and_the_run_goes_on(tiny_checkpoint, tmp_path):
    images = tmp_path / "drop"
    expected = make_bad_image_folder(images)
    out = tmp_path / "preds.jsonl"
    result = _predict(tiny_checkpoint, images, out)
    assert result.exit_code == 0, result.output
    records = {r["path"]: r for r in _lines(out)}
    assert set(records) == set(expected)   # every image file found has exactly one line
    for name, outcome in expected.items():
        record = records[name]
        if outcome is None:
            assert "error" not in record and len(record["attributes"]) == 26, name
        else:
            assert outcome in record["error"] and set(record) == {"path", "error"}, name
            assert f"failed: {name}: {record['error']}" in result.output
    n_bad = sum(outcome is not None for outcome in expected.values())
    assert f"{len(expected)} images: {len(expected) - n_bad} predicted, {n_bad} failed" in result.output

    strict = _predict(tiny_checkpoint, images, tmp_path / "strict.jsonl", "--strict")
    assert strict.exit_code == 1 and "--strict" in strict.output
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "empty.jpg").write_bytes(b"")
    nothing = _predict(tiny_checkpoint, only_bad, tmp_path / "none.jsonl")
    assert nothing.exit_code == 1 and "no image under" in nothing.output
    assert _lines(tmp_path / "none.jsonl") == [{"path": "empty.jpg", "error": "empty file (0 bytes)"}]


def _with_nan_weights(checkpoint: Path, path: Path) -> Path:
    import torch

    state = torch.load(checkpoint, weights_only=True)
    state["model"] = {name: tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor
                      for name, tensor in state["model"].items()}
    torch.save(state, path)
    return path


def _strict_json(line: str):
    return json.loads(line, parse_constant=lambda constant: pytest.fail(f"{constant} is not JSON: {line}"))


def test_scores_that_are_not_finite_are_an_error_line_per_image_not_nan(tiny_checkpoint, df_val_images, tmp_path):
    """NaN weights: predict wrote "category_prob": NaN (not JSON) and exited 0."""
    from vsam_train.predict import NOT_FINITE

    broken = _with_nan_weights(tiny_checkpoint, tmp_path / "nan.pt")
    out = tmp_path / "preds.jsonl"
    result = _predict(broken, df_val_images, out)
    assert result.exit_code == 1 and "no image under" in result.output, result.output
    records = [_strict_json(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 24 and all(set(r) == {"path", "error"} and r["error"] == NOT_FINITE for r in records)
    assert "24 images: 0 predicted, 24 failed" in result.output
    assert f"failed: {records[0]['path']}: {NOT_FINITE}" in result.output


def test_predict_runs_without_a_pose_detector_and_writes_to_stdout(tiny_checkpoint, df_val_images):
    """A real process: no pose detector module (nor mediapipe) is ever imported; '-' is stdout."""
    script = ("import sys\n"
              "from cli import main\n"
              "try:\n"
              f"    main(['predict', '--checkpoint', {str(tiny_checkpoint)!r}, '--images', {str(df_val_images)!r},"
              " '--workers', '1', '--batch-size', '10'])\n"
              "except SystemExit as exit:\n"
              "    assert exit.code in (0, None), exit.code\n"
              "detectors = ('pose_prep.detectors', 'mediapipe', 'ultralytics')\n"
              "loaded = sorted(m for m in sys.modules if m.startswith(detectors))\n"
              "print('LOADED', loaded, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "LOADED []" in done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(records) == 24 and all("attributes" in r for r in records)


def test_awkward_file_names_are_predicted_and_names_that_are_not_utf8_rejected(tiny_checkpoint, tmp_path):
    """Real files: names with spaces, a leading dash, #, %, ?, HTML characters, a newline are predicted
    under their own name; names that are not valid UTF-8 get an error line naming them with \\xNN
    escapes (a newline in a failing name is \\n on stderr); the file (and stdout, in a real process) stays valid UTF-8 and no good photo is lost."""
    images = tmp_path / "drop"
    expected = make_awkward_name_folder(images)
    n_bad = sum(reason is not None for reason in expected.values())
    out = tmp_path / "preds.jsonl"
    result = _predict(tiny_checkpoint, images, out, "--batch-size", "4")
    assert result.exit_code == 0, result.output
    assert f"{len(expected)} images: {len(expected) - n_bad} predicted, {n_bad} failed" in result.output
    records = {r["path"]: r for r in map(json.loads, out.read_bytes().decode("utf-8").splitlines())}
    assert set(records) == set(expected)
    for name, reason in expected.items():
        if reason is None:
            assert (images / name).is_file() and len(records[name]["attributes"]) == 26, name
        else:
            assert records[name] == {"path": name, "error": reason}
            assert f"failed: {printable_name(name)}: {reason}\n" in result.output

    done = subprocess.run([sys.executable, "-c", "from cli import main; main()", "predict", "--checkpoint",
                           str(tiny_checkpoint), "--images", str(images), "--workers", "1", "--no-progress"],
                          cwd=REPO, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode("utf-8", "replace")
    streamed = [json.loads(line) for line in done.stdout.decode("utf-8").splitlines()]
    assert [r["path"] for r in streamed] == [r["path"] for r in _lines(out)]
    assert "failed: bad\\xff.jpg: file name is not valid UTF-8" in done.stderr.decode("utf-8")


def _scores(records: list[dict]) -> np.ndarray:
    return np.array([list(r["attributes"].values()) for r in records])


def test_an_onnx_export_gives_the_checkpoints_predictions(tiny_checkpoint, tiny_onnx, tiny_category_checkpoint,
                                                         df_val_images, tmp_path):
    """`--model FILE.onnx` (onnxruntime, numpy preprocessing) against `--checkpoint` (torch) on real
    photos: the same lines, scores within 1e-4 (the issue's bar; measured ~1e-7)."""
    from vsam_train.export import export_checkpoint

    with_categories = export_checkpoint(tiny_category_checkpoint, "onnx", tmp_path / "category.onnx").path
    for checkpoint, exported in ((tiny_checkpoint, tiny_onnx), (tiny_category_checkpoint, with_categories)):
        assert _predict(checkpoint, df_val_images, tmp_path / "torch.jsonl").exit_code == 0
        result = CliRunner().invoke(vsam, ["predict", "--model", str(exported), "--images", str(df_val_images),
                                           "--out", str(tmp_path / "onnx.jsonl"), "--workers", "2"])
        assert result.exit_code == 0, result.output
        torch_lines, onnx_lines = _lines(tmp_path / "torch.jsonl"), _lines(tmp_path / "onnx.jsonl")
        assert [r["path"] for r in onnx_lines] == [r["path"] for r in torch_lines] and len(onnx_lines) == 24
        assert np.abs(_scores(onnx_lines) - _scores(torch_lines)).max() < 1e-4
        for ours, theirs in zip(onnx_lines, torch_lines):
            assert ours["predicted"] == theirs["predicted"] and ours.get("groups") == theirs.get("groups")
            assert ours["category"] == theirs["category"]
            assert ours["category_prob"] == pytest.approx(theirs["category_prob"], abs=1e-4, nan_ok=True) \
                if theirs["category_prob"] is not None else ours["category_prob"] is None
    assert any(line["category"] for line in onnx_lines), "the category model's export names categories"


def test_predict_with_an_onnx_model_never_imports_torch(tiny_onnx, df_val_images):
    """A real process: importing torch alone takes ~720 MB of RSS here; the ONNX path does without."""
    script = ("import sys\n"
              "from cli import main\n"
              "try:\n"
              f"    main(['predict', '--model', {str(tiny_onnx)!r}, '--images', {str(df_val_images)!r}])\n"
              "except SystemExit as exit:\n"
              "    assert exit.code in (0, None), exit.code\n"
              "print('TORCH', 'torch' in sys.modules, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "TORCH False" in done.stderr
    assert len([json.loads(line) for line in done.stdout.splitlines()]) == 24


def test_checkpoint_and_model_are_one_or_the_other(tiny_checkpoint, tiny_onnx, df_val_images, tmp_path):
    images = ["--images", str(df_val_images), "--out", str(tmp_path / "p.jsonl")]
    for options in ([], ["--checkpoint", str(tiny_checkpoint), "--model", str(tiny_onnx)]):
        result = CliRunner().invoke(vsam, ["predict", *options, *images])
        assert result.exit_code == 2 and "either --checkpoint FILE or --model FILE.onnx" in result.output
    result = CliRunner().invoke(vsam, ["predict", "--model", str(tiny_checkpoint), *images])
    assert result.exit_code == 2 and "not an .onnx file" in result.output
    result = CliRunner().invoke(vsam, ["predict", "--model", str(tiny_onnx), "--device", "cuda", *images])
    assert result.exit_code == 2 and "runs on the CPU" in result.output
    result = CliRunner().invoke(vsam, ["predict", "--checkpoint", str(tiny_onnx), *images])
    assert result.exit_code == 2 and "tiny.onnx: an ONNX export goes with --model" in result.output


def test_predict_writes_into_a_fifo_as_a_stream_and_through_a_symlink_into_its_target(tiny_onnx, df_val_images,
                                                                                      tmp_path):
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    reader, received = read_fifo_in_thread(fifo)
    model = ["predict", "--model", str(tiny_onnx), "--images", str(df_val_images), "--workers", "0"]
    result = CliRunner().invoke(vsam, [*model, "--out", str(fifo)])
    reader.join(timeout=60)
    assert result.exit_code == 0, result.output
    assert len([json.loads(line) for line in received[0].decode().splitlines()]) == 24
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)

    (tmp_path / "kept").mkdir()
    target = tmp_path / "kept" / "preds.jsonl"
    target.write_text("old\n")
    link = tmp_path / "latest.jsonl"
    link.symlink_to(target)
    result = CliRunner().invoke(vsam, [*model, "--out", str(link)])
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and link.resolve() == target and len(_lines(target)) == 24
