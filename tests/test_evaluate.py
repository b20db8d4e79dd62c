"""`vsam eval` on a tiny checkpoint trained on real DeepFashion-attr shards."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import average_precision_score, precision_recall_fscore_support

from cli import main as vsam
from pose_prep.shard_format import Vocabulary, collection_vocabulary
from vsam_train.evaluate import EvalError, check_vocabulary, predict_split, without_nan

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GROUPS = ["texture", "sleeve", "length", "neckline", "fabric", "fit"]


def _strict_json(text: str) -> dict:
    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def test_eval_prints_the_table_and_writes_every_metric_as_strict_json(tiny_checkpoint, df_shards, tmp_path):
    out = tmp_path / "metrics" / "val.json"
    result = CliRunner().invoke(vsam, ["eval", "--checkpoint", str(tiny_checkpoint), "--shards", str(df_shards),
                                       "--json", str(out), "--workers", "0", "--per-attribute"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("vsam epoch 2 on") and "items: 24   attributes: 26" in lines
    for row in ("P@k", "R@k", "F1@k", "top-3 recall (Liu & Lu)", "top-5 recall (Liu & Lu)",
                "top-3 recall, known only", "top-1 accuracy", "floral", "conventional"):
        assert any(line.startswith(row) for line in lines), row
    assert "unknown = negative" in result.output
    assert all(group in result.output for group in GROUPS)

    metrics = _strict_json(out.read_text())
    assert metrics["n_items"] == 24 and metrics["split"] == "val" and metrics["model"] == "vsam"
    for key in ("P@k", "R@k", "F1@k", "P@k_weighted", "AP", "loss", "attention_mse"):
        assert isinstance(metrics[key], float) and 0 <= metrics[key], key
    for k in (3, 5):
        assert list(metrics[f"top{k}_recall"]) == list(metrics[f"top{k}_recall_known_only"]) == GROUPS + ["all"]
        assert "Liu & Lu" in metrics["protocols"][f"top{k}_recall"]
    # every figure of the file names its protocol (what evaluate adds: run facts and losses)
    assert {"P@k", "AP", "top3_recall", "group_top1", "per_attribute"} <= set(metrics["protocols"])
    assert metrics["top3_recall"]["all"] <= metrics["top5_recall"]["all"]
    assert list(metrics["group_top1"]) == GROUPS + ["mean"]
    # Attributes without a positive among the 24 items have no AP: null in the file, not NaN.
    without_positive = [a for a in metrics["per_attribute"] if a["support"] == 0]
    assert without_positive and all(a["AP"] is None for a in without_positive)
    assert metrics["AP_excluded"] == len(without_positive)


def test_eval_ap_is_the_mean_of_scikit_learn_ap_over_the_scored_items(tiny_checkpoint, df_shards, tmp_path):
    out = tmp_path / "val.json"
    result = CliRunner().invoke(vsam, ["eval", "--checkpoint", str(tiny_checkpoint), "--shards", str(df_shards),
                                       "--json", str(out), "--workers", "0", "--batch-size", "5"])
    assert result.exit_code == 0, result.output
    scored, _ = predict_split(tiny_checkpoint, df_shards, "val", batch_size=7)
    labels = scored["attribute_labels"]
    assert len(scored["paths"]) == 24 == len(set(scored["paths"]))
    expected = np.mean([average_precision_score(labels[:, a] == 1, scored["attribute_scores"][:, a])
                        for a in range(labels.shape[1]) if (labels[:, a] == 1).any()])
    assert json.loads(out.read_text())["AP"] == pytest.approx(expected, abs=1e-9)


def test_eval_reports_category_precision_recall_f1_as_scikit_learn_computes_them(
        tiny_category_checkpoint, category_shards, tmp_path):
    out = tmp_path / "val.json"
    result = CliRunner().invoke(vsam, ["eval", "--checkpoint", str(tiny_category_checkpoint), "--shards",
                                       str(category_shards), "--json", str(out), "--workers", "0",
                                       "--per-attribute"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for row in ("category precision", "category recall", "category F1", "Jacket", "Dress"):
        assert any(line.startswith(row) for line in lines), row
    assert "category (16 labelled items):  top-1 accuracy" in result.output

    metrics = _strict_json(out.read_text())
    scored, _ = predict_split(tiny_category_checkpoint, category_shards, "val")
    y_true = scored["category_labels"].tolist()
    logits = scored["category_logits"]
    y_pred = [max(range(logits.shape[1]), key=lambda c: (logits[i, c], -c)) for i in range(len(y_true))]
    for average in ("macro", "weighted"):
        expected = precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)[:3]
        assert [metrics[f"category_{name}_{average}"] for name in ("precision", "recall", "f1")] == \
            pytest.approx(list(expected), abs=1e-9), average
    assert [row["name"] for row in metrics["per_category"]] == ["Jacket", "Dress"]
    assert [row["support"] for row in metrics["per_category"]] == [8, 8]
    assert metrics["category_top1"] == pytest.approx(np.mean(np.array(y_pred) == np.array(y_true)))
    assert "zero_division=0" in metrics["protocols"]["category_f1_macro"]


def test_an_empty_split_an_unreadable_checkpoint_and_other_labels_are_named(tiny_checkpoint, df_shards, tmp_path):
    result = CliRunner().invoke(vsam, ["eval", "--checkpoint", str(tiny_checkpoint), "--shards", str(df_shards),
                                       "--split", "test", "--workers", "0"])
    assert result.exit_code == 1 and "split 'test' holds no items" in result.output

    broken = tmp_path / "broken.pt"
    broken.write_bytes(tiny_checkpoint.read_bytes()[:1000])
    result = CliRunner().invoke(vsam, ["eval", "--checkpoint", str(broken), "--shards", str(df_shards)])
    assert result.exit_code == 1 and f"{broken}: not a readable vsam checkpoint" in result.output

    trained = collection_vocabulary(df_shards)
    renamed = Vocabulary(**{**trained.__dict__, "attributes": ["paisley"] + trained.attributes[1:]})
    with pytest.raises(EvalError, match="first difference: #0 'floral' vs 'paisley'"):
        check_vocabulary(trained, renamed, "ckpt.pt", "shards/")
    check_vocabulary(trained, collection_vocabulary(df_shards), "ckpt.pt", "shards/")


@pytest.mark.parametrize("command", ["eval", "audit"])
def test_scores_that_are_not_finite_are_one_line_naming_the_checkpoint(tiny_checkpoint, df_shards, tmp_path, command):
    """NaN weights: eval said "scores contain NaN or infinite values" without naming the checkpoint,
    audit printed scikit-learn's multi-line message."""
    import torch

    state = torch.load(tiny_checkpoint, weights_only=True)
    state["model"] = {name: tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor
                      for name, tensor in state["model"].items()}
    broken = tmp_path / "nan.pt"
    torch.save(state, broken)
    extra = ["--out", str(tmp_path / "audit"), "--workers", "0"] if command == "audit" else []
    result = CliRunner().invoke(vsam, [command, "--checkpoint", str(broken), "--shards", str(df_shards),
                                       "--split", "val", *extra])
    assert result.exit_code == 1
    assert result.output == (f"vsam {command}: {broken}: the model's scores are not finite (NaN or infinite) for 24 "
                             "of the 24 items of split 'val': its weights may be damaged\n")


def test_a_missing_shard_is_named_as_missing_not_as_a_concurrent_change(tiny_checkpoint, df_shards, tmp_path):
    import shutil

    from pose_prep.shard_format import live_rows

    shards = tmp_path / "shards"
    shutil.copytree(df_shards, shards)
    missing = next(iter(live_rows(shards, ("val",))))
    missing.unlink()
    result = CliRunner().invoke(vsam, ["eval", "--checkpoint", str(tiny_checkpoint), "--shards", str(shards)])
    assert result.exit_code == 1
    assert f"{missing}: listed in the index but missing (vsam shards verify {shards}" in result.output, result.output
    assert "changed under this reader" not in result.output


def test_nan_becomes_null_at_any_depth():
    assert without_nan({"a": float("nan"), "b": [1.0, float("nan")], "c": {"d": float("nan")}}) == \
        {"a": None, "b": [1.0, None], "c": {"d": None}}


def test_eval_runs_an_onnx_export_and_reports_the_checkpoints_metrics(tiny_checkpoint, tiny_onnx, df_shards,
                                                                      tmp_path):
    import onnx

    figures = {}
    for option, model in (("--checkpoint", tiny_checkpoint), ("--model", tiny_onnx)):
        out = tmp_path / f"{option[2:]}.json"
        result = CliRunner().invoke(vsam, ["eval", option, str(model), "--shards", str(df_shards),
                                           "--json", str(out), "--workers", "0"])
        assert result.exit_code == 0, result.output
        figures[option] = _strict_json(out.read_text())
    torch_run, onnx_run = figures["--checkpoint"], figures["--model"]
    assert onnx_run["checkpoint"] == str(tiny_onnx) and onnx_run["n_items"] == torch_run["n_items"] == 24
    for key in ("AP", "P@k", "R@k", "F1@k", "loss", "attribute_loss", "heatmap_loss", "attention_mse"):
        assert onnx_run[key] == pytest.approx(torch_run[key], abs=1e-5), key
    assert onnx_run["group_top1"] == pytest.approx(torch_run["group_top1"], abs=1e-9)

    # A file exported before the training config travelled in the metadata: predict only, eval says so.
    proto = onnx.load(str(tiny_onnx))
    entry = next(e for e in proto.metadata_props if e.key == "vsam")
    entry.value = json.dumps({k: v for k, v in json.loads(entry.value).items() if k != "config"})
    onnx.save(proto, str(tmp_path / "older.onnx"))
    result = CliRunner().invoke(vsam, ["eval", "--model", str(tmp_path / "older.onnx"), "--shards", str(df_shards)])
    assert result.exit_code == 1 and "older.onnx: exported without its training config" in result.output
