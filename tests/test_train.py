import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

import fixture_set
from cli import main as vsam
from pose_prep import lock
from pose_prep.images import load
from pose_prep.shard_format import live_items
from vsam_train.checkpoint import CheckpointError, load_checkpoint, load_for_inference
from vsam_train.config import ConfigError, load_config, save_config
from vsam_train.data import preprocess
from vsam_train.models import create_model
from vsam_train.train import RunFolderError, build_optimizer, main, resolve_run_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
BIN = Path(sys.executable).parent


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_tiny_training_on_real_shards_lowers_the_loss_and_leaves_a_complete_run_folder(df_shards, tmp_path):
    config = load_config(TINY, {"train.epochs": 3, "train.batch_size": 16, "train.log_every": 2,
                                "data.num_workers": 0, "data.max_val_batches": None})
    run = tmp_path / "run"
    summary = main(config, df_shards, run, device="cpu")

    metrics = _lines(run / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2, 3] and summary["epochs"] == metrics
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    for m in metrics:
        assert m["train_images"] == 96 and m["val_items"] == 24 and np.isfinite(m["val_loss"])
        assert 0 <= m["val_top3_recall"] <= m["val_top5_recall"] <= 1 and m["train_heatmap_loss"] > 0
    assert [s["step"] for s in _lines(run / "steps.jsonl")] == list(range(2, 19, 2))
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert yaml.safe_load((run / "config.yaml").read_text()) == config

    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (state["epoch"], state["step"], state["model_name"]) == (3, 18, "vsam")
    assert state["scheduler"]["last_epoch"] == 18 and len(state["optimizer"]["state"]) > 0
    model, info = load_for_inference(run / "checkpoints" / "last.pt")
    assert not model.training and info.image_size == 64 and len(info.vocabulary.attributes) == 26
    assert info.vocabulary.group_names[1] == "sleeve" and info.config == config
    # The last epoch's val figures travel with the weights: metrics.jsonl's, every number of them.
    last_val = {key: value for key, value in metrics[-1].items() if key.startswith("val_") and value is not None}
    assert info.val_metrics == pytest.approx(last_val) and "val_AP" in info.val_metrics
    _, image = load(fixture_set.PHOTOS / fixture_set.split_names("val")[0])
    with torch.no_grad():
        out = model(preprocess(image.rgb, info.image_size)[None])
    assert out["attributes"].shape == (1, 26) and out["attention"].shape == (1, 1, 16, 16)

    with pytest.raises(RunFolderError, match="pass --resume"):
        main(config, df_shards, run, device="cpu")
    config["train"]["epochs"] = 4                     # resuming a finished run extends it
    main(config, df_shards, run, resume=True, device="cpu")
    assert [m["epoch"] for m in _lines(run / "metrics.jsonl")] == [1, 2, 3, 4]
    other = load_config(TINY, {"model.width": 0.125})  # a checkpoint of another model is named, not a traceback
    with pytest.raises(CheckpointError, match="last.pt: does not fit this run's model"):
        main(other, df_shards, run, resume=True, device="cpu")
    assert yaml.safe_load((run / "config.yaml").read_text()) == config


def test_validation_logs_liu_and_lus_top_k_recall_not_the_known_only_one():
    """metrics.jsonl's val_top3_recall, val_top5_recall and their /group entries are vsam eval's
    top3_recall / top5_recall (Liu & Lu: unknown labels ranked as negatives), on labels whose unknowns
    make the two protocols differ."""
    from pose_prep.shard_format import Vocabulary
    from vsam_train.metrics import top_k_recall, top_k_recall_known_only
    from vsam_train.train import summarize

    rng = np.random.default_rng(0)
    labels = (rng.random((40, 8)) < 0.3).astype(np.int8)
    labels[rng.random(labels.shape) < 0.3] = -1
    scores = rng.random(labels.shape).astype(np.float32)
    groups = {"g": [0, 1, 2, 3], "h": [4, 5, 6, 7]}
    vocabulary = Vocabulary(attributes=[f"a{i}" for i in range(8)], attribute_groups=["g"] * 4 + ["h"] * 4)
    result = {"loss": 1.0, "category_loss": 0.0, "attribute_loss": 1.0, "heatmap_loss": 0.0, "n_items": 40,
              "attention_mse": None, "attribute_scores": scores, "attribute_labels": labels,
              "category_logits": None, "category_labels": np.full(40, -1)}
    summary = summarize(result, vocabulary)
    for k in (3, 5):
        liu_lu, known_only = top_k_recall(scores, labels, k, groups), top_k_recall_known_only(scores, labels, k, groups)
        assert liu_lu["all"] != known_only["all"]
        assert summary[f"val_top{k}_recall"] == liu_lu["all"]
        assert {group: summary[f"val_top{k}_recall/{group}"] for group in groups} == {g: liu_lu[g] for g in groups}


def test_a_diverged_loss_and_an_undefined_metric_are_null_in_the_jsonl_logs_not_nan(tmp_path):
    """metrics.jsonl and steps.jsonl are strict JSON lines: NaN (a group without a true label) and inf
    (a diverged loss) are written as null."""
    from vsam_train.train import _append_jsonl

    log = tmp_path / "metrics.jsonl"
    _append_jsonl(log, {"epoch": 1, "loss": float("inf"), "val_ap": float("nan"), "groups": [0.5, float("nan")]})

    def refuse(constant):
        raise AssertionError(f"{constant} in a JSON line")
    assert json.loads(log.read_text(), parse_constant=refuse) == \
        {"epoch": 1, "loss": None, "val_ap": None, "groups": [0.5, None]}


def test_learning_rate_follows_keras_inverse_time_decay():
    model = create_model("vgg16", 0, 3, width=1 / 16, image_size=32)
    optimizer, scheduler = build_optimizer(model, load_config(None, {"optim.decay": 0.01}))
    for step in range(5):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 / (1 + 0.01 * step), rel=1e-12)
        optimizer.step()
        scheduler.step()


def test_a_cosine_schedule_falls_from_the_base_rate_to_zero_over_the_run_and_fixes_its_epochs():
    model = create_model("vgg16", 0, 3, width=1 / 16, image_size=32)
    config = load_config(None, {"optim.schedule": "cosine", "train.epochs": 2})
    optimizer, scheduler = build_optimizer(model, config, steps_per_epoch=2)     # 4 steps in all
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([1e-4, 1e-4 * (1 + 2 ** -0.5) / 2, 0.5e-4, 1e-4 * (1 - 2 ** -0.5) / 2, 0, 0],
                                  abs=1e-12)
    with pytest.raises(ValueError, match="steps per epoch"):
        build_optimizer(model, config)


def test_a_resumed_cosine_run_may_not_change_its_epochs_an_inverse_time_one_may(tmp_path):
    for schedule, refused in (("cosine", True), ("inverse_time", False)):
        run = tmp_path / schedule
        run.mkdir()
        save_config(load_config(TINY, {"optim.schedule": schedule}), run / "config.yaml")
        if refused:
            with pytest.raises(ConfigError, match="differs from the run's .* in train.epochs"):
                resolve_run_config(run, None, {"train.epochs": 9}, resume=True)
        else:
            assert resolve_run_config(run, None, {"train.epochs": 9}, resume=True)["train"]["epochs"] == 9


def _train_command(shards: Path, out: Path, *extra: str) -> list[str]:
    settings = ["train.deterministic=true", "train.epochs=3", "train.batch_size=8", "train.max_steps_per_epoch=null",
                "train.log_every=1", "train.keep_epoch_checkpoints=true", "data.num_workers=1",
                "data.max_val_batches=1"]
    return [str(BIN / "vsam"), "train", "--shards", str(shards), "--out", str(out), "--config", str(TINY),
            "--device", "cpu", *[arg for s in settings for arg in ("--set", s)], *extra]


def test_sigkill_mid_epoch_then_resume_ends_with_the_weights_of_an_uninterrupted_run(df_shards, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    uninterrupted = subprocess.Popen(_train_command(df_shards, whole), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
    victim = subprocess.Popen(_train_command(df_shards, killed), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    steps, deadline = killed / "steps.jsonl", time.monotonic() + 120
    while time.monotonic() < deadline and victim.poll() is None:
        if steps.exists() and any(s["epoch"] == 2 and s["step"] >= 12 + 2 for s in _lines(steps)):
            break
        time.sleep(0.02)
    assert victim.poll() is None, "the run ended before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert load_checkpoint(killed / "checkpoints" / "last.pt")["epoch"] == 1       # killed inside epoch 2
    assert not (killed / "checkpoints" / "epoch-002.pt").exists()

    resumed = subprocess.run(_train_command(df_shards, killed, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.stdout.read().decode()

    expected = load_checkpoint(whole / "checkpoints" / "last.pt")
    actual = load_checkpoint(killed / "checkpoints" / "last.pt")
    assert (actual["epoch"], actual["step"]) == (expected["epoch"], expected["step"]) == (3, 36)
    assert expected["model"].keys() == actual["model"].keys()
    for key, value in expected["model"].items():
        assert torch.equal(value, actual["model"][key]), key
    assert [m["epoch"] for m in _lines(killed / "metrics.jsonl")] == [1, 2, 3]
    assert [s["step"] for s in _lines(killed / "steps.jsonl")] == list(range(1, 37))
    whole_metrics, killed_metrics = _lines(whole / "metrics.jsonl"), _lines(killed / "metrics.jsonl")
    assert [m["train_loss"] for m in whole_metrics] == [m["train_loss"] for m in killed_metrics]


def test_ddp_with_torchrun_on_two_cpu_processes_gives_ranks_disjoint_items(df_shards, tmp_path):
    run = tmp_path / "ddp"
    settings = ["train.log_items=true", "train.epochs=2", "train.batch_size=8", "train.max_steps_per_epoch=4",
                "data.num_workers=0", "data.max_val_batches=1"]
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(BIN / "vsam"), "train",
               "--shards", str(df_shards), "--out", str(run), "--config", str(TINY), "--device", "cpu",
               *[arg for s in settings for arg in ("--set", s)]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr

    train_paths = {i["path"] for i in live_items(df_shards) if i["split"] == "train"}
    ranks = [_lines(run / "items" / f"rank-{r}.jsonl") for r in (0, 1)]
    for epoch in (1, 2):
        seen = [[p for s in steps if s["epoch"] == epoch for p in s["paths"]] for steps in ranks]
        assert [len([s for s in steps if s["epoch"] == epoch]) for steps in ranks] == [4, 4]   # equal batch counts
        assert len(seen[0]) == len(seen[1]) == 32
        assert not set(seen[0]) & set(seen[1])
        assert set(seen[0]) | set(seen[1]) <= train_paths and len(set(seen[0]) | set(seen[1])) == 64
    metrics = _lines(run / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2] and all(m["train_images"] == 64 for m in metrics)
    assert all(m["world_size"] == 2 for m in metrics)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (state["step"], state["world_size"]) == (8, 2)

    # Resumed by one process, the global batch would halve (16 -> 8): refused, nothing written.
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".train.lock"}
    resumed = CliRunner().invoke(vsam, ["train", "--shards", str(df_shards), "--out", str(run), "--resume",
                                        "--epochs", "3", "--device", "cpu"])
    assert resumed.exit_code == 2, resumed.output
    assert (f"{run / 'checkpoints' / 'last.pt'} was trained by 2 processes (global batch 16); this run has 1 "
            "(global batch 8)") in resumed.output
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".train.lock"} == before


def test_cli_refuses_bad_config_and_an_existing_run_with_exit_codes(df_shards, tmp_path):
    runner = CliRunner()
    result = runner.invoke(vsam, ["train", "--shards", str(df_shards), "--out", str(tmp_path / "a"),
                                  "--set", "model.depth=3"])
    assert result.exit_code == 2 and "unknown config key 'model.depth'" in result.output
    result = runner.invoke(vsam, ["train", "--shards", str(df_shards), "--out", str(tmp_path / "a"),
                                  "--set", "model.depth"])
    assert result.exit_code == 2 and "'model.depth' is not KEY=VALUE" in result.output
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    (tmp_path / "b" / "checkpoints" / "last.pt").write_bytes(b"")
    result = runner.invoke(vsam, ["train", "--shards", str(df_shards), "--out", str(tmp_path / "b"),
                                  "--config", str(TINY)])
    assert result.exit_code == 1 and "pass --resume" in result.output



def test_train_into_a_folder_that_holds_other_files_is_a_usage_error_and_writes_nothing(df_shards, tmp_path):
    photos = tmp_path / "photos"
    fixture_set.copy_photos(photos, sorted(p.name for p in fixture_set.PHOTOS.glob("*.jpg"))[:2])
    before = sorted(p.name for p in photos.rglob("*"))
    for extra in ((), ("--resume",)):
        result = CliRunner().invoke(vsam, ["train", "--shards", str(df_shards), "--out", str(photos),
                                           "--config", str(TINY), *extra])
        assert result.exit_code == 2, result.output
        assert result.output == (f"vsam train: --out {photos} holds files but is not a vsam run folder (no "
                                 ".train.lock, config.yaml, checkpoints, metrics.jsonl, run.log): choose a new or empty "
                                 "folder\n")
    assert sorted(p.name for p in photos.rglob("*")) == before      # no lock file, no config.yaml

def test_resume_refuses_changes_of_what_the_run_computes_with_or_without_a_config_file(tmp_path):
    save_config(load_config(TINY), tmp_path / "config.yaml")
    assert resolve_run_config(tmp_path, None, {"train.epochs": 9}, resume=True)["train"]["epochs"] == 9
    assert resolve_run_config(tmp_path, TINY, {"data.num_workers": 0}, resume=True)["data"]["num_workers"] == 0
    for config_file in (None, TINY):
        with pytest.raises(ConfigError, match=r"differs from the run's .*config.yaml in train.batch_size"):
            resolve_run_config(tmp_path, config_file, {"train.batch_size": 8}, resume=True)
    with pytest.raises(ConfigError, match="in model.group_joints.collar"):    # a key added to an open mapping
        resolve_run_config(tmp_path, None, {"model.group_joints.collar": "neckline"}, resume=True)


def test_cli_names_a_cuda_device_that_is_not_there(df_shards, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(vsam, ["train", "--shards", str(df_shards), "--out", str(tmp_path / "run"),
                                       "--config", str(TINY), "--device", "cuda"])
    assert result.exit_code == 2 and "--device cuda, but torch sees no CUDA device" in result.output


def _start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_a_second_train_into_a_running_runs_folder_exits_75_and_changes_nothing(df_shards, tmp_path):
    run = tmp_path / "run"
    first = _start(_train_command(df_shards, run, "--set", "train.epochs=50"))
    try:
        deadline = time.monotonic() + 120
        while not lock.is_locked(run, lock.TRAIN_LOCK_NAME):      # taken first thing, before the data
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1]
            time.sleep(0.02)
        seconds = [_start(_train_command(df_shards, run, "--set", "train.epochs=60", *extra))
                   for extra in ((), ("--resume",))]
        for second in seconds:
            _, stderr = second.communicate(timeout=300)
            assert second.returncode == 75, stderr
            assert f"{run}: another vsam train run is active (pid {first.pid} on " in stderr
            assert "Traceback" not in stderr
        assert first.poll() is None
        _wait_for(run / "config.yaml", first)
        assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 50    # the first run's
    finally:
        first.kill()
        first.communicate()


def test_a_killed_run_without_a_checkpoint_still_holds_its_folder(df_shards, tmp_path):
    run = tmp_path / "run"
    victim = _start(_train_command(df_shards, run))
    _wait_for(run / "config.yaml", victim)       # written when training starts, before the first checkpoint
    victim.kill()
    victim.communicate()
    assert not (run / "checkpoints" / "last.pt").exists(), "killed too late: a checkpoint was written"
    again = subprocess.run(_train_command(df_shards, run), capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "already holds a run" in again.stderr and "--resume" in again.stderr, again.stderr


def test_the_trainer_never_imports_a_pose_detector():
    code = ("import sys, cli, vsam_train.train, vsam_train.data, vsam_train.checkpoint, vsam_train.models\n"
            "loaded = [m for m in sys.modules if m.startswith(('pose_prep.detectors', 'mediapipe', 'ultralytics'))]\n"
            "assert not loaded, loaded\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
