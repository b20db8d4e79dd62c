"""`vsam experiment audit`: does `vsam audit` find label errors? Known ones are injected and counted.

Real catalogs have no list of their label errors, so this experiment makes one:

1. `shards/`: a copy of the collection (`label_noise.copy_collection`) whose TRAINING split carries
   injected errors, drawn with `seed` over the items in path order (so independent of the shard
   layout): a fraction `drop` of the positives of attribute `drop_attribute` set to 0 (missing
   tags), and a fraction `swap` of the items labelled with exactly one attribute of the exclusive
   group `swap_group` (and not dropped) moved to another attribute of that group (a floral dress
   tagged solid), drawn in proportion to how often the group's other attributes are labelled
   (`swap_to` "frequency": wrong tags lean to the common ones, and the rarity of a label then says
   nothing about whether it is wrong) or uniformly ("uniform": most wrong labels are then rare
   attributes, so a ranking that flags rare labels finds them without looking at the photo).
   `errors.json` lists them.
2. `runs/<model>/seed-<seed>/`: each model trained on the corrupted labels by the comparison core
   (`compare.compare`: `vsam train` in a child process per run, evaluated on val; a killed
   experiment continues where it stopped when rerun with the same options).
3. `audit/<model>/`: `vsam audit` of the corrupted training split with the trained model (the
   default calibration; audit.csv, index.html, summary.json), and its ranking under every method of
   METHODS, scored against the injected errors.

An injected error counts as found at the first ranked row that points at it: for a dropped label,
the row of that item and attribute; for a swap (true b, labelled a), a row of that item that
questions a or proposes b. precision@N is the number of distinct errors found in the top N rows
over N (a row that points at an error already found, or at none, costs a review and finds nothing);
recall@N the same number over all injected errors; AP the mean, over the errors, of the precision at
the rank where each is found (0 for one never found). Rows that point at real errors of the
original labels count as misses, so the overall figures also measure how many real errors a method
puts first; "within" repeats them per error kind over the rows of its target only (the dropped
attribute's rows, the swap group's attributes' rows), as a reviewer of that attribute sees them.
The baselines: the same rows in a random order (the mean of RANDOM_DRAWS seeded orders) and ranked
by the model's raw scores ("raw", no calibration).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..audit import CALIBRATIONS, Ranking, rank_labels, score_split, write_audit
from ..config import load_config
from ..data import read_collection
from ..evaluate import write_json
from .compare import Variant, compare, run_dir
from .label_noise import ExperimentError, choose_dropped, copy_collection, split_labels

METHODS = (*CALIBRATIONS, "random")      # platt (the audit's default), isotonic, raw, random
DEFAULT_NS = (25, 50, 100, 200, 400)
RANDOM_DRAWS = 20
ERRORS_FILE = "errors.json"
JSON_NAME = "audit_experiment.json"
TABLE_NAME = "audit_experiment.md"
SCHEMA = "vsam-audit-experiment/1"


# --- the errors --------------------------------------------------------------------------------

SWAP_TO = ("frequency", "uniform")


def inject(paths: list[str], labels: np.ndarray, vocabulary, *, drop_attribute: str, drop: float,
           swap_group: str | None, swap: float, seed: int, swap_to: str = "frequency"
           ) -> tuple[list[dict], dict[str, np.ndarray]]:
    """(errors, {path: corrupted label row}) for the training items `paths` with `labels`.

    An error is {"path", "kind": "dropped", "attribute"} or {"path", "kind": "swapped",
    "attribute": the attribute now labelled, "true_attribute"}; sorted by kind, then path."""
    names = vocabulary.attributes
    attribute = names.index(drop_attribute)
    rows = {path: np.array(row, np.int8) for path, row in zip(paths, labels)}
    errors, changed = [], {}
    for path in choose_dropped(paths, labels, attribute, drop, seed):
        changed.setdefault(path, rows[path].copy())[attribute] = 0
        errors.append({"path": path, "kind": "dropped", "attribute": drop_attribute})
    if swap_group is not None and swap > 0:
        members = vocabulary.group_indices()[swap_group]
        dropped = set(changed)
        pool = sorted(path for path in paths if (rows[path][members] == 1).sum() == 1 and path not in dropped)
        rng = np.random.default_rng([seed, 1])
        counts = (labels[:, members] == 1).sum(0)
        for index in sorted(rng.choice(len(pool), size=int(round(swap * len(pool))), replace=False)):
            path = pool[index]
            row = changed.setdefault(path, rows[path].copy())
            true = next(a for a in members if row[a] == 1)
            others = [i for i, a in enumerate(members) if a != true]
            weights = counts[others].astype(np.float64) if swap_to == "frequency" else np.ones(len(others))
            weights = weights / weights.sum() if weights.sum() > 0 else np.full(len(others), 1 / len(others))
            new = members[others[int(rng.choice(len(others), p=weights))]]
            row[true], row[new] = 0, 1
            errors.append({"path": path, "kind": "swapped", "attribute": names[new], "true_attribute": names[true]})
    return errors, changed


def write_corrupted_copy(source, target: Path, changed: dict[str, np.ndarray], split: str) -> int:
    """The collection `source` copied to `target` with the `split` items' labels of `changed`."""
    def corrupt(item) -> bool:
        if item.split == split and item.path in changed:
            item.attributes = changed[item.path].copy()
            return True
        return False

    return copy_collection(source, target, corrupt)


# --- scoring a ranking against them ------------------------------------------------------------

def found_curve(item: np.ndarray, attribute: np.ndarray, errors: list[dict], paths: list[str],
                names: list[str]) -> np.ndarray:
    """found[k]: how many distinct errors the rows 0..k of a ranking (its item and attribute
    arrays, in rank order) point at (see the module docstring)."""
    n_attributes = len(names)
    index = {path: i for i, path in enumerate(paths)}
    lookup = np.full(len(paths) * n_attributes, -1, np.int64)
    for number, error in enumerate(errors):
        cells = [error["attribute"]] + ([error["true_attribute"]] if error["kind"] == "swapped" else [])
        for name in cells:
            lookup[index[error["path"]] * n_attributes + names.index(name)] = number
    hits = lookup[np.asarray(item) * n_attributes + np.asarray(attribute)]
    first = np.full(len(errors), len(hits), np.int64)
    np.minimum.at(first, hits[hits >= 0], np.flatnonzero(hits >= 0))
    return np.cumsum(np.bincount(first[first < len(hits)], minlength=len(hits))[:len(hits)])


def curve_summary(found: np.ndarray, n_errors: int, ns: tuple[int, ...]) -> dict:
    """precision@N and recall@N at each N (capped at the number of rows), and AP."""
    positions = np.flatnonzero(np.diff(np.r_[0, found]) > 0)            # where each found error is found
    precision_there = found[positions] / (positions + 1)
    summary = {"AP": float(precision_there.sum() / n_errors) if n_errors else None, "at": {}}
    for n in ns:
        k = min(n, len(found))
        summary["at"][str(n)] = {"precision": float(found[k - 1] / k) if k else None,
                                 "recall": float(found[k - 1] / n_errors) if n_errors else None}
    return summary


def score_methods(scores: np.ndarray, labels: np.ndarray, vocabulary, paths: list[str], errors: list[dict],
                  ns: tuple[int, ...], seed: int = 0, targets: dict[str, list[int]] | None = None,
                  ranked: dict[str, Ranking] | None = None) -> dict:
    """Every method of METHODS on the same judged rows: curve_summary overall, per error kind
    ("by_kind") and per error kind over the rows of its `targets` attributes only ("within");
    "random": the mean of the summaries of RANDOM_DRAWS seeded orders. `ranked`: rankings already
    made by rank_labels of these scores and paths, by method (the audit's own), not made again."""
    names = vocabulary.attributes
    groups = {"all": errors, **{kind: [e for e in errors if e["kind"] == kind] for kind in ("dropped", "swapped")}}

    def summaries(item: np.ndarray, attribute: np.ndarray) -> dict:
        found = {name: curve_summary(found_curve(item, attribute, group, paths, names), len(group), ns)
                 for name, group in groups.items() if group}
        within = {}
        for kind, attributes in (targets or {}).items():
            if groups.get(kind):
                rows = np.isin(attribute, attributes)
                within[kind] = curve_summary(found_curve(item[rows], attribute[rows], groups[kind], paths, names),
                                             len(groups[kind]), ns)
        return {**found.pop("all"), "by_kind": found, "within": within}

    results, rows = {}, None
    for method in CALIBRATIONS:
        ranking = (ranked or {}).get(method)
        if ranking is None:
            ranking = rank_labels(scores, labels, vocabulary, calibration=method, paths=paths)
        rows = ranking if rows is None else rows
        results[method] = summaries(ranking.item, ranking.attribute)
    draws = [np.random.default_rng([seed, 2, draw]).permutation(len(rows)) for draw in range(RANDOM_DRAWS)]
    results["random"] = _mean([summaries(rows.item[order], rows.attribute[order]) for order in draws])
    results["n_rows"] = len(rows)
    return results


def _mean(summaries: list):
    """The element-wise mean of equally shaped nested dicts of numbers (None stays None)."""
    first = summaries[0]
    if isinstance(first, dict):
        return {key: _mean([s[key] for s in summaries]) for key in first}
    return None if first is None else float(np.mean(summaries))


# --- the experiment ----------------------------------------------------------------------------

def run(shards: str | Path, out: str | Path, *, drop_attribute: str, drop: float = 0.10, swap_group: str | None = None,
        swap: float = 0.05, swap_to: str = "frequency", config_file: str | Path | None = None,
        overrides: dict | None = None, seed: int = 0,
        models=("vsam", "vgg16"), parallel: int = 2, device: str = "cpu", ns: tuple[int, ...] = DEFAULT_NS,
        gallery: int = 6, log=print, command: list[str] | None = None) -> dict:
    """The whole experiment (see the module docstring); returns what audit_experiment.json holds."""
    out = Path(out)
    overrides = dict(overrides or {})
    config = load_config(config_file, overrides)
    split = config["data"]["train_split"]
    vocabulary = read_collection(shards).vocabulary
    _check_choices(shards, vocabulary, drop_attribute, drop, swap_group, swap, swap_to)
    settings = {"shards": str(shards), "split": split, "drop_attribute": drop_attribute, "drop": drop,
                "swap_group": swap_group, "swap": swap, "swap_to": swap_to, "seed": seed}
    targets = {"dropped": [vocabulary.attributes.index(drop_attribute)],
               "swapped": vocabulary.group_indices().get(swap_group, []) if swap_group else []}
    errors = _corrupted_collection(shards, out, settings, vocabulary, log)
    if not errors:
        raise ExperimentError(f"{shards}: the fractions chosen inject no error into split {split!r}; raise them")
    variants = [Variant.parse(name) for name in models]
    trained = compare(out / "shards", out, variants, [seed], config_file=config_file, settings=overrides,
                      parallel=parallel, device=device, log=log, command=command)
    if trained["failed"]:
        raise ExperimentError(f"training failed: {', '.join(trained['failed'])} (see {out}/runs/*/seed-{seed}/run.log)")
    report = {"schema": SCHEMA, "command": command, "settings": settings,
              "config_file": config_file and str(config_file),
              "overrides": overrides, "ns": list(ns),
              "injected": {"total": len(errors), **{kind: sum(e["kind"] == kind for e in errors)
                                                    for kind in ("dropped", "swapped")}},
              "models": {}}
    for variant in variants:
        checkpoint = run_dir(out, variant.name, seed) / "checkpoints" / "last.pt"
        log(f"audit {variant.name}")
        audited = score_split(checkpoint, out / "shards", split, device=device,
                              workers=config["data"]["num_workers"])
        audit_folder = out / "audit" / variant.name
        write_audit(audited, checkpoint, out / "shards", audit_folder, split=split, calibration=CALIBRATIONS[0],
                    top=50, gallery=gallery, device=device)
        report["models"][variant.name] = {
            "checkpoint": str(checkpoint), "audit": str(audit_folder),
            "val": trained["per_run"].get(variant.name, {}).get(str(seed), {}),
            "methods": score_methods(audited.scores, audited.labels, audited.vocabulary, audited.paths, errors, ns,
                                     seed, targets, ranked={CALIBRATIONS[0]: audited.ranking})}
    write_json(report, out / JSON_NAME)
    (out / TABLE_NAME).write_text(format_table(report) + "\n", encoding="utf-8")
    return report


def _check_choices(shards, vocabulary, drop_attribute, drop, swap_group, swap, swap_to) -> None:
    if drop_attribute not in vocabulary.attributes:
        raise ExperimentError(f"{shards} has no attribute {drop_attribute!r}; it has "
                              f"{', '.join(vocabulary.attributes)}")
    if not (0 <= drop <= 1 and 0 <= swap <= 1):
        raise ExperimentError(f"--drop and --swap are fractions in [0, 1], not {drop} and {swap}")
    if swap_to not in SWAP_TO:
        raise ExperimentError(f"--swap-to is one of {', '.join(SWAP_TO)}, not {swap_to!r}")
    if swap_group is None:
        return
    groups = vocabulary.group_indices()
    if not vocabulary.exclusive_groups or len(groups.get(swap_group, [])) < 2:
        exclusive = ", ".join(g for g, members in groups.items() if len(members) > 1) if vocabulary.exclusive_groups \
            else "none: its groups are not mutually exclusive"
        raise ExperimentError(f"{shards}: no exclusive group {swap_group!r} of two or more attributes to swap "
                              f"within (exclusive groups: {exclusive})")


def _corrupted_collection(shards, out: Path, settings: dict, vocabulary, log) -> list[dict]:
    """The injected errors; writes out/shards and out/errors.json unless a previous run of the same
    settings did (a rerun continues the experiment)."""
    errors_file = out / ERRORS_FILE
    if errors_file.exists():
        previous = json.loads(errors_file.read_text(encoding="utf-8"))
        if previous.get("settings") != settings:
            raise ExperimentError(f"{out} holds an experiment with other settings ({previous.get('settings')}): "
                                  "choose a new --out")
        log(f"continuing {out}: {len(previous['errors'])} injected errors")
        return previous["errors"]
    if out.exists() and any(out.iterdir()):
        raise ExperimentError(f"{out} is not empty: choose a new --out for each experiment")
    paths, labels, _ = split_labels(shards, settings["split"])
    errors, changed = inject(paths, labels, vocabulary, drop_attribute=settings["drop_attribute"],
                             drop=settings["drop"], swap_group=settings["swap_group"], swap=settings["swap"],
                             seed=settings["seed"], swap_to=settings["swap_to"])
    out.mkdir(parents=True, exist_ok=True)
    if (out / "shards").exists():         # a copy interrupted before errors.json: ours, redo it
        import shutil
        shutil.rmtree(out / "shards")
    write_corrupted_copy(shards, out / "shards", changed, settings["split"])
    write_json({"settings": settings, "errors": errors}, errors_file)
    log(f"injected {len(errors)} errors into {len(paths)} {settings['split']} items: {out / 'shards'}")
    return errors


def format_table(report: dict) -> str:
    """Markdown: one row per model and method, AP and precision/recall at each N over every row, then
    AP and precision at each N of each error kind within its target's rows."""
    ns, settings, injected = report["ns"], report["settings"], report["injected"]
    lines = [f"{injected['total']} injected errors ({injected['dropped']} dropped {settings['drop_attribute']} labels, "
             f"{injected['swapped']} swaps within {settings['swap_group']}, drawn by {settings['swap_to']}); "
             "every judged row:", "",
             "| model | ranking | AP | " + " | ".join(f"P@{n} | R@{n}" for n in ns) + " |",
             "|---|---|---|" + "---|---|" * len(ns)]
    for model, result in report["models"].items():
        for method in METHODS:
            figures = result["methods"][method]
            cells = [f"{figures['at'][str(n)]['precision']:.3f} | {figures['at'][str(n)]['recall']:.3f}" for n in ns]
            lines.append(f"| {model} | {method} | {figures['AP']:.3f} | " + " | ".join(cells) + " |")
    kinds = [k for k in ("dropped", "swapped") if injected[k]]
    header = ["model", "ranking"] + [f"{k} {what}" for k in kinds for what in ("AP", *(f"P@{n}" for n in ns[:3]))]
    lines += ["", "Within each error kind's target (the dropped attribute's rows, the swap group's rows):", "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, result in report["models"].items():
        for method in METHODS:
            within = result["methods"][method]["within"]
            cells = []
            for kind in kinds:
                cells.append(f"{within[kind]['AP']:.3f}")
                cells += [f"{within[kind]['at'][str(n)]['precision']:.3f}" for n in ns[:3]]
            lines.append(f"| {model} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
