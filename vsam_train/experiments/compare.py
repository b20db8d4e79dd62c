"""Models and ablations compared over seeds on one shard collection: the one comparison core.

Every run is the product path, `vsam_train.train.main` then `vsam_train.evaluate.evaluate_checkpoint`
on the val split, in a child process of its own (`python -m vsam_train.experiments.compare --run
SPEC`): `parallel` runs at a time use the cores side by side, and a run that dies takes nothing
else with it. Runs of one seed share the data order, augmentation and initial seed: the seed is
`train.seed`, and the stream and the model draw from it alone.

The output folder holds one run folder per variant and seed, `runs/<variant>/seed-<s>/` (a `vsam
train` run folder, its `eval.json` and `run.log`), and `compare.json`, rewritten after every run
that finishes. A killed comparison continues where it stopped: a run with its eval.json is kept, an
interrupted one resumes from its last checkpoint (`--resume`), which refuses a config that differs
from the one the run started with.

The summary gives, per variant, the mean ± std over seeds of each figure (`FIGURES`, and each
attribute group's top-1), and the paired differences between variants: for `A - B`, the mean ± std
over seeds of A(seed) - B(seed).
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pose_prep.atomic import nearest_existing

from ..config import MODEL_VARIANTS, ConfigError, differences, load_config, parse_assignments

EVAL_FILE = "eval.json"
JSON_NAME = "compare.json"
SCHEMA = "vsam-compare/1"
# (name in the summary, path into eval.json)
FIGURES = (("group_top1", ("group_top1", "mean")), ("AP", ("AP",)), ("P@k", ("P@k",)), ("R@k", ("R@k",)),
           ("top3_recall", ("top3_recall", "all")), ("category_top1", ("category_top1",)),
           ("attention_correlation", ("attention_correlation",)))


# A variant's name is a folder of OUT/runs/ and a cell of the tables: one plain folder name, never a
# path that leaves OUT/runs/ ("../x", "/tmp/x", "a/b"), a hidden or empty folder, or a line break.
VARIANT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
VARIANT_FORM = "MODEL or NAME=MODEL,KEY=VALUE,... (e.g. lambda1=vsam,loss.heatmap_loss.weight=1)"


class CompareError(ValueError):
    """A comparison that cannot be set up as asked (unknown model, bad variant); says why."""


@dataclass(frozen=True)
class Variant:
    """A model of MODEL_VARIANTS under a name, with config overrides on top of the base config."""
    name: str
    model: str
    overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:      # a Variant built in code is checked as a parsed one
        check_variant_name(self.name)

    @classmethod
    def parse(cls, text: str) -> "Variant":
        """`vsam`, or `NAME=MODEL[,KEY=VALUE...]`, e.g. `vsam-l1=vsam,loss.heatmap_loss.weight=1`."""
        name, _, spec = text.partition("=")
        if "," in name:       # `vsam,train.epochs=1`: overrides without the NAME= they need
            raise CompareError(f"variant {text!r}: overrides need a name first; expected {VARIANT_FORM}")
        parts = [p.strip() for p in spec.split(",")] if spec else [name]
        model, assignments = parts[0], parts[1:]
        if model not in MODEL_VARIANTS:
            raise CompareError(f"variant {text!r}: unknown model {model!r}; known: {', '.join(MODEL_VARIANTS)}")
        try:
            overrides = parse_assignments(assignments)
        except ConfigError as error:
            raise CompareError(f"variant {text!r}: {error}") from None
        return cls(name.strip(), model, overrides)

    def settings(self, seed: int) -> dict:
        return {**MODEL_VARIANTS[self.model], **self.overrides, "train.seed": seed}


def check_variant_name(name: str) -> None:
    """CompareError unless `name` is a plain folder name: letters, digits, `.`, `_`, `-`, not starting
    with `.`, at most 100 characters."""
    if not VARIANT_NAME.fullmatch(name):
        raise CompareError(f"variant name {name!r}: a name is 1 to 100 letters, digits, '.', '_' or '-', not "
                           "starting with '.' (e.g. vsam-groups-500-lambda0), since it names a folder of OUT/runs/")


@dataclass(frozen=True)
class RunSpec:
    """What one child process does: train (or resume) `run_dir`, then evaluate it on `split`."""
    shards: str
    config_file: str | None
    settings: dict
    run_dir: str
    split: str = "val"
    device: str = "cpu"


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / "runs" / variant / f"seed-{seed}"


def run_one(spec: RunSpec) -> dict:
    """Train (resuming whatever the folder holds) and evaluate; writes and returns eval.json."""
    from ..evaluate import evaluate_checkpoint, write_json
    from ..train import main as train_main, resolve_run_config

    folder = Path(spec.run_dir)
    config = resolve_run_config(folder, spec.config_file, spec.settings, resume=True)
    started = time.perf_counter()
    summary = train_main(config, spec.shards, folder, resume=True, device=spec.device)
    train_seconds = time.perf_counter() - started
    metrics = evaluate_checkpoint(summary["checkpoint"], spec.shards, spec.split, device=spec.device)
    metrics["train_seconds_this_process"] = round(train_seconds, 1)
    write_json(metrics, folder / EVAL_FILE)
    return metrics


def _child_command(spec: RunSpec) -> list[str]:
    return [sys.executable, "-m", "vsam_train.experiments.compare", "--run", json.dumps(asdict(spec))]


def _launch(spec: RunSpec, label: str, log) -> tuple[str, int, float]:
    """One run in a child process, its output in run.log; (label, exit code, seconds)."""
    folder = Path(spec.run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log(f"start {label}")
    with open(folder / "run.log", "ab") as output:
        code = subprocess.run(_child_command(spec), stdout=output, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL).returncode
    seconds = time.perf_counter() - started
    log(f"{'done ' if code == 0 else f'FAILED (exit {code}, see {folder}/run.log) '}{label} in {seconds / 60:.1f} min")
    return label, code, seconds


def compare(shards: str | Path, out: str | Path, variants: list[Variant], seeds: list[int], *,
            config_file: str | Path | None = None, settings: dict | None = None, parallel: int = 2,
            device: str = "cpu", log=print, command: list[str] | None = None) -> dict:
    """Train and evaluate every variant for every seed (runs already evaluated are kept), then
    summarise; returns the data written to OUT/compare.json."""
    out = Path(out)
    log = _serialized(log)
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise CompareError(f"variant names must differ: {names}")
    config_file = str(config_file) if config_file else None
    check_setup(shards, out, variants, seeds, config_file, settings)
    jobs = []
    for seed in seeds:                 # seed-major: the models of one seed finish together
        for variant in variants:
            folder = run_dir(out, variant.name, seed)
            run_settings = {**(settings or {}), **variant.settings(seed)}
            if (folder / EVAL_FILE).exists():
                _check_kept_run(folder, config_file, run_settings)
            else:
                jobs.append((RunSpec(str(shards), config_file, run_settings, str(folder), device=device),
                             f"{variant.name} seed {seed}"))
    total = len(variants) * len(seeds)
    log(f"{total - len(jobs)} of {total} runs already evaluated; {len(jobs)} to do, {parallel} at a time")
    data = {"schema": SCHEMA, "command": command, "git_commit": _git_commit(), "shards": str(shards),
            "config_file": config_file,
            "settings": settings or {}, "seeds": seeds, "parallel": parallel,
            "variants": {v.name: {"model": v.model, "overrides": v.overrides} for v in variants},
            "majority": _checked_majority_figures(shards)}
    failed = []

    def finished(result) -> None:
        label, code, _ = result
        if code:
            failed.append(label)
        _save(out, data, variants, seeds)

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        for future in [pool.submit(_launch, spec, label, log) for spec, label in jobs]:
            finished(future.result())
    data = _save(out, data, variants, seeds)
    data["failed"] = failed
    return data


def check_setup(shards: str | Path, out: Path, variants: list[Variant], seeds: list[int],
                config_file: str | Path | None = None, settings: dict | None = None) -> None:
    """CompareError naming the file and the reason for what would make every run fail or the results
    unwritable: an --out that is not a folder, a config that the overrides of some variant or seed
    make invalid, a collection without items to train on or evaluate. Checked before any run starts,
    so that a typo costs no training time and leaves no run folders."""
    problem = output_problem(out, folder=True)
    if problem:
        raise CompareError(f"{out}: {problem}")
    configs = _run_configs(config_file, settings or {}, variants, seeds)
    train_splits = sorted({config["data"]["train_split"] for config in configs})
    _check_collection(shards, train_splits)


def _run_configs(config_file: str | Path | None, settings: dict, variants: list[Variant],
                 seeds: list[int]) -> list[dict]:
    """The config of every run, loaded and validated as the run will load it."""
    try:
        load_config(config_file, settings)    # the file and the common overrides, not to blame on a variant
        return [_variant_config(config_file, settings, variant, seed) for variant in variants for seed in seeds]
    except ConfigError as error:
        raise CompareError(str(error)) from None


def _variant_config(config_file: str | Path | None, settings: dict, variant: Variant, seed: int) -> dict:
    try:
        return load_config(config_file, {**settings, **variant.settings(seed)})
    except ConfigError as error:
        raise ConfigError(f"variant {variant.name}, seed {seed}: {error}") from None


def _check_collection(shards: str | Path, train_splits: list[str]) -> None:
    """CompareError unless `shards` is a readable collection with items in each train split and in val
    (every run is evaluated on val: RunSpec.split)."""
    from pose_prep.shard_format import ShardFormatError, live_rows

    from ..data import read_collection

    splits = [*train_splits, *(["val"] if "val" not in train_splits else [])]
    try:
        read_collection(shards)
        empty = [split for split in splits if not live_rows(shards, (split,))]
    except (ShardFormatError, OSError) as error:
        raise CompareError(str(error)) from None
    if empty:
        raise CompareError(f"{shards}: no items in split {', '.join(empty)}; a comparison trains on "
                           f"{', '.join(train_splits)} and evaluates on val")


def output_problem(path: Path, *, folder: bool) -> str | None:
    """Why `path` cannot be written as a folder (`folder`) or as a file, its missing parent folders
    made; None when it can."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        return "is a folder, not a file" if path.is_dir() else "is a file, not a folder"
    nearest = path if path.is_dir() else nearest_existing(path.parent)
    if not nearest.is_dir():
        return f"{nearest} is a file, not a folder"
    try:        # a real file, since permissions say little (root, read-only mounts, /proc)
        with tempfile.TemporaryFile(dir=nearest):
            pass
    except OSError as error:
        return f"cannot write in {nearest} ({error.strerror or error})"
    return None


def _checked_majority_figures(shards) -> dict | None:
    """`_majority_figures`; a shard it cannot read is a CompareError (nothing has started yet)."""
    from pose_prep.shard_format import ShardFormatError

    try:
        return _majority_figures(shards)
    except ShardFormatError as error:
        raise CompareError(str(error)) from None


def _check_kept_run(folder: Path, config_file: str | None, settings: dict) -> None:
    """An evaluated run is kept only if it was trained with the config asked for now: the same --out with
    a changed variant, --config or --set must not pass old figures off as new ones."""
    try:
        asked, ran = load_config(config_file, settings), load_config(folder / "config.yaml")
    except (ConfigError, OSError) as error:
        raise CompareError(f"{folder}: cannot read the config of this evaluated run ({error})") from None
    changed = differences(ran, asked)
    if changed:
        raise CompareError(f"{folder} was trained with another config ({', '.join(changed)} differ from what is "
                           "asked now): give another --out, or another variant name")


def _serialized(log):
    """`log` for several threads: one whole line at a time."""
    lock = threading.Lock()

    def locked(message: str) -> None:
        with lock:
            log(message)
    return locked


def majority_metrics(train_labels: np.ndarray, val_labels: np.ndarray, vocabulary,
                     train_categories: np.ndarray | None = None, val_categories: np.ndarray | None = None) -> dict:
    """`compute_metrics` of a scorer that gives every val item the train split's positive rate of
    each attribute (so each group's most frequent attribute ranks first) and, with categories, the
    train split's most frequent category: the figure a model must beat to have learned anything.
    Adds "majority_attribute" (per group) and "attribute_rates"."""
    from ..metrics import compute_metrics

    known = train_labels >= 0
    rates = (train_labels == 1).sum(0) / np.maximum(known.sum(0), 1)
    scores = np.broadcast_to(rates, val_labels.shape).copy()
    logits = None
    if vocabulary.categories and train_categories is not None and val_categories is not None:
        counts = np.bincount(train_categories[train_categories >= 0], minlength=len(vocabulary.categories))
        logits = np.broadcast_to(np.log(counts + 1e-9), (len(val_labels), len(counts))).copy()
    metrics = compute_metrics(scores, val_labels, vocabulary, logits, val_categories if logits is not None else None)
    metrics["majority_attribute"] = {group: vocabulary.attributes[idx[int(np.argmax(rates[idx]))]]
                                     for group, idx in vocabulary.group_indices().items()}
    metrics["attribute_rates"] = rates.tolist()
    return metrics


def collection_majority(shards: str | Path, train_split: str = "train", val_split: str = "val") -> dict | None:
    """`majority_metrics` of a shard collection's splits (None when either split is empty)."""
    from pose_prep.shard_format import Shard, live_rows

    from ..data import read_collection

    def labels(split: str) -> tuple[np.ndarray, np.ndarray]:
        attributes, categories = [], []
        for path, rows in live_rows(shards, (split,)).items():
            with Shard(path) as shard:
                data = shard.read(("attributes", "category"))
            attributes.append(data["attributes"][rows])
            categories.append(data["category"][rows])
        return (np.concatenate(attributes), np.concatenate(categories)) if attributes else (None, None)

    (train, train_categories), (val, val_categories) = labels(train_split), labels(val_split)
    if train is None or val is None:
        return None
    return majority_metrics(train, val, read_collection(shards).vocabulary, train_categories, val_categories)


def _save(out: Path, data: dict, variants: list[Variant], seeds: list[int]) -> dict:
    from ..evaluate import write_json

    runs = {v.name: {seed: _read_eval(run_dir(out, v.name, seed)) for seed in seeds} for v in variants}
    data = {**data, **summarize(runs)}
    data["wall_minutes"] = {v.name: {str(s): _train_minutes(run_dir(out, v.name, s)) for s in seeds} for v in variants}
    write_json(data, out / JSON_NAME)
    return data


def _git_commit() -> str | None:
    """The commit of the code that runs (None outside a git checkout)."""
    try:
        done = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def _majority_figures(shards) -> dict | None:
    majority = collection_majority(shards)
    return {**figures(majority), "majority_attribute": majority["majority_attribute"]} if majority else None


def _read_eval(folder: Path) -> dict | None:
    path = folder / EVAL_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _train_minutes(folder: Path) -> float | None:
    """Wall minutes of the training epochs, from metrics.jsonl's throughput (resumes included)."""
    path = folder / "metrics.jsonl"
    if not path.exists():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    seconds = sum(r["train_images"] / r["train_images_per_second"] for r in records
                  if r.get("train_images_per_second"))
    return round(seconds / 60, 1)


# --- summary -----------------------------------------------------------------------------------

def figures(metrics: dict) -> dict[str, float]:
    """The compared figures of one eval.json: FIGURES plus `group_top1/<group>` for each group."""
    values = {}
    for name, path in FIGURES:
        value = metrics
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
            values[name] = float(value)
    for group, value in (metrics.get("group_top1") or {}).items():
        if group != "mean" and value is not None:
            values[f"group_top1/{group}"] = float(value)
    return values


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    array = np.asarray(values, np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
            "n": int(len(array))}


def summarize(runs: dict[str, dict[int, dict | None]]) -> dict:
    """{"per_run": {variant: {seed: figures}}, "models": {variant: {figure: mean_std}},
    "differences": {"A - B": {figure: mean_std of paired differences}}} over the evaluated runs."""
    return summarize_figures({name: {seed: figures(m) for seed, m in by_seed.items() if m is not None}
                              for name, by_seed in runs.items()})


def summarize_figures(per_run: dict[str, dict[int, dict[str, float]]]) -> dict:
    """`summarize` of figures already read (a compare JSON's per_run, with int seeds)."""
    models = {}
    for name, by_seed in per_run.items():
        keys = sorted({k for values in by_seed.values() for k in values})
        models[name] = {k: mean_std([v[k] for v in by_seed.values() if k in v]) for k in keys}
    paired = {}
    for first in per_run:
        for second in per_run:
            shared = sorted(set(per_run[first]) & set(per_run[second]))
            if first == second or not shared:
                continue
            keys = set.intersection(*(set(per_run[name][seed]) for name in (first, second) for seed in shared))
            paired[f"{first} - {second}"] = {
                k: mean_std([per_run[first][s][k] - per_run[second][s][k] for s in shared]) for k in sorted(keys)}
    return {"per_run": {n: {str(s): v for s, v in r.items()} for n, r in per_run.items()}, "models": models,
            "differences": paired}


def format_summary(data: dict, reference: str | None = None) -> str:
    """A markdown table of mean ± std per variant, and one of the differences to `reference`."""
    models = data["models"]
    columns = [name for name, _ in FIGURES if any(name in m for m in models.values())]
    groups = sorted({k for m in models.values() for k in m if k.startswith("group_top1/")})
    columns += groups
    lines = ["| variant | n | " + " | ".join(c.replace("group_top1/", "top-1 ") for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for name, values in models.items():
        n = max((v["n"] for v in values.values()), default=0)
        lines.append(f"| {name} | {n} | " + " | ".join(format_mean_std(values.get(c)) for c in columns) + " |")
    if data.get("majority"):
        lines.append("| majority (train rates) | – | " + " | ".join(
            f"{data['majority'][c]:.3f}" if c in data["majority"] else "–" for c in columns) + " |")
    if reference:
        lines += ["", "| difference (paired by seed) | n | " + " | ".join(
            c.replace("group_top1/", "top-1 ") for c in columns) + " |", "|---|---|" + "---|" * len(columns)]
        for label, values in data["differences"].items():
            if label.endswith(f" - {reference}"):
                n = max((v["n"] for v in values.values()), default=0)
                lines.append(f"| {label} | {n} | " + " | ".join(format_mean_std(values.get(c), signed=True) for c in columns)
                             + " |")
    return "\n".join(lines)


def format_mean_std(value: dict | None, signed: bool = False) -> str:
    """A table cell: `0.723 ± 0.001` (`+0.009 ± 0.003` signed), `–` for no value."""
    if not value:
        return "–"
    return f"{value['mean']:{'+' if signed else ''}.3f} ± {value['std']:.3f}"


if __name__ == "__main__":    # a child of `compare`: one run
    if len(sys.argv) != 3 or sys.argv[1] != "--run":
        sys.exit("usage: python -m vsam_train.experiments.compare --run SPEC_JSON")
    from pose_prep.shard_format import ShardFormatError

    from ..checkpoint import CheckpointError
    from ..evaluate import EvalError
    from ..train import RunFolderError
    try:
        run_one(RunSpec(**json.loads(sys.argv[2])))
    except ConfigError as error:           # as `vsam train`: a config it cannot use is exit 2
        print(f"compare: {error}", file=sys.stderr)
        sys.exit(2)
    except (RunFolderError, ShardFormatError, CheckpointError, EvalError, FloatingPointError, ValueError) as error:
        print(f"compare: {error}", file=sys.stderr)
        sys.exit(1)
