import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT
from vsam_train.experiments.compare import CompareError, Variant, format_summary, summarize


def test_variants_parse_a_model_or_a_named_model_with_overrides():
    assert Variant.parse("vgg16") == Variant("vgg16", "vgg16", {})
    ablation = Variant.parse("lambda1=vsam,loss.heatmap_loss.weight=1")
    assert ablation.name == "lambda1" and ablation.model == "vsam"
    settings = ablation.settings(2)
    assert float(settings.pop("loss.heatmap_loss.weight")) == 1      # typed by load_config, from the schema
    assert settings == {"model.name": "vsam", "model.attention": "single", "train.seed": 2}
    with pytest.raises(CompareError, match="unknown model 'vit'"):
        Variant.parse("x=vit")
    with pytest.raises(CompareError, match="KEY=VALUE"):
        Variant.parse("x=vsam,loss")


@pytest.mark.parametrize("name", ["vsam-groups-500-lambda0", "vgg16-1k", "vsam_2", "0.5", "-x"])
def test_variant_names_that_results_and_docs_use_stay_valid(name):
    assert Variant.parse(f"{name}=vsam").name == name


@pytest.mark.parametrize("name", ["/tmp/sweep/escaped", "../x", "a/b", "", ".hidden", "..", "a\nb", "a b", "x" * 101])
def test_a_variant_name_that_is_not_a_plain_folder_name_is_refused(name):
    with pytest.raises(CompareError, match="variant name .*letters, digits"):
        Variant.parse(f"{name}=vsam")
    with pytest.raises(CompareError, match="variant name"):
        Variant(name, "vsam")


def test_overrides_without_a_name_say_the_expected_form():
    with pytest.raises(CompareError, match="overrides need a name first; expected MODEL or NAME=MODEL,KEY=VALUE"):
        Variant.parse("vsam,train.epochs=1")


def run_script(*options: str, cwd=None) -> subprocess.CompletedProcess:
    """benchmarks/compare.py in a process of its own: (exit code, stdout, stderr) of an option error."""
    return subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "compare.py"), *options],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def test_a_variant_name_that_leaves_out_exits_2_before_any_run(tmp_path):
    out = tmp_path / "out"
    for spec in (f"{tmp_path / 'escaped'}=vgg16", "../x=vsam", "a/b=vsam", "=vsam"):
        done = run_script("--shards", str(tmp_path), "--out", str(out), "--variant", spec, cwd=tmp_path)
        assert done.returncode == 2, (spec, done.stdout, done.stderr)
        assert "variant name" in done.stderr and "Traceback" not in done.stderr, (spec, done.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == []      # neither OUT nor anything beside it


def test_bad_shards_config_seeds_out_and_json_exit_2_before_any_run(df_shards, tmp_path):
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir").mkdir()
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    out, tiny = tmp_path / "out", str(REPO_ROOT / "configs" / "tiny.yaml")
    cases = [(("--shards", str(tmp_path / "missing")), "no shard index here"),
             (("--out", str(tmp_path / "afile")), "afile: is a file, not a folder"),
             (("--json", str(tmp_path / "adir")), "--json " + str(tmp_path / "adir") + ": is a folder"),
             (("--json", str(tmp_path / "afile" / "x.json")), "afile is a file, not a folder"),
             (("--config", str(tmp_path / "missing.yaml")), "missing.yaml: cannot read config"),
             (("--config", str(tmp_path / "list.yaml")), "list.yaml: a config is a mapping of sections"),
             (("--seeds", "-1"), "--seeds -1: train.seed must be an integer in [0, 4294967295]"),
             (("--seeds", "99999999999999999999999"), "train.seed must be an integer in [0, 4294967295]"),
             (("--seeds", "0,1,0"), "--seeds 0,1,0: seed 0 given twice"),
             (("--set", "data.train_split=test"), "no items in split test"),
             (("--variant", "big=vsam,model.image_size=33"), "model.image_size must be"),
             (("--reference", "vsam-groups"), "--reference vsam-groups: not a compared variant (vgg16, vsam)")]
    for options, reason in cases:      # a repeated --shards, --out or --config: the last one counts
        done = run_script("--shards", str(df_shards), "--out", str(out), "--config", tiny, *options)
        assert done.returncode == 2, (options, done.stdout, done.stderr)
        assert reason in done.stderr and "Traceback" not in done.stderr, (options, done.stderr)
        assert "start " not in done.stdout and not out.exists(), (options, done.stdout)


def test_differences_are_paired_by_seed_and_std_is_the_sample_std():
    def run(top1, ap):
        return {"group_top1": {"mean": top1, "texture": top1}, "AP": ap}

    data = summarize({"a": {0: run(0.70, 0.40), 1: run(0.74, 0.44), 2: None},
                      "b": {0: run(0.60, 0.41), 1: run(0.66, 0.41), 2: run(0.9, 0.9)}})
    assert data["models"]["a"]["group_top1"] == pytest.approx({"mean": 0.72, "std": 0.0282843, "n": 2}, abs=1e-6)
    assert data["models"]["b"]["AP"]["n"] == 3
    diff = data["differences"]["a - b"]          # seed 2 of b has no partner in a: left out
    assert diff["group_top1"] == pytest.approx({"mean": 0.09, "std": 0.0141421, "n": 2}, abs=1e-6)
    assert diff["AP"]["mean"] == pytest.approx(0.01) and diff["group_top1/texture"]["n"] == 2
    assert data["differences"]["b - a"]["group_top1"]["mean"] == pytest.approx(-0.09)
    table = format_summary(data, "b")
    assert "| a - b | 2 | +0.090 ± 0.014" in table and "b - a" not in table


def _script():
    """benchmarks/compare.py as a module: its main runs in this process (the runs are child processes
    all the same), which spares each call a Python that imports torch only to read the labels."""
    spec = importlib.util.spec_from_file_location("compare_script", REPO_ROOT / "benchmarks" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compare(df_shards, out, *variants, capsys, monkeypatch, extra=()):
    """benchmarks/compare.py's main on a toy comparison: (exit code, stdout, stderr)."""
    arguments = ["--shards", str(df_shards), "--out", str(out), "--config", str(REPO_ROOT / "configs" / "tiny.yaml"),
                 "--seeds", "0,1", "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=2",
                 "--set", "data.max_val_batches=1", "--set", "train.batch_size=8", "--set", "data.num_workers=0",
                 *[arg for v in variants for arg in ("--variant", v)], *extra]
    monkeypatch.setattr(sys, "argv", [str(REPO_ROOT / "benchmarks" / "compare.py"), *arguments])
    capsys.readouterr()
    code = _script().main(arguments)
    output = capsys.readouterr()
    return code, output.out, output.err


@pytest.mark.slow
def test_the_comparison_trains_evaluates_summarises_and_continues_where_it_stopped(df_shards, tmp_path, capsys,
                                                                                    monkeypatch):
    out = tmp_path / "compare"
    code, stdout, stderr = _compare(df_shards, out, "vgg16", "vsam", capsys=capsys, monkeypatch=monkeypatch,
                                    extra=("--json", str(tmp_path / "result.json")))
    assert code == 0, stdout + stderr
    data = json.loads((tmp_path / "result.json").read_text())
    assert set(data["per_run"]) == {"vgg16", "vsam"} and set(data["per_run"]["vsam"]) == {"0", "1"}
    assert data["models"]["vsam"]["group_top1"]["n"] == 2
    assert "attention_correlation" in data["models"]["vsam"] and "attention_correlation" not in data["models"]["vgg16"]
    assert data["differences"]["vsam - vgg16"]["group_top1"]["n"] == 2
    assert "| vsam - vgg16 | 2 |" in stdout
    assert len(data["git_commit"]) == 40
    assert 0 < data["majority"]["group_top1"] < 1 and "| majority (train rates) | – | " in stdout
    evaluated = json.loads((out / "runs" / "vsam" / "seed-1" / "eval.json").read_text())
    assert evaluated["split"] == "val" and evaluated["model"] == "vsam" and evaluated["epoch"] == 1

    (out / "runs" / "vsam" / "seed-1" / "eval.json").unlink()      # as if killed before its evaluation
    code, stdout, stderr = _compare(df_shards, out, "vgg16", "vsam", capsys=capsys, monkeypatch=monkeypatch)
    assert code == 0, stdout + stderr
    assert "3 of 4 runs already evaluated; 1 to do" in stdout
    assert stdout.count("start ") == 1 and "start vsam seed 1" in stdout

    # the same --out and variant name with another config: refused, nothing started, no old figure reused
    code, stdout, stderr = _compare(df_shards, out, "vgg16", "vsam=vsam,model.attention_scale=5", capsys=capsys,
                                    monkeypatch=monkeypatch)
    assert code == 2 and "start " not in stdout
    assert f"{out / 'runs' / 'vsam' / 'seed-0'} was trained with another config (model.attention_scale" in stderr


def test_a_run_that_fails_is_named_with_its_log_and_the_comparison_exits_1(df_shards, tmp_path, capsys, monkeypatch):
    code, stdout, _ = _compare(df_shards, tmp_path / "compare", "broken=vsam,train.batch_size=100000", capsys=capsys,
                               monkeypatch=monkeypatch, extra=("--seeds", "0"))
    assert code == 1
    assert "FAILED (exit 1" in stdout and "broken seed 0" in stdout
    log = (tmp_path / "compare" / "runs" / "broken" / "seed-0" / "run.log").read_text()
    assert "fewer than one batch of 100000" in log and "Traceback" not in log


def test_the_majority_baseline_ranks_each_groups_most_frequent_train_attribute_first(df_shards):
    from pose_prep.shard_format import Shard, live_rows
    from vsam_train.data import read_collection
    from vsam_train.experiments.compare import collection_majority

    majority = collection_majority(df_shards)
    vocabulary = read_collection(df_shards).vocabulary

    def labels(split):
        parts = []
        for path, rows in live_rows(df_shards, (split,)).items():
            with Shard(path) as shard:
                parts.append(shard.read(("attributes",))["attributes"][rows])
        return np.concatenate(parts)

    train, val = labels("train"), labels("val")
    for group, idx in vocabulary.group_indices().items():
        most = idx[int(np.argmax((train[:, idx] == 1).sum(0)))]
        assert majority["majority_attribute"][group] == vocabulary.attributes[most]
        known = (val[:, idx] >= 0).any(1)
        assert majority["group_top1"][group] == pytest.approx((val[known, most] == 1).mean())
