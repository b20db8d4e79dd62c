"""The learning curve of a comparison: the same variants trained on fewer labels, read from compare JSONs.

    python benchmarks/learning_curve.py --reference vgg16 \\
        --point 500=benchmarks/results/compare-small500-cpu-2026-12-02.json \\
        --point 1000=benchmarks/results/compare-small1k-cpu-2026-12-02.json \\
        --point 5000=benchmarks/results/compare-small-lambda0-cpu-2026-12-01.json \\
        --plot docs/img/learning-curve-cpu.png

Each --point is a training-set size and the `benchmarks/compare.py` JSON of the runs trained on it. A variant
is matched across the files by what it trains: its model and its config overrides, less `train.epochs` (which
only keeps the compute equal across sizes); `vgg16-1k=vgg16,train.epochs=60` and `vgg16` are both `vgg16`.
Variants found at two sizes or more are printed: mean ± std over seeds of --metric at each size, then the
differences to --reference, paired by seed within each file. --plot draws both.

Exit codes: 0 printed, 2 bad options (fewer than two --point, a file that is missing or not a compare JSON, a figure
that is not a finite number, a seed key not written as compare writes it, a size that is not a positive integer, a
--reference that no file has, a --plot that does not end in .png, .pdf or .svg or cannot be written).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vsam_train.experiments.compare import format_mean_std, output_problem, summarize_figures  # noqa: E402

COMPUTE_ONLY = {"train.epochs"}     # overrides that keep the steps equal across sizes, not another model
SEED_KEY = re.compile(r"0|[1-9][0-9]*")
PLOT_SUFFIXES = (".png", ".pdf", ".svg")     # of matplotlib's savefig formats, those a page or a paper takes


def family(variant: dict) -> str:
    """`model` or `model[key=value,...]`: what a variant trains, whatever the file named it."""
    overrides = sorted((k, v) for k, v in variant["overrides"].items() if k not in COMPUTE_ONLY)
    return variant["model"] + ("[" + ",".join(f"{k}={v}" for k, v in overrides) + "]" if overrides else "")


def load_point(path: Path) -> dict[str, dict[int, dict]]:
    """{family: {seed: figures}} of one compare JSON; ValueError naming the file if it is not one."""
    try:
        data = json.loads(path.read_text())
        variants, per_run = data["variants"], data["per_run"]
        runs = {}
        for name, variant in variants.items():
            label = family(variant)
            if label in runs:
                raise ValueError(f"variants {name!r} and another train the same {label}")
            runs[label] = {_seed(name, key): _figures(name, key, figures)
                           for key, figures in per_run.get(name, {}).items()}
        return {label: by_seed for label, by_seed in runs.items() if by_seed}
    except OSError as error:
        raise ValueError(f"{path}: {error.strerror}") from error
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: not a benchmarks/compare.py JSON ({type(error).__name__}: {error})") from error
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def _seed(variant: str, key: str) -> int:
    """A per_run seed key as compare writes it: `0`, `12`; `00` or `+0` would merge silently with `0`."""
    if not SEED_KEY.fullmatch(key):
        raise ValueError(f"per_run {variant}: seed key {key!r} is not a seed as compare writes one (0, 1, 2, ...)")
    return int(key)


def _figures(variant: str, seed: str, figures: dict) -> dict:
    """The figures of one run, each a finite number (true/false and NaN would pass into the means)."""
    for key, value in figures.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"per_run {variant} seed {seed}: figure {key} is {json.dumps(value)}, not a finite number")
    return figures


def curve(points: dict[int, dict[str, dict[int, dict]]], metric: str, reference: str) -> dict:
    """{"models": {family: {size: mean_std}}, "differences": {family: {size: paired mean_std}}}."""
    sizes_found = Counter(label for runs in points.values() for label in runs)     # in the order first seen
    shown = [label for label, count in sizes_found.items() if count >= 2]
    models, differences = {}, {}
    for size in sorted(points):
        runs = points[size]
        summary = summarize_figures({label: runs[label] for label in shown if label in runs})
        for label in shown:
            value = summary["models"].get(label, {}).get(metric)
            if value:
                models.setdefault(label, {})[size] = value
            paired = summary["differences"].get(f"{label} - {reference}", {}).get(metric)
            if paired:
                differences.setdefault(label, {})[size] = paired
    return {"metric": metric, "reference": reference, "sizes": sorted(points), "models": models,
            "differences": differences}


def format_curve(data: dict) -> str:
    sizes = data["sizes"]
    head = " | ".join(f"{size:,} images" for size in sizes)
    lines = [f"| {data['metric']}, val | {head} |", "|---|" + "---:|" * len(sizes)]
    lines += [f"| {label} | " + " | ".join(_cell(by_size.get(size)) for size in sizes) + " |"
              for label, by_size in data["models"].items()]
    lines += ["", f"| − {data['reference']} (paired by seed) | {head} |", "|---|" + "---:|" * len(sizes)]
    lines += [f"| {label} | " + " | ".join(_cell(by_size.get(size), signed=True) for size in sizes) + " |"
              for label, by_size in data["differences"].items()]
    return "\n".join(lines)


def _cell(value: dict | None, signed: bool = False) -> str:
    """The compare table's cell and the number of seeds behind it."""
    return f"{format_mean_std(value, signed)} ({value['n']})" if value else "–"


def plot_curve(data: dict, path: Path) -> None:
    """Left: the metric against the training-set size; right: the paired difference to the reference."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(data["models"])
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}     # the same colour in both panels
    # each variant a little to the side, so that error bars at the same size do not hide each other
    shift = {label: 1.04 ** (i - (len(labels) - 1) / 2) for i, label in enumerate(labels)}
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for axis, table, title in ((left, data["models"], f"{data['metric']}, val: mean ± std over seeds"),
                               (right, data["differences"], f"− {data['reference']}, paired by seed")):
        for label, by_size in table.items():
            sizes = sorted(by_size)
            axis.errorbar([s * shift[label] for s in sizes], [by_size[s]["mean"] for s in sizes],
                          yerr=[by_size[s]["std"] for s in sizes], marker="o", capsize=3, label=label,
                          color=colors[label])
        axis.set_xscale("log")
        axis.set_xticks(data["sizes"], [f"{s:,}" for s in data["sizes"]])
        axis.minorticks_off()
        axis.set_xlabel("training images")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    right.axhline(0, color="grey", linewidth=1)
    left.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_problem(path: Path) -> str | None:
    """Why the curve cannot be drawn into `path` (its folder made if missing), or None."""
    if path.suffix.lower() not in PLOT_SUFFIXES:
        return f"the file name must end in {', '.join(PLOT_SUFFIXES)} (the suffix picks the format)"
    return output_problem(path, folder=False)


def parse_point(text: str) -> tuple[int, Path]:
    size, sep, path = text.partition("=")
    if not sep or not size.strip().isdigit() or int(size) < 1:
        raise ValueError(f"--point {text!r}: expected SIZE=FILE with SIZE a positive number of training images")
    return int(size), Path(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--point", action="append", required=True, metavar="SIZE=FILE",
                        help="Training images and the compare JSON of the runs trained on them (repeat).")
    parser.add_argument("--reference", default="vgg16", help="Variant the differences are taken to (default vgg16).")
    parser.add_argument("--metric", default="group_top1",
                        help="A compare figure: group_top1 (default), AP, P@k, group_top1/neckline, ...")
    parser.add_argument("--plot", help=f"Also draw the curve into this file ({', '.join(PLOT_SUFFIXES)}).")
    args = parser.parse_args(argv)
    problem = args.plot is not None and plot_problem(Path(args.plot))
    if problem:           # now, not after the table; the text as given (Path("") would show ".")
        parser.error(f"--plot {args.plot!r}: {problem}")
    try:
        points = dict(parse_point(text) for text in args.point)
        if len(points) != len(args.point):
            raise ValueError("two --point options give the same size")
        if len(points) < 2:
            raise ValueError("a curve needs two --point options at least")
        points = {size: load_point(path) for size, path in points.items()}
    except ValueError as error:
        parser.error(str(error))
    if not any(args.reference in runs for runs in points.values()):
        parser.error(f"--reference {args.reference}: no file has it (variants: "
                     + ", ".join(sorted({label for runs in points.values() for label in runs})) + ")")
    data = curve(points, args.metric, args.reference)
    if not data["models"]:
        parser.error(f"--metric {args.metric}: no variant found at two sizes has it")
    print(format_curve(data))
    if args.plot is not None:
        plot_curve(data, Path(args.plot))
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
