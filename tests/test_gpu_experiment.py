"""benchmarks/gpu_experiment.py: the --tiny CPU run end to end through its shell wrapper on real
shards (the JSON's structure and that its figures are sane), and its budget guards."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_experiment as ge  # noqa: E402

UNIT_METRICS = ("P@k", "R@k", "F1@k", "AP", "P@k_weighted", "R@k_weighted", "F1@k_weighted")


@pytest.fixture(scope="module")
def tiny_run(df_shards, tmp_path_factory):
    """One --tiny run through the wrapper, as on a machine without the package installed."""
    out = tmp_path_factory.mktemp("gpu-experiment")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PYTHON"] = sys.executable
    started = time.monotonic()
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_experiment.sh"), "--shards", str(df_shards),
                           "--out", str(out), "--tiny"], capture_output=True, text=True, env=env, cwd="/",
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((out / ge.JSON_NAME).read_text())
    return {"data": data, "stdout": done.stdout, "out": out, "seconds": time.monotonic() - started}


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _unit(value) -> bool:
    return isinstance(value, (int, float)) and 0 <= value <= 1


def test_tiny_run_writes_a_complete_json_and_prints_the_table_last(tiny_run):
    data, stdout = tiny_run["data"], tiny_run["stdout"]
    assert data["schema"] == ge.SCHEMA and data["complete"] is True
    assert data["environment"]["device"] == "cpu" and data["environment"]["torch"]
    assert data["settings"]["tiny"] is True and data["settings"]["models"] == ["vsam", "vgg16"]
    assert data["data"]["splits"]["train"] == 96 and data["data"]["splits"]["val"] == 24
    assert data["data"]["train_items"] == 96 and data["data"]["val_items"] == 24
    assert "errors" not in data, data.get("errors")
    assert data["forbidden_modules_loaded"] == []   # no detector, mediapipe, captum or onnx on this path
    assert set(data["timings"]) == {"data", "loader", "throughput_eager", "training", "throughput_compiled"}
    assert all(_finite_positive(seconds) for seconds in data["timings"].values())
    assert data["elapsed_seconds"] < data["settings"]["budget_seconds"]
    for skipped in data["skipped"]:
        assert skipped["item"] and skipped["reason"]
    summary = (tiny_run["out"] / "summary.txt").read_text()
    assert stdout.rstrip().endswith(summary.rstrip())   # the table is the last thing printed
    assert "group top-1 mean" in summary and "Ŝ vs S pearson" in summary and "majority" in summary


def test_tiny_run_measures_every_loader_and_throughput_figure(tiny_run):
    data = tiny_run["data"]
    for name in ("cpu_workers", "device_decode", "resident"):
        assert _finite_positive(data["loader"][name]["images_per_s"]), name
        assert data["loader"][name]["images"] > 0
    assert data["loader"]["resident"]["decode_once_seconds"] > 0
    rows = {(r["model"], r["batch_size"], r["mode"]): r for r in data["throughput"]}
    for model in ("vsam", "vgg16"):
        for batch_size in (16, 32):
            row = rows[(model, batch_size, "eager")]
            assert _finite_positive(row["images_per_s"]) and _finite_positive(row["step_ms"])
            assert row["step_ms"] == pytest.approx(1000 * batch_size / row["images_per_s"])
        assert _finite_positive(rows[(model, 16, "compiled")]["images_per_s"])   # tiny: dynamo, eager backend
    assert data["compile_child"]["ended"] == "exit code 0" and data["compile_child"]["backend"] == "eager"
    ratios = data["ratios"]
    assert ratios["vs_vgg16"]["vsam/vgg16 bs16 eager"] == pytest.approx(
        rows[("vsam", 16, "eager")]["images_per_s"] / rows[("vgg16", 16, "eager")]["images_per_s"])
    assert _finite_positive(ratios["compiled_over_eager"]["vsam bs16"])
    assert _finite_positive(ratios["loader_over_training"]["resident/vsam bs32 eager"])


def test_tiny_run_trains_both_models_and_reports_sane_validation_metrics(tiny_run):
    training = tiny_run["data"]["training"]
    plan = training["plan"]
    assert plan["train_items"] == 96 and plan["val_items"] == 24 and plan["steps_per_epoch"] == 3
    baseline = training["majority_baseline"]
    assert _unit(baseline["group_top1"]["mean"]) and set(baseline["majority_attribute"]) == set(
        g for g in baseline["group_top1"] if g != "mean")
    runs = training["runs"]
    expected = 4 if training["batch_norm_retrain"]["triggered"] else 2
    assert len(runs) == expected
    assert [(r["model"], r["batch_norm"]) for r in runs][:2] == [("vsam", False), ("vgg16", False)]
    if training["batch_norm_retrain"]["triggered"]:
        assert training["final"] == "batch_norm" and [r["batch_norm"] for r in runs[2:]] == [True, True]
        assert training["batch_norm_retrain"]["stuck"]
    for run in runs:
        assert run["epochs_done"] == plan["epochs"] == 2 and run["steps"] == 6
        assert all(math.isfinite(e["train_loss"]) for e in run["epochs"])
        metrics = run["metrics"]
        assert metrics["n_items"] == 24
        for key in UNIT_METRICS:
            assert _unit(metrics[key]), key
        for k in (3, 5):
            assert all(value is None or _unit(value) for value in metrics[f"top{k}_recall"].values())
        assert all(value is None or _unit(value) for value in metrics["group_top1"].values())
        assert all(_unit(value) for value in run["majority_agreement"].values())
        assert isinstance(run["stays_at_majority"], bool) and run["majority_check"]
    for run in runs:
        if run["model"] == "vsam":
            attention = run["attention"]
            assert attention["n_items"] > 0 and _unit(attention["mse"])
            assert -1 <= attention["pearson_mean"] <= 1
            assert attention["mse"] == pytest.approx(run["evaluate_attention"]["attention_mse"], rel=1e-6)
        else:
            assert "attention" not in run
    assert -1 <= training["mean_heatmap_attention"]["pearson_mean"] <= 1


def test_bad_shards_folder_is_an_input_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ge.main(["--shards", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--tiny"])
    assert exit_info.value.code == ge.EXIT_BAD_INPUT
    with pytest.raises(SystemExit) as exit_info:
        ge.main(["--shards", str(tmp_path), "--out", str(tmp_path / "out"), "--tiny", "--compare", "vsam,alexnet"])
    assert exit_info.value.code == ge.EXIT_BAD_INPUT
    with pytest.raises(SystemExit) as exit_info:
        ge.main(["--shards", str(tmp_path), "--out", str(tmp_path / "out"), "--tiny", "--set", "train.epochs"])
    assert exit_info.value.code == ge.EXIT_BAD_INPUT
    assert "--set: 'train.epochs' is not KEY=VALUE" in capsys.readouterr().err


def test_a_rendered_attention_target_is_refused_not_silently_ignored(tmp_path, capsys):
    """The in-memory splits carry the stored heatmaps: data.heatmap_sigma or heatmap_joints would not reach
    the models, so the run would report the defaults under another name."""
    for setting in ("data.heatmap_sigma=3.0", "data.heatmap_joints=body"):
        with pytest.raises(SystemExit) as exit_info:
            ge.main(["--shards", str(tmp_path), "--out", str(tmp_path / "out"), "--tiny", "--set", setting])
        assert exit_info.value.code == ge.EXIT_BAD_INPUT
        assert f"data.{setting.split('=')[0][5:]}: the GPU experiment trains on the stored heatmaps" in \
            capsys.readouterr().err


def test_compile_child_is_killed_when_the_budget_runs_out(df_shards, tmp_path):
    """A child that cannot finish in time (here 0.5 s: not even `import torch`) is killed with its
    process group; every measurement it owed is recorded as skipped, with the reason."""
    args = ge.parse_args(["--shards", str(df_shards), "--out", str(tmp_path), "--tiny"])
    args.min_compile_seconds = 0.1
    config = ge.base_config(args)
    report = ge.Report(tmp_path, {})

    class AlmostSpent(ge.Budget):
        def left(self) -> float:
            return 0.5

    started = time.monotonic()
    rows = ge.compile_phase(args, config, ["vsam", "vgg16"], ge.torch.device("cpu"), report, AlmostSpent(1, 0))
    assert time.monotonic() - started < 10
    assert rows == []
    assert report.data["compile_child"]["ended"].startswith("killed after")
    assert [s["item"] for s in report.data["skipped"]] == ["throughput/vsam/bs16/compiled",
                                                            "throughput/vgg16/bs16/compiled"]
    assert all("did not get to it" in s["reason"] for s in report.data["skipped"])


def test_too_little_budget_skips_compiling_with_the_reason(tmp_path, df_shards):
    args = ge.parse_args(["--shards", str(df_shards), "--out", str(tmp_path), "--tiny"])
    report = ge.Report(tmp_path, {})
    rows = ge.compile_phase(args, ge.base_config(args), ["vsam"], ge.torch.device("cpu"), report, ge.Budget(0, 0))
    assert rows == [] and "compile_child" not in report.data
    assert report.data["skipped"][0]["item"] == "throughput/vsam/bs16/compiled"
    assert "of the budget left" in report.data["skipped"][0]["reason"]


def test_plan_epochs_keeps_room_for_a_batch_norm_retrain():
    epochs, why = ge.plan_epochs(16, 5.0, left=300, reserve=90, retrain_factor=1.3)
    assert epochs == 16 and "fit" in why                       # 16 · 5 · 2.3 = 184 ≤ 210
    epochs, why = ge.plan_epochs(16, 10.0, left=300, reserve=90, retrain_factor=1.3)
    assert epochs == 9 and "9 fit the budget" in why           # 210 // 23
    assert ge.plan_epochs(16, 100.0, left=50, reserve=90, retrain_factor=1.3)[0] == 1
    assert ge.plan_epochs(7, None, left=10, reserve=0, retrain_factor=1.3)[0] == 7


def test_stays_at_majority_compares_group_top1_and_categories():
    baseline = {"group_top1": {"mean": 0.60}, "category_top1": 0.30}
    assert ge.stays_at_majority({"group_top1": {"mean": 0.605}, "category_top1": 0.31}, baseline, 0.01)[0]
    assert not ge.stays_at_majority({"group_top1": {"mean": 0.70}, "category_top1": 0.31}, baseline, 0.01)[0]
    stuck, why = ge.stays_at_majority({"group_top1": {"mean": 0.55}}, {"group_top1": {"mean": 0.60}}, 0.01)
    assert stuck and "0.5500 vs majority 0.6000" in why
    assert ge.stays_at_majority({"P@k": 0.3}, {"P@k": 0.2}, 0.01) == (
        False, "no exclusive attribute groups or categories: nothing to compare with a majority baseline")


def test_compare_trains_every_model_for_every_seed_and_reports_each_group_map(df_shards, tmp_path):
    """Issue 7's comparison at tiny scale: vgg16, vsam and vsam-groups on identical data and seeds;
    the groups model gets one heatmap per attribute group and its maps are scored against them."""
    data = ge.main(["--shards", str(df_shards), "--out", str(tmp_path), "--tiny", "--no-compile",
                    "--compare", "vgg16,vsam,vsam-groups", "--seeds", "2", "--batch-sizes", "16",
                    "--loader-batches", "1", "--steps", "1", "--epochs", "1"])
    assert "errors" not in data, data.get("errors")
    training = data["training"]
    final_bn = training["final"] == "batch_norm"
    runs = [r for r in training["runs"] if r["batch_norm"] == final_bn]
    assert sorted((r["model"], r["seed"]) for r in runs) == sorted(
        (m, s) for m in ("vgg16", "vsam", "vsam-groups") for s in (0, 1))
    groups = ["texture", "sleeve", "length", "neckline", "fabric", "fit"]
    for run in runs:
        maps = run["evaluate_attention"].get("group_attention_correlation")
        if run["model"] == "vsam-groups":
            assert list(maps) == groups and all(-1 <= v <= 1 for v in maps.values())
        else:
            assert not maps
    summary = (tmp_path / "summary.txt").read_text()
    assert "vsam-groups" in summary and "map sleeve vs its heatmap" in summary
    assert "±" in summary   # mean ± std over the two seeds


def test_a_bare_cuda_device_gets_the_index_that_torch_cuda_set_device_needs(monkeypatch):
    """`--device cuda` (or none on a GPU machine) must reach setup_device, and the compile child's
    spec, as cuda:N: torch.cuda.set_device(torch.device("cuda")) raises ValueError. No GPU here, so
    torch is told there is one; the index check below is torch's own, which needs no device."""
    from torch.cuda._utils import _get_device_index

    monkeypatch.setattr(ge.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ge.torch.cuda, "current_device", lambda: 0)
    with pytest.raises(ValueError):
        _get_device_index(ge.torch.device("cuda"))
    for option in ([], ["--device", "cuda"]):
        device = ge.choose_device(ge.parse_args(["--shards", "s", "--out", "o", *option]))
        assert device == ge.torch.device("cuda", 0) and _get_device_index(device) == 0
    assert ge.choose_device(ge.parse_args(["--shards", "s", "--out", "o", "--device", "cuda:1"])).index == 1
