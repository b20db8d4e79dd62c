"""`vsam experiment audit`: injected errors, their scoring on hand-built rankings, and the whole
experiment at toy size on the fixture collection."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main as vsam
from pose_prep.shard_format import Vocabulary, collection_vocabulary, verify_collection
from vsam_train.experiments.injected_errors import curve_summary, found_curve, inject
from vsam_train.experiments.label_noise import split_labels

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]
NAMES = ["floral", "solid", "long", "short", "sleeveless"]
VOCABULARY = Vocabulary(attributes=NAMES, attribute_groups=["texture", "texture", "sleeve", "sleeve", "sleeve"],
                        exclusive_groups=True)


def test_an_error_counts_once_at_the_first_row_that_points_at_it():
    paths = ["a.jpg", "b.jpg", "c.jpg"]
    errors = [{"path": "a.jpg", "kind": "dropped", "attribute": "floral"},
              {"path": "b.jpg", "kind": "swapped", "attribute": "solid", "true_attribute": "floral"}]
    ranked = [("c.jpg", "floral"), ("a.jpg", "floral"), ("b.jpg", "floral"), ("b.jpg", "solid"), ("a.jpg", "long")]
    item = np.array([paths.index(p) for p, _ in ranked])
    attribute = np.array([NAMES.index(a) for _, a in ranked])
    found = found_curve(item, attribute, errors, paths, NAMES)
    assert found.tolist() == [0, 1, 2, 2, 2]          # b's second row finds nothing new
    summary = curve_summary(found, len(errors), (1, 2, 3, 10))
    assert summary["at"] == {"1": {"precision": 0.0, "recall": 0.0}, "2": {"precision": 0.5, "recall": 0.5},
                             "3": {"precision": 2 / 3, "recall": 1.0}, "10": {"precision": 0.4, "recall": 1.0}}
    assert summary["AP"] == pytest.approx((1 / 2 + 2 / 3) / 2)


@pytest.mark.parametrize("swap_to", ["frequency", "uniform"])
def test_injection_drops_and_swaps_exactly_the_listed_labels_whatever_the_item_order(swap_to):
    rng = np.random.default_rng(3)
    paths = [f"img/{i:03d}.jpg" for i in range(400)]
    labels = np.zeros((400, 5), np.int8)
    labels[np.arange(400), rng.integers(0, 2, 400)] = 1          # one texture each
    labels[np.arange(400), 2 + rng.integers(0, 2, 400)] = 1      # one sleeve each (never sleeveless)
    labels[::10, 4] = -1
    options = dict(drop_attribute="floral", drop=0.1, swap_group="sleeve", swap=0.1, seed=7, swap_to=swap_to)
    errors, changed = inject(paths, labels, VOCABULARY, **options)
    dropped = [e for e in errors if e["kind"] == "dropped"]
    swapped = [e for e in errors if e["kind"] == "swapped"]
    assert len(dropped) == round(0.1 * (labels[:, 0] == 1).sum())
    lost = {e["path"] for e in dropped}
    pool = [p for p, row in zip(paths, labels) if (row[2:] == 1).sum() == 1 and p not in lost]
    assert len(swapped) == round(0.1 * len(pool)) and {e["path"] for e in swapped} <= set(pool)
    to_sleeveless = sum(e["attribute"] == "sleeveless" for e in swapped)      # a label no item holds
    assert (to_sleeveless == 0) == (swap_to == "frequency")
    by_path = dict(zip(paths, labels))
    for path, row in changed.items():
        cells = set(np.flatnonzero(row != by_path[path]))
        expected = set()
        for error in (e for e in errors if e["path"] == path):
            expected.add(NAMES.index(error["attribute"]))
            if error["kind"] == "swapped":
                expected.add(NAMES.index(error["true_attribute"]))
                assert by_path[path][NAMES.index(error["true_attribute"])] == 1
                assert row[NAMES.index(error["attribute"])] == 1
                assert {error["attribute"], error["true_attribute"]} <= {"long", "short", "sleeveless"}
        assert cells == expected
    assert set(changed) == {e["path"] for e in errors}

    order = rng.permutation(400)
    again, _ = inject([paths[i] for i in order], labels[order], VOCABULARY, **options)
    assert again == errors


def _csv(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_bytes().decode("utf-8"), newline="")))


def test_the_experiment_at_toy_size_injects_trains_audits_and_scores(df_shards, tmp_path):
    names = collection_vocabulary(df_shards).attributes
    paths, labels, _ = split_labels(df_shards, "train")
    drop_attribute = names[int(np.argmax((labels == 1).sum(0)))]
    out = tmp_path / "experiment"
    tiny = ["--config", str(REPO / "configs" / "tiny.yaml"), "--set", "train.epochs=1", "--set", "train.batch_size=16",
            "--set", "train.max_steps_per_epoch=2", "--set", "data.num_workers=0", "--set", "data.max_val_batches=1"]
    command = ["experiment", "audit", "--shards", str(df_shards), "--out", str(out), "--drop-attribute",
               drop_attribute, "--drop", "0.1", "--swap-group", "sleeve", "--swap", "0.05", "--n", "5,10,50",
               "--gallery", "1",
               "--device", "cpu", *tiny]
    result = CliRunner().invoke(vsam, command)
    assert result.exit_code == 0, result.output

    errors = json.loads((out / "errors.json").read_text())["errors"]
    noisy_paths, noisy, _ = split_labels(out / "shards", "train")
    assert verify_collection(out / "shards") == [] and sorted(noisy_paths) == sorted(paths)
    original = dict(zip(paths, labels))
    differing = {p for p, row in zip(noisy_paths, noisy) if (row != original[p]).any()}
    assert differing == {e["path"] for e in errors}
    report = json.loads((out / "audit_experiment.json").read_text())
    assert report["injected"]["total"] == len(errors) > 0 and report["injected"]["swapped"] > 0
    for model in ("vsam", "vgg16"):
        figures = report["models"][model]
        assert figures["val"]["AP"] is not None
        methods = figures["methods"]
        assert set(methods) == {"platt", "isotonic", "raw", "random", "n_rows"}
        for method in ("platt", "isotonic", "raw", "random"):
            at = methods[method]["at"]
            recalls = [at[n]["recall"] for n in ("5", "10", "50")]
            assert recalls == sorted(recalls) and 0 <= recalls[-1] <= 1
            for n in ("5", "10", "50"):
                assert at[n]["precision"] * int(n) == pytest.approx(at[n]["recall"] * len(errors))
        # The audit written for the model (Platt, its default) agrees with the scored ranking: the
        # distinct errors its top rows point at, counted here from audit.csv and errors.json.
        rows = _csv(out / "audit" / model / "audit.csv")
        for n in (5, 10, 50):
            top = [row for row in rows if int(row["rank"]) <= n]
            assert len(top) == n
            hit = set()
            for row in top:
                for number, error in enumerate(errors):
                    if row["path"] == error["path"] and row["attribute"] in (error["attribute"],
                                                                             error.get("true_attribute")):
                        hit.add(number)
            assert methods["platt"]["at"][str(n)]["recall"] == pytest.approx(len(hit) / len(errors))
        assert (out / "audit" / model / "index.html").is_file()
    assert "| vsam | platt |" in result.output and "| vgg16 | random |" in result.output
    for model in ("vsam", "vgg16"):
        within = report["models"][model]["methods"]["platt"]["within"]
        assert set(within) == {k for k in ("dropped", "swapped") if report["injected"][k]}
    assert (out / "audit_experiment.md").read_text().startswith(f"{len(errors)} injected errors")

    again = CliRunner().invoke(vsam, command)             # a rerun continues: every run already evaluated
    assert again.exit_code == 0, again.output
    assert "continuing" in again.output and "2 of 2 runs already evaluated" in again.output


def test_bad_options_exit_2_and_choices_the_collection_lacks_exit_1_before_any_training(df_shards, tmp_path):
    def run(*options, out=tmp_path / "x"):
        return CliRunner().invoke(vsam, ["experiment", "audit", "--shards", str(df_shards), "--out", str(out),
                                         "--drop-attribute", "solid", "--device", "cpu", *options])

    assert run("--models", "vsam,vit").exit_code == 2
    assert run("--n", "0,10").exit_code == 2 and run("--n", "ten").exit_code == 2
    assert run("--swap-to", "rare").exit_code == 2
    assert run("--set", "train.epochs=0").exit_code == 2
    result = run("--swap-group", "colour")
    assert result.exit_code == 1 and "no exclusive group 'colour'" in result.output
    result = run("--drop-attribute", "paisley")
    assert result.exit_code == 1 and "has no attribute 'paisley'" in result.output
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    result = run(out=occupied)
    assert result.exit_code == 1 and "is not empty" in result.output
    assert sorted(p.name for p in occupied.iterdir()) == ["notes.txt"] and not (tmp_path / "x").exists()
