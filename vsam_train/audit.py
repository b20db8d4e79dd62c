"""`vsam audit`: the labels of a collection that a trained model disagrees with, most suspect first.

Every label of every item of one split is judged once, by one row of one of three kinds:

* **missing**: the attribute is false or unknown, and the model scores it high;
* **wrong**: the attribute is true, and the model scores it low;
* **swap** (vocabularies whose groups are mutually exclusive, e.g. the DeepFashion attribute subset:
  exactly one texture, sleeve, ... per garment): an item labelled with exactly one attribute of a
  group is judged once for the whole group; the row names the labelled attribute and `suggested`,
  the group's attribute the model scores highest among the others. Its other attributes in that
  group are not judged again as missing, nor the labelled one as wrong: in an exclusive group, a
  missing attribute and a wrong one are the two halves of one swap. An item with no or several
  positives in an exclusive group has each of that group's labels judged alone.

The score of a row (its suspicion, in [0, 1]; 0.5 = no evidence either way) says how strongly the
model's scores speak against the label: missing p, wrong 1 - p, swap sigmoid(logit p_b - logit p_a)
= odds_b / (odds_a + odds_b), where p is the attribute's calibrated probability, a the labelled
attribute and b the suggested one. The calibration (`calibrate`) is per attribute and PRIOR-FREE:
positives and negatives weigh the same in its fit, so that p / (1 - p) estimates the likelihood
ratio P(score | present) / P(score | absent). Raw scores cannot be compared across attributes (the
focal loss, gamma 2 and alpha 0.6, squeezes them towards the middle by an amount that depends on each
attribute's base rate), and a posterior with the base rate in it ranks first every label of a rare
attribute in a group the model has not learned (an uninformative score leaves a rare attribute its
prior, a few %): in the injected-error experiment that filled the top 400 with such rows and found
half as many errors as the raw scores (docs/audit.md). Methods: Platt scaling (default: a logistic
regression on the score's logit, two parameters per attribute that stay stable in the upper tail
where the suspects are), isotonic regression (any monotone distortion, but a step function whose top
step rests on the few highest-scored items, and a tie for every item on a step), or none ("raw", a
baseline of `vsam experiment audit`). The calibration is cross-fitted: the items are split into
`folds` folds (seeded, by path order) and each fold's probabilities come from a fit on the other
folds' known labels, so that an item's own (possibly wrong) label never pulls its own score.

Rows are ranked by score (ties by the same score computed from the raw model scores, then item and
attribute order); each row also has its rank among the rows of its attribute. The outputs
(`write_audit`) are audit.csv (the rows ranked within the top `top` of their attribute), index.html
(a gallery of each attribute's top rows with the stored photo, Ŝ and Grad-CAM overlays drawn by
`vsam explain`'s code) and summary.json.
"""
from __future__ import annotations

import csv
import html
import io
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pose_prep.atomic import atomic_write_text
from pose_prep.images import BadImage, decode, printable_name

from .inference import ModelInfo

KINDS = ("missing", "wrong", "swap")
MISSING, WRONG, SWAP = range(3)
CALIBRATIONS = ("platt", "isotonic", "raw")
FOLDS = 5
LABEL_TEXT = {1: "true", 0: "false", -1: "unknown"}
CSV_COLUMNS = ("rank", "path", "attribute", "label", "kind", "score", "suggested", "model_score",
               "suggested_model_score", "attribute_rank")
SCHEMA = "vsam-audit/1"
GALLERY_MAPS = ("attention", "gradcam")      # of explain.MAPS


class AuditError(ValueError):
    """Options the audit cannot honour (an --out that holds something else); the message says why."""


# --- calibration -------------------------------------------------------------------------------

def folds_of(paths: list[str], folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """Fold number (0 .. folds-1) of each item: a seeded permutation of the items in path order, so
    that the folds depend neither on the shard layout nor on the labels."""
    order = np.argsort(np.asarray(paths, dtype=object), kind="stable")
    position = np.empty(len(paths), np.int64)
    position[order] = np.random.default_rng(seed).permutation(len(paths))
    return position % max(1, folds)


def calibrate(scores: np.ndarray, labels: np.ndarray, method: str = "platt", *, fold: np.ndarray | None = None
              ) -> np.ndarray:
    """(N, A) model scores → (N, A) prior-free probabilities that the attribute is present: per
    attribute, fitted with the positives and negatives weighted equally (class_weight "balanced"), so
    that p / (1 - p) estimates the likelihood ratio P(score | present) / P(score | absent), whatever
    the attribute's base rate. Cross-fitted: the items of fold f get a fit on the known labels (0 or 1)
    of the other folds. "raw": the scores as they are. Without a fold (or with a single one) or where a
    fit has no known label, the raw score stays; where the other folds hold one class only, 0.5 (no
    evidence either way)."""
    scores = np.asarray(scores, np.float64)
    if method == "raw":
        return scores.copy()
    if method not in CALIBRATIONS:
        raise AuditError(f"unknown calibration {method!r}; choose one of {', '.join(CALIBRATIONS)}")
    calibrated = scores.copy()
    fold = np.zeros(len(scores), np.int64) if fold is None else np.asarray(fold)
    if len(np.unique(fold)) < 2:
        return calibrated
    for attribute in range(scores.shape[1]):
        known = labels[:, attribute] >= 0
        for f in np.unique(fold):
            held, fit = fold == f, known & (fold != f)
            if fit.any() and held.any():
                calibrated[held, attribute] = _fit_predict(method, scores[fit, attribute],
                                                           labels[fit, attribute] == 1, scores[held, attribute])
    return calibrated


def _fit_predict(method: str, x: np.ndarray, y: np.ndarray, new_x: np.ndarray) -> np.ndarray:
    if y.all() or not y.any():
        return np.full(len(new_x), 0.5)
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression
        from sklearn.utils.class_weight import compute_sample_weight

        return IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(
            x, y, sample_weight=compute_sample_weight("balanced", y)).predict(new_x)
    from sklearn.linear_model import LogisticRegression     # Platt scaling: a logistic curve on the logit

    model = LogisticRegression(solver="newton-cholesky", class_weight="balanced")   # newton: 10x lbfgs here
    return model.fit(_logit(x)[:, None], y).predict_proba(_logit(new_x)[:, None])[:, 1]


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


# --- judging and ranking -----------------------------------------------------------------------

@dataclass
class Ranking:
    """Every label judged once, most suspect first: row-aligned arrays."""
    item: np.ndarray             # index into the audited items
    attribute: np.ndarray        # the label in question
    kind: np.ndarray             # index into KINDS
    suggested: np.ndarray        # swap: the group's attribute the model prefers; -1 otherwise
    score: np.ndarray            # suspicion in [0, 1], 0.5 no evidence: how strongly the scores speak against the label
    attribute_rank: np.ndarray   # 1-based rank among the rows of the same attribute

    def __len__(self) -> int:
        return len(self.item)

    def take(self, rows: np.ndarray) -> "Ranking":
        return Ranking(*(getattr(self, name)[rows] for name in self.__dataclass_fields__))


def judge(probabilities: np.ndarray, labels: np.ndarray, vocabulary) -> dict[str, np.ndarray]:
    """One row per judgement (see the module docstring), unsorted: item, attribute, kind, suggested,
    score. Which cells form which row depends on the labels only, so two calls with the same labels
    give the rows in the same order."""
    labels = np.asarray(labels)
    n_items, n_attributes = labels.shape
    covered = np.zeros((n_items, n_attributes), bool)       # cells judged within a swap row
    parts = []
    if vocabulary.exclusive_groups:
        for members in vocabulary.group_indices().values():
            if len(members) > 1:
                parts.append(_swaps(probabilities, labels, np.asarray(members), covered))
    items, attributes = np.nonzero(~covered)
    p = probabilities[items, attributes]
    true = labels[items, attributes] == 1
    parts.append({"item": items, "attribute": attributes, "kind": np.where(true, WRONG, MISSING),
                  "suggested": np.full(len(items), -1), "score": np.where(true, 1 - p, p)})
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def _swaps(probabilities: np.ndarray, labels: np.ndarray, members: np.ndarray, covered: np.ndarray) -> dict:
    """The swap rows of one exclusive group: its items labelled with exactly one of its attributes."""
    positive = labels[:, members] == 1
    items = np.flatnonzero(positive.sum(1) == 1)
    column = positive[items].argmax(1)                        # the labelled attribute's place in the group
    p = probabilities[np.ix_(items, members)]
    others = p.copy()
    others[np.arange(len(items)), column] = -np.inf
    preferred = others.argmax(1)
    covered[np.ix_(items, members)] = True
    rows = np.arange(len(items))
    score = _sigmoid(_logit(p[rows, preferred]) - _logit(p[rows, column]))
    return {"item": items, "attribute": members[column], "kind": np.full(len(items), SWAP),
            "suggested": members[preferred], "score": score}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def rank_labels(scores: np.ndarray, labels: np.ndarray, vocabulary, *, calibration: str = "platt",
                paths: list[str] | None = None, folds: int = FOLDS, seed: int = 0) -> Ranking:
    """Judge every label with the `calibration` of the model's (N, A) `scores` and rank the rows."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    fold = folds_of(paths if paths is not None else [f"{i:012d}" for i in range(len(scores))], folds, seed)
    rows = judge(calibrate(scores, labels, calibration, fold=fold), labels, vocabulary)
    tiebreak = judge(scores, labels, vocabulary)["score"]
    order = np.lexsort((rows["attribute"], rows["item"], -tiebreak, -rows["score"]))
    rows = {key: value[order] for key, value in rows.items()}
    attribute_rank = np.empty(len(order), np.int64)
    for attribute in np.unique(rows["attribute"]):
        where = np.flatnonzero(rows["attribute"] == attribute)
        attribute_rank[where] = np.arange(1, len(where) + 1)
    return Ranking(rows["item"], rows["attribute"], rows["kind"], rows["suggested"], rows["score"], attribute_rank)


# --- the audit of a checkpoint and a collection ------------------------------------------------

@dataclass
class AuditResult:
    ranking: Ranking
    paths: list[str]
    labels: np.ndarray           # (N, A) as stored
    scores: np.ndarray           # (N, A) the model's sigmoid scores
    vocabulary: object
    info: ModelInfo


def score_split(checkpoint: str | Path, shards: str | Path, split: str = "train", *, calibration: str = "platt",
                batch_size: int | None = None, device: str | None = None, workers: int = 0) -> AuditResult:
    """Score every item of `split` (no pose detector: the stored images) and rank its labels."""
    from .evaluate import EvalError, predict_split

    if calibration not in CALIBRATIONS:
        raise AuditError(f"unknown calibration {calibration!r}; choose one of {', '.join(CALIBRATIONS)}")
    result, info = predict_split(checkpoint, shards, split, batch_size=batch_size, device=device, workers=workers)
    if result["attribute_scores"] is None:
        raise EvalError(f"{checkpoint}: the model has no attribute head, there are no attribute labels to audit")
    scores, labels = result["attribute_scores"], result["attribute_labels"]
    ranking = rank_labels(scores, labels, info.vocabulary, calibration=calibration, paths=result["paths"])
    return AuditResult(ranking, list(result["paths"]), labels, scores, info.vocabulary, info)


def run(checkpoint: str | Path, shards: str | Path, out: str | Path, *, split: str = "train",
        calibration: str = "platt", top: int = 50, gallery: int = 6, batch_size: int | None = None,
        device: str | None = None, workers: int = 2, progress: bool = False) -> dict:
    """`vsam audit`: score, rank and write OUT/audit.csv, OUT/index.html, OUT/summary.json; returns the summary."""
    out = Path(out)
    _check_out(out)
    audited = score_split(checkpoint, shards, split, calibration=calibration, batch_size=batch_size, device=device,
                          workers=workers)
    return write_audit(audited, checkpoint, shards, out, split=split, calibration=calibration, top=top,
                       gallery=gallery, device=device, progress=progress)


def _check_out(out: Path) -> None:
    """--out is new, empty, or a previous audit's folder (its summary.json says so), which is replaced."""
    if not out.exists():
        return
    if not out.is_dir():
        raise AuditError(f"--out {out} is a file, not a folder")
    if any(out.iterdir()) and _schema(out / "summary.json") != SCHEMA:
        raise AuditError(f"--out {out} holds files that are not a vsam audit: choose a new or empty folder")


def _schema(path: Path) -> str | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("schema")
    except (OSError, ValueError, AttributeError):
        return None


def listed_rows(ranking: Ranking, top: int) -> np.ndarray:
    """Row numbers written to audit.csv: each attribute's `top` most suspect (every row with 0), in
    rank order. They include the `top` most suspect rows overall."""
    return np.arange(len(ranking)) if top == 0 else np.flatnonzero(ranking.attribute_rank <= top)


def write_audit(audited: AuditResult, checkpoint, shards, out: Path, *, split: str, calibration: str, top: int,
                gallery: int, device: str | None = None, progress: bool = False) -> dict:
    """audit.csv, index.html (with images/) and summary.json into `out` (replacing a previous audit)."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "images", ignore_errors=True)          # a previous audit's pictures (summary.json checked)
    ranking = audited.ranking
    listed = listed_rows(ranking, top)
    atomic_write_text(out / "audit.csv", csv_text(audited, listed))
    shown = np.sort(np.flatnonzero(ranking.attribute_rank <= gallery)) if gallery else np.zeros(0, np.int64)
    entries = render_gallery(audited, checkpoint, shards, split, shown, out, device=device, progress=progress)
    summary = summarize(audited, listed, shown, checkpoint=checkpoint, shards=shards, split=split,
                        calibration=calibration, top=top, gallery=gallery)
    write_gallery_page(out / "index.html", audited, entries, summary)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    return summary


# --- audit.csv ---------------------------------------------------------------------------------

def spreadsheet_text(text: str) -> str:
    """A cell as text for a spreadsheet: control characters escaped (one row per line, as
    printable_name writes names), and a leading = + - @ guarded by a ' so that no spreadsheet runs
    a file name as a formula (OWASP's advice on CSV injection)."""
    text = printable_name(text)
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


def csv_rows(audited: AuditResult, rows: np.ndarray):
    """The CSV_COLUMNS values of each row, as the CSV holds them (before the spreadsheet guard)."""
    r, names = audited.ranking, audited.vocabulary.attributes
    for row in rows:
        item, attribute, suggested = int(r.item[row]), int(r.attribute[row]), int(r.suggested[row])
        yield (int(row) + 1, audited.paths[item], names[attribute], LABEL_TEXT[int(audited.labels[item, attribute])],
               KINDS[r.kind[row]], f"{r.score[row]:.4f}", names[suggested] if suggested >= 0 else "",
               f"{audited.scores[item, attribute]:.4f}",
               f"{audited.scores[item, suggested]:.4f}" if suggested >= 0 else "", int(r.attribute_rank[row]))


def csv_text(audited: AuditResult, rows: np.ndarray) -> str:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\r\n")       # RFC 4180
    writer.writerow(CSV_COLUMNS)
    for values in csv_rows(audited, rows):
        writer.writerow([spreadsheet_text(v) if isinstance(v, str) else v for v in values])
    return buffer.getvalue()


# --- summary.json ------------------------------------------------------------------------------

def _row_summary(audited: AuditResult, row: int) -> dict:
    values = dict(zip(CSV_COLUMNS, next(csv_rows(audited, np.array([row])))))
    for key in ("score", "model_score", "suggested_model_score"):
        values[key] = float(values[key]) if values[key] != "" else None
    values["suggested"] = values["suggested"] or None
    return values


def summarize(audited: AuditResult, listed: np.ndarray, shown: np.ndarray, **settings) -> dict:
    r, names, info = audited.ranking, audited.vocabulary.attributes, audited.info
    per_attribute = {}
    for index, name in enumerate(names):
        rows = np.flatnonzero(r.attribute == index)
        per_attribute[name] = {
            "judged": int(len(rows)), "listed": int(np.isin(rows, listed).sum()),
            "by_kind": {kind: int((r.kind[rows] == k).sum()) for k, kind in enumerate(KINDS)},
            "top": [_row_summary(audited, int(row)) for row in rows[:5]]}
    return {
        "schema": SCHEMA, "checkpoint": str(settings["checkpoint"]), "model": info.model_name,
        "epoch": info.epoch, "shards": str(settings["shards"]), "split": settings["split"],
        "calibration": settings["calibration"], "folds": FOLDS, "n_items": len(audited.paths),
        "n_labels": int(audited.labels.size), "n_judged": len(r),
        "by_kind": {kind: int((r.kind == k).sum()) for k, kind in enumerate(KINDS)},
        "csv_rows": int(len(listed)), "top_per_attribute": settings["top"],
        "gallery_per_attribute": settings["gallery"], "gallery_rows": int(len(shown)),
        "overall_top": [_row_summary(audited, row) for row in range(min(20, len(r)))],
        "attributes": per_attribute,
        "files": {"csv": "audit.csv", "gallery": "index.html", "summary": "summary.json"},
    }


# --- index.html --------------------------------------------------------------------------------

@dataclass
class GalleryEntry:
    row: int
    input_file: str | None       # relative to the output folder; None when the stored image failed
    panels: list
    error: str = ""


def stored_images(shards: str | Path, split: str, wanted: set[str]) -> dict[str, bytes]:
    """The stored (encoded) image of each item of `split` whose path is in `wanted`."""
    from pose_prep.shard_format import Shard, live_rows

    found = {}
    for shard_path, rows in live_rows(shards, (split,)).items():
        with Shard(shard_path) as shard:
            paths = shard.read(("path",))["path"]
            offsets = shard.read(("image_offsets",))["image_offsets"]
            for row in rows:
                if paths[row] in wanted:
                    found[paths[row]] = shard.image(int(row), offsets)
    return found


def render_gallery(audited: AuditResult, checkpoint, shards, split: str, rows: np.ndarray, out: Path, *,
                   device: str | None = None, progress: bool = False) -> list[GalleryEntry]:
    """For each row: the stored photo, Ŝ and the Grad-CAM of the questioned attribute (and of the
    suggested one for a swap), drawn by `vsam explain`'s explain_model into images/<rank>-<name>/."""
    from tqdm import tqdm

    from .checkpoint import inference_device, load_for_inference
    from .explain import PNG_COMPRESSION, display_image, explain_model, prepare_for_gradients, safe_name

    if not len(rows):
        return []
    r = audited.ranking
    device = inference_device(device)
    model, info = load_for_inference(checkpoint, device)
    prepare_for_gradients(model)
    images = stored_images(shards, split, {audited.paths[int(r.item[row])] for row in rows})
    entries = []
    for row in tqdm(rows, desc="gallery", unit="img", disable=not progress, file=sys.stderr):
        path = audited.paths[int(r.item[row])]
        folder = out / "images" / f"{row + 1:06d}-{safe_name(Path(path).stem)}"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            rgb = decode(images[path], path).rgb
        except BadImage as error:        # a damaged stored JPEG: named in the gallery, the rest goes on
            entries.append(GalleryEntry(int(row), None, [], error.reason))
            continue
        display_image(rgb).save(folder / "input.png", compress_level=PNG_COMPRESSION)
        attributes = [int(r.attribute[row])] + ([int(r.suggested[row])] if r.suggested[row] >= 0 else [])
        column = explain_model(model, info, rgb, attributes, 1, folder, out, "model", "", device, maps=GALLERY_MAPS)
        entries.append(GalleryEntry(int(row), (folder / "input.png").relative_to(out).as_posix(), column.panels))
    return entries


def write_gallery_page(path: Path, audited: AuditResult, entries: list[GalleryEntry], summary: dict) -> None:
    """index.html: one section per attribute with its top rows (photo, label, score, overlays),
    a table of contents linking them; relative links only, every text escaped."""
    from .explain import figure_html, html_head, link

    e, r, names = html.escape, audited.ranking, audited.vocabulary.attributes
    by_attribute: dict[int, list[GalleryEntry]] = {}
    for entry in entries:
        by_attribute.setdefault(int(r.attribute[entry.row]), []).append(entry)
    parts = [html_head("vsam audit", _STYLE),
             f"<h1>vsam audit</h1><p>{e(summary['model'])} (epoch {summary['epoch']}) on split "
             f"{e(summary['split'])} of {e(summary['shards'])}: {summary['n_items']} items, "
             f"{summary['n_judged']} judgements ({', '.join(f'{n} {k}' for k, n in summary['by_kind'].items())}), "
             f"calibration {e(summary['calibration'])}. Score: 0.5 the model's scores say nothing, 1 they speak "
             "strongly against the label (prior-free: a rare label is not suspect for being rare). "
             f'All ranked rows: <a href="{link("audit.csv")}">audit.csv</a>.</p>\n<p>'
             + " · ".join(f'<a href="#attribute-{a}">{e(names[a])}</a>' for a in sorted(by_attribute)) + "</p>\n"]
    for attribute in sorted(by_attribute):
        parts.append(f'<h2 id="attribute-{attribute}">{e(names[attribute])}</h2>\n<table>\n')
        for entry in by_attribute[attribute]:
            parts.append(_gallery_row(audited, entry, figure_html, link))
        parts.append("</table>\n")
    parts.append("</body></html>\n")
    atomic_write_text(path, "".join(parts))


def _gallery_row(audited: AuditResult, entry: GalleryEntry, figure_html, link) -> str:
    e, r, names = html.escape, audited.ranking, audited.vocabulary.attributes
    row, item = entry.row, int(audited.ranking.item[entry.row])
    name, attribute = printable_name(audited.paths[item]), int(r.attribute[row])
    kind = KINDS[r.kind[row]]
    text = (f"<b>#{row + 1}</b> ({e(names[attribute])} #{r.attribute_rank[row]}) · <b>{kind}</b> · "
            f"labelled {e(names[attribute])} = {LABEL_TEXT[int(audited.labels[item, attribute])]} · "
            f"score {r.score[row]:.3f} · model {audited.scores[item, attribute]:.3f}")
    if r.suggested[row] >= 0:
        suggested = int(r.suggested[row])
        text += f" · suggested {e(names[suggested])} (model {audited.scores[item, suggested]:.3f})"
    photo = (f'<figure><img src="{link(entry.input_file)}" alt="{e(name)}"><figcaption>{e(name)}</figcaption>'
             f"</figure>" if entry.input_file else f"<p>{e(name)}: stored image unusable ({e(entry.error)})</p>")
    figures = "".join(figure_html(panel) for panel in entry.panels)
    return (f'<tr class="{kind}"><td class="input">{photo}</td><td><div class="label">{text}</div>{figures}</td>'
            "</tr>\n")


_STYLE = """tr.missing td.input { border-left: 4px solid #2a7; }
tr.wrong td.input { border-left: 4px solid #c33; }
tr.swap td.input { border-left: 4px solid #e90; }
"""
