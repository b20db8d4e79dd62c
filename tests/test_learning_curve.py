"""benchmarks/learning_curve.py: variants matched across compare JSONs by what they train, paired by seed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "learning_curve.py"
RESULTS = REPO / "benchmarks" / "results"


def run_curve(*options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *options], capture_output=True, text=True, timeout=120)


def write_compare(path: Path, variants: dict[str, tuple[str, dict]], top1: dict[str, dict[int, float]]) -> Path:
    """A compare JSON as benchmarks/compare.py writes it, with only the fields the curve reads."""
    path.write_text(json.dumps({
        "schema": "vsam-compare/1",
        "variants": {name: {"model": model, "overrides": overrides} for name, (model, overrides) in variants.items()},
        "per_run": {name: {str(seed): {"group_top1": value} for seed, value in by_seed.items()}
                    for name, by_seed in top1.items()}}))
    return path


def test_variants_named_per_size_are_matched_by_model_and_overrides_and_paired_by_seed(tmp_path):
    small = write_compare(tmp_path / "small.json", {
        "vgg16-500": ("vgg16", {"train.epochs": 124}),
        "groups-500": ("vsam-groups", {"train.epochs": 124}),
        "groups-500-l0": ("vsam-groups", {"train.epochs": 124, "loss.heatmap_loss.weight": 0.0}),
        "only-here": ("vsam", {"train.epochs": 124})},
        {"vgg16-500": {0: 0.60, 1: 0.64}, "groups-500": {0: 0.66, 1: 0.66},
         "groups-500-l0": {0: 0.61, 1: 0.65}, "only-here": {0: 0.9, 1: 0.9}})
    large = write_compare(tmp_path / "large.json", {
        "vgg16": ("vgg16", {}), "vsam-groups": ("vsam-groups", {}),
        "vsam-groups-lambda0": ("vsam-groups", {"loss.heatmap_loss.weight": 0.0})},
        {"vgg16": {0: 0.70, 1: 0.72, 2: 0.74}, "vsam-groups": {0: 0.71, 1: 0.75},
         "vsam-groups-lambda0": {0: 0.70, 1: 0.72, 2: 0.74}})
    done = run_curve("--point", f"500={small}", "--point", f"5000={large}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "| group_top1, val | 500 images | 5,000 images |" in lines
    assert "| vgg16 | 0.620 ± 0.028 (2) | 0.720 ± 0.020 (3) |" in lines
    assert "| vsam-groups[loss.heatmap_loss.weight=0.0] | 0.630 ± 0.028 (2) | 0.720 ± 0.020 (3) |" in lines
    # paired by seed: at 5,000 only seeds 0 and 1 have both (+0.01, +0.03)
    assert "| vsam-groups | +0.040 ± 0.028 (2) | +0.020 ± 0.014 (2) |" in lines
    assert "| vsam-groups[loss.heatmap_loss.weight=0.0] | +0.010 ± 0.000 (2) | +0.000 ± 0.000 (3) |" in lines
    assert "only-here" not in done.stdout and "| vsam |" not in done.stdout    # found at one size only


def test_the_committed_results_give_the_documented_figures_and_a_plot(tmp_path):
    plot = tmp_path / "curve.png"
    done = run_curve("--point", f"1000={RESULTS / 'compare-small1k-cpu-2026-12-02.json'}",
                     "--point", f"5000={RESULTS / 'compare-small-lambda0-cpu-2026-12-01.json'}",
                     "--metric", "group_top1/neckline", "--reference", "vsam-groups[loss.heatmap_loss.weight=0.0]",
                     "--plot", str(plot))
    assert done.returncode == 0, done.stderr
    # docs/experiments.md: the pose's share of the groups model's neckline, +4.5 ± 1.3 and +2.1 ± 0.5
    assert "| vsam-groups | +0.045 ± 0.013 (3) | +0.021 ± 0.005 (3) |" in done.stdout.splitlines()
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_points_and_references_are_named_without_a_traceback(tmp_path):
    good = RESULTS / "compare-small1k-cpu-2026-12-02.json"
    (tmp_path / "other.json").write_text('{"metrics": {}}')
    text = write_compare(tmp_path / "text.json", {"vgg16": ("vgg16", {})}, {"vgg16": {0: "0.7"}})
    cases = [(("--point", f"1000={tmp_path / 'missing.json'}", "--point", f"5000={good}"), "missing.json"),
             (("--point", f"1000={tmp_path / 'other.json'}", "--point", f"5000={good}"),
              "other.json: not a benchmarks/compare.py JSON"),
             (("--point", f"1000={text}", "--point", f"5000={good}"),
              "text.json: per_run vgg16 seed 0: figure group_top1 is \"0.7\", not a finite number"),
             (("--point", f"many={good}"), "SIZE=FILE"),
             (("--point", f"1000={good}", "--point", f"1000={good}"), "the same size"),
             (("--point", f"1000={good}"), "two --point options at least"),
             (("--point", f"1000={good}", "--point", f"5000={good}", "--reference", "resnet50"),
              "--reference resnet50: no file has it")]
    for options, reason in cases:
        done = run_curve(*options)
        assert done.returncode == 2, (options, done.stdout)
        assert reason in done.stderr and "Traceback" not in done.stderr, (options, done.stderr)


def test_figures_that_are_nan_or_true_false_and_seed_keys_written_twice_are_refused(tmp_path):
    good = RESULTS / "compare-small1k-cpu-2026-12-02.json"
    nan = write_compare(tmp_path / "nan.json", {"vgg16": ("vgg16", {})}, {"vgg16": {0: float("nan")}})
    true = write_compare(tmp_path / "true.json", {"vgg16": ("vgg16", {})}, {"vgg16": {0: True}})
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps({"variants": {"vgg16": {"model": "vgg16", "overrides": {}}},
                                 "per_run": {"vgg16": {"0": {"group_top1": 0.7}, "00": {"group_top1": 0.1}}}}))
    for path, reason in ((nan, "nan.json: per_run vgg16 seed 0: figure group_top1 is NaN, not a finite number"),
                         (true, "true.json: per_run vgg16 seed 0: figure group_top1 is true, not a finite number"),
                         (twice, "twice.json: per_run vgg16: seed key '00' is not a seed as compare writes one")):
        done = run_curve("--point", f"1000={path}", "--point", f"5000={good}")
        assert done.returncode == 2, (path, done.stdout)
        assert reason in done.stderr and "Traceback" not in done.stderr, (path, done.stderr)
        assert "nan" not in done.stdout, done.stdout


def test_a_plot_that_cannot_be_written_exits_2_before_the_table(tmp_path):
    points = ("--point", f"1000={RESULTS / 'compare-small1k-cpu-2026-12-02.json'}",
              "--point", f"5000={RESULTS / 'compare-small-lambda0-cpu-2026-12-01.json'}")
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir.png").mkdir()
    cases = [(tmp_path / "afile" / "p.png", "afile is a file, not a folder"),
             (tmp_path / "p.xyz", "must end in .png, .pdf, .svg"),
             (tmp_path / "adir.png", "is a folder, not a file"),
             (tmp_path / "adir.png" / "..", "must end in"),
             ("", "must end in"),
             ("/proc/p.png", "cannot write in /proc")]
    for plot, reason in cases:
        done = run_curve(*points, "--plot", str(plot))
        assert done.returncode == 2, (plot, done.stdout, done.stderr)
        assert f"--plot {str(plot)!r}: " in done.stderr and reason in done.stderr, (plot, done.stderr)
        assert "Traceback" not in done.stderr, (plot, done.stderr)
        assert done.stdout == "", (plot, done.stdout)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.png", "afile"]


def test_a_plot_in_a_missing_folder_is_drawn_as_pdf_or_svg(tmp_path):
    points = ("--point", f"1000={RESULTS / 'compare-small1k-cpu-2026-12-02.json'}",
              "--point", f"5000={RESULTS / 'compare-small-lambda0-cpu-2026-12-01.json'}")
    for name, magic in (("curve.pdf", b"%PDF"), ("curve.svg", b"<?xml")):
        plot = tmp_path / "new" / name
        done = run_curve(*points, "--plot", str(plot))
        assert done.returncode == 0, done.stderr
        assert plot.read_bytes()[:len(magic)] == magic
