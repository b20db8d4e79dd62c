"""`vsam audit`: the ranking on hand-built cases, cross-fitted calibration, and complete CSV, gallery
and summary on a real collection (also under awkward file names)."""
from __future__ import annotations

import csv
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from awkward_names import AWKWARD_NAMES
from cli import main as vsam
from pose_prep.images import printable_name
from pose_prep.shard_format import Vocabulary, verify_collection
from vsam_train.audit import (CSV_COLUMNS, KINDS, calibrate, folds_of, judge, listed_rows, rank_labels, score_split,
                              spreadsheet_text)
from vsam_train.experiments.label_noise import copy_collection

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VOCABULARY = Vocabulary(attributes=["floral", "solid", "long", "short", "denim"],
                        attribute_groups=["texture", "texture", "sleeve", "sleeve", ""], exclusive_groups=True)


def _rows(ranking, names=VOCABULARY.attributes) -> list[tuple]:
    return [(int(i), names[a], KINDS[k], names[s] if s >= 0 else None, round(float(score), 4), int(rank))
            for i, a, k, s, score, rank in zip(ranking.item, ranking.attribute, ranking.kind, ranking.suggested,
                                               ranking.score, ranking.attribute_rank)]


# --- the ranking -------------------------------------------------------------------------------

def test_a_hand_built_case_ranks_missing_wrong_and_swapped_labels_in_the_exact_expected_order():
    labels = np.array([[1, 0, 1, 0, 0],       # one label per exclusive group: a swap row per group
                       [0, 1, 0, 0, 1],       # no sleeve: long and short judged alone (missing)
                       [1, 1, 0, 1, -1]],     # two textures: each judged alone (wrong); denim unknown
                      np.int8)
    scores = np.array([[0.2, 0.6, 0.9, 0.1, 0.3],
                       [0.5, 0.5, 0.3, 0.05, 0.4],
                       [0.1, 0.75, 0.35, 0.6, 0.95]])
    ranking = rank_labels(scores, labels, VOCABULARY, calibration="raw")
    # A swap scores odds(suggested) / (odds(labelled) + odds(suggested)), odds = p / (1 - p).
    assert _rows(ranking) == [
        (2, "denim", "missing", None, 0.95, 1),    # unknown, scored 0.95
        (2, "floral", "wrong", None, 0.9, 1),      # true, scored 0.1
        (0, "floral", "swap", "solid", 0.8571, 2), # 1.5 / (0.25 + 1.5)
        (1, "denim", "wrong", None, 0.6, 2),
        (1, "solid", "swap", "floral", 0.5, 1),    # even odds: no evidence
        (0, "denim", "missing", None, 0.3, 3),     # a tie: item order
        (1, "long", "missing", None, 0.3, 1),
        (2, "short", "swap", "long", 0.2642, 1),   # (0.35 / 0.65) / (1.5 + 0.35 / 0.65)
        (2, "solid", "wrong", None, 0.25, 2),
        (1, "short", "missing", None, 0.05, 2),
        (0, "long", "swap", "short", 0.0122, 2),   # (1 / 9) / (9 + 1 / 9)
    ]


def test_without_exclusive_groups_every_label_is_missing_or_wrong():
    vocabulary = Vocabulary(attributes=VOCABULARY.attributes, attribute_groups=VOCABULARY.attribute_groups)
    labels = np.array([[1, 0, 1, 0, -1]], np.int8)
    scores = np.array([[0.2, 0.6, 0.85, 0.1, 0.7]])
    assert _rows(rank_labels(scores, labels, vocabulary, calibration="raw"), vocabulary.attributes) == [
        (0, "floral", "wrong", None, 0.8, 1), (0, "denim", "missing", None, 0.7, 1),
        (0, "solid", "missing", None, 0.6, 1), (0, "long", "wrong", None, 0.15, 1),
        (0, "short", "missing", None, 0.1, 1)]


@pytest.mark.parametrize("exclusive", [True, False])
def test_every_label_is_judged_exactly_once(exclusive):
    rng = np.random.default_rng(4)
    vocabulary = Vocabulary(attributes=VOCABULARY.attributes, attribute_groups=VOCABULARY.attribute_groups,
                            exclusive_groups=exclusive)
    labels = rng.choice(np.array([-1, 0, 1], np.int8), size=(200, 5), p=[0.1, 0.5, 0.4])
    rows = judge(rng.random((200, 5)), labels, vocabulary)
    cells = np.zeros_like(labels, np.int64)
    for item, attribute, kind, suggested in zip(rows["item"], rows["attribute"], rows["kind"], rows["suggested"]):
        if KINDS[kind] == "swap":
            name = vocabulary.attribute_groups[attribute]
            group = [a for a, g in enumerate(vocabulary.attribute_groups) if g == name]
            cells[item, group] += 1
            assert labels[item, attribute] == 1 and (labels[item, group] == 1).sum() == 1
            assert suggested in group and suggested != attribute
        else:
            cells[item, attribute] += 1
            assert (labels[item, attribute] == 1) == (KINDS[kind] == "wrong")
    assert (cells == 1).all()
    assert ("swap" in {KINDS[k] for k in rows["kind"]}) == exclusive


def _two_attributes(n: int = 400):
    """Attribute 0: perfectly ordered but squeezed into 0.10-0.30 (a rare attribute under a focal
    loss); one negative scores among its positives. Attribute 1: scores 0.3-0.7 that say nothing
    about its labels (half of them true)."""
    rng = np.random.default_rng(0)
    labels = np.zeros((n, 2), np.int8)
    labels[: n // 4, 0] = 1
    scores = np.empty((n, 2))
    scores[:, 0] = np.where(labels[:, 0] == 1, rng.uniform(0.25, 0.30, n), rng.uniform(0.10, 0.15, n))
    suspect = n - 1
    scores[suspect, 0] = 0.28
    labels[:, 1] = rng.random(n) < 0.5
    scores[:, 1] = rng.uniform(0.3, 0.7, n)
    return scores, labels, suspect


def test_platt_scaling_puts_a_squeezed_attribute_s_outlier_first_where_raw_scores_bury_it():
    scores, labels, suspect = _two_attributes()
    vocabulary = Vocabulary(attributes=["rare", "noise"], attribute_groups=["", ""])
    first_missing = lambda ranking: next((int(i), int(a)) for i, a, k in zip(ranking.item, ranking.attribute,
                                                                             ranking.kind) if KINDS[k] == "missing")
    calibrated = rank_labels(scores, labels, vocabulary, calibration="platt")
    assert first_missing(calibrated) == (suspect, 0) and calibrated.score[0] > 0.9
    assert first_missing(rank_labels(scores, labels, vocabulary, calibration="raw"))[1] == 1   # noise above 0.28
    assert 0.3 < np.median(calibrate(scores, labels, "platt", fold=folds_of(list(map(str, range(400)))))[:, 1]) < 0.7


def test_isotonic_calibration_is_the_prior_free_label_frequency_at_that_score_in_the_other_folds():
    """P(level | true) / (P(level | true) + P(level | false)) over the other folds' known labels: the
    frequency with positives and negatives weighing the same."""
    rng = np.random.default_rng(2)
    high = rng.random(300) < 0.5
    scores = np.where(high, 0.8, 0.2)[:, None]
    labels = (rng.random((300, 1)) < np.where(high, 0.75, 0.1)[:, None]).astype(np.int8)
    labels[::17] = -1                                         # unknown labels: calibrated, never fitted on
    fold = folds_of([f"{i}" for i in range(300)])
    calibrated = calibrate(scores, labels, "isotonic", fold=fold)
    for i in range(300):
        fit = (fold != fold[i]) & (labels[:, 0] >= 0)
        level = fit & (scores[:, 0] == scores[i, 0])
        given_true = (labels[level, 0] == 1).sum() / (labels[fit, 0] == 1).sum()
        given_false = (labels[level, 0] == 0).sum() / (labels[fit, 0] == 0).sum()
        assert calibrated[i, 0] == pytest.approx(given_true / (given_true + given_false))


@pytest.mark.parametrize("calibration", ["platt", "isotonic"])
def test_a_rare_label_in_a_group_the_model_has_not_learned_is_no_suspect(calibration):
    """Scores that say nothing: every swap scores about 0.5, a label held by 3 % of the items as
    much as one held by 80 % (a probability with the base rate in it would put the rare ones first)."""
    rng = np.random.default_rng(5)
    vocabulary = Vocabulary(attributes=["solid", "floral", "lattice"], attribute_groups=["texture"] * 3,
                            exclusive_groups=True)
    labels = np.zeros((1000, 3), np.int8)
    labels[np.arange(1000), rng.choice(3, 1000, p=[0.8, 0.17, 0.03])] = 1
    ranking = rank_labels(rng.uniform(0.3, 0.5, (1000, 3)), labels, vocabulary, calibration=calibration,
                          paths=[f"{i:04d}" for i in range(1000)])
    for attribute in range(3):
        scores = ranking.score[ranking.attribute == attribute]
        assert 0.4 < np.median(scores) < 0.6, (attribute, np.median(scores))


@pytest.mark.parametrize("calibration", ["isotonic", "platt"])
def test_an_item_s_own_label_never_moves_its_calibrated_probability(calibration):
    scores, labels, suspect = _two_attributes()
    fold = folds_of([f"img/{i:04d}.jpg" for i in range(len(scores))])
    before = calibrate(scores, labels, calibration, fold=fold)
    flipped = labels.copy()
    flipped[suspect, 0] = 1                   # "fix" its label: its own probability must not follow
    after = calibrate(scores, flipped, calibration, fold=fold)
    assert after[suspect, 0] == before[suspect, 0]
    others = fold != fold[suspect]
    assert not np.array_equal(after[others, 0], before[others, 0])     # the other folds' fits saw it


def test_folds_follow_the_paths_not_their_order():
    paths = [f"img/{i:03d}.jpg" for i in range(50)]
    fold = dict(zip(paths, folds_of(paths)))
    shuffled = list(np.random.default_rng(1).permutation(paths))
    assert dict(zip(shuffled, folds_of(shuffled))) == fold
    assert sorted(np.bincount(list(fold.values())).tolist()) == [10] * 5


def test_spreadsheet_cells_are_one_line_and_never_a_formula():
    assert spreadsheet_text("=HYPERLINK(\"x\")") == "'=HYPERLINK(\"x\")"
    assert spreadsheet_text("-leading-dash.jpg") == "'-leading-dash.jpg"
    assert spreadsheet_text("new\nline.jpg") == "new\\nline.jpg"
    assert spreadsheet_text("ünïcødé 模特.jpg") == "ünïcødé 模特.jpg"


# --- the command on a real collection ---------------------------------------------------------

class _Page(HTMLParser):
    """The gallery's links, ids and, per table row, its class, texts and links."""

    def __init__(self):
        super().__init__()
        self.links, self.ids, self.rows = [], set(), []
        self._row = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.ids.add(attrs.get("id"))
        found = [attrs[key] for key in ("src", "href") if attrs.get(key)]
        self.links += found
        if tag == "tr":
            self._row = {"class": attrs.get("class"), "text": [], "links": []}
            self.rows.append(self._row)
        elif self._row is not None:
            self._row["links"] += found

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None

    def handle_data(self, data):
        if self._row is not None:
            self._row["text"].append(data)


def _read_csv(path: Path) -> list[dict]:
    text = path.read_bytes().decode("utf-8")          # strict: valid UTF-8
    return list(csv.DictReader(io.StringIO(text, newline="")))


def _audit(checkpoint, shards, out, *options) -> object:
    return CliRunner().invoke(vsam, ["audit", "--checkpoint", str(checkpoint), "--shards", str(shards),
                                     "--out", str(out), "--workers", "0", *options])


def _check_links(out: Path, page: _Page) -> None:
    for link in page.links:
        parsed = urlparse(link)
        assert not parsed.scheme and not parsed.netloc and not link.startswith("/") and ".." not in link, link
        assert link == quote(unquote(link), safe="/#"), link
        if link.startswith("#"):
            assert link[1:] in page.ids, link
            continue
        target = out / unquote(parsed.path)
        assert target.is_file(), link
        if target.suffix == ".png":
            with Image.open(target) as picture:
                picture.load()
                assert picture.format == "PNG"


def test_audit_writes_every_suspect_row_to_the_csv_and_each_attribute_s_top_to_the_gallery(
        tiny_checkpoint, df_shards, tmp_path):
    out = tmp_path / "audit"
    result = _audit(tiny_checkpoint, df_shards, out, "--top", "3", "--gallery", "1")
    assert result.exit_code == 0, result.output
    audited = score_split(tiny_checkpoint, df_shards, "train")
    ranking, names = audited.ranking, audited.vocabulary.attributes
    assert len(audited.paths) == 96 and len(ranking) >= 96 * len(audited.vocabulary.group_names)

    rows = _read_csv(out / "audit.csv")
    listed = listed_rows(ranking, 3)
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert [int(row["rank"]) for row in rows] == (listed + 1).tolist()
    assert [int(row["rank"]) for row in rows[:3]] == [1, 2, 3]           # the overall top is listed
    for row, index in zip(rows, listed):
        item, attribute = int(ranking.item[index]), int(ranking.attribute[index])
        assert row["path"] == spreadsheet_text(audited.paths[item])
        assert row["attribute"] == names[attribute] and row["kind"] == KINDS[ranking.kind[index]]
        assert row["label"] == {1: "true", 0: "false", -1: "unknown"}[int(audited.labels[item, attribute])]
        assert float(row["score"]) == pytest.approx(ranking.score[index], abs=5e-5)
        assert float(row["model_score"]) == pytest.approx(audited.scores[item, attribute], abs=5e-5)
        assert int(row["attribute_rank"]) == ranking.attribute_rank[index] <= 3
        assert (row["suggested"] != "") == (row["kind"] == "swap")
    per_attribute = {name: sum(row["attribute"] == name for row in rows) for name in names}
    judged = {name: int((ranking.attribute == a).sum()) for a, name in enumerate(names)}
    assert per_attribute == {name: min(3, judged[name]) for name in names}

    page = _Page()
    page.feed((out / "index.html").read_bytes().decode("utf-8"))
    _check_links(out, page)
    shown = np.sort(np.flatnonzero(ranking.attribute_rank <= 1))
    assert any(ranking.suggested[shown] >= 0)            # a swap row: two Grad-CAMs
    assert len(page.rows) == len(shown)
    for html_row, index in zip(sorted(page.rows, key=lambda r: int(re.search(r"#(\d+)", "".join(r["text"]))[1])),
                               shown):
        text = "".join(html_row["text"])
        item, attribute = int(ranking.item[index]), int(ranking.attribute[index])
        assert text.startswith(f"{audited.paths[item]}#{index + 1} ({names[attribute]} #")
        assert html_row["class"] == KINDS[ranking.kind[index]] and f"score {ranking.score[index]:.3f}" in text
        pictures = [unquote(link).rsplit("/", 1)[1] for link in html_row["links"]]
        expected = ["input.png", "model-attention.png", f"model-gradcam-{names[attribute]}.png"]
        if ranking.suggested[index] >= 0:
            expected.append(f"model-gradcam-{names[ranking.suggested[index]]}.png")
        assert pictures == expected
    assert "audit.csv" in page.links

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["schema"] == "vsam-audit/1" and summary["n_items"] == 96 and summary["split"] == "train"
    assert summary["n_judged"] == len(ranking) == sum(summary["by_kind"].values())
    assert summary["csv_rows"] == len(rows) and summary["gallery_rows"] == len(shown)
    assert summary["overall_top"][0]["rank"] == 1 and summary["calibration"] == "platt"
    assert "audit.csv" in result.output and f"{len(ranking)} labels judged" in result.output

    rerun = _audit(tiny_checkpoint, df_shards, out, "--top", "1", "--gallery", "0")   # a previous audit: replaced
    assert rerun.exit_code == 0, rerun.output
    assert not (out / "images").exists() and _Page().rows == []
    assert len(_read_csv(out / "audit.csv")) == len(listed_rows(ranking, 1))


def test_awkward_file_names_are_one_safe_cell_each_and_escaped_in_the_gallery(tiny_checkpoint, df_shards, tmp_path):
    """The collection's train items renamed with spaces, #, %, ?, <b>, &, quotes, a newline, a
    leading dash and a formula: each a row of a valid UTF-8 CSV, one line, never a formula; each
    gallery caption the name as text, each link URL-quoted and opening a file."""
    names = [*AWKWARD_NAMES, "=SUM(A1:A2).jpg", "@at+plus.jpg"]
    renamed = iter(names)
    shards = tmp_path / "awkward-shards"

    def rename(item) -> bool:
        if item.split != "train":
            return False
        item.path = next(renamed, None) or item.path
        return True

    copy_collection(df_shards, shards, rename)
    assert verify_collection(shards) == []
    out = tmp_path / "audit"
    result = _audit(tiny_checkpoint, shards, out, "--top", "0", "--gallery", "0")
    assert result.exit_code == 0, result.output
    rows = _read_csv(out / "audit.csv")
    written = {row["path"] for row in rows}
    for name in names:
        cell = printable_name(name)
        assert ("'" + cell if name[0] in "=-@" else cell) in written, name
    assert not any(row["path"][:1] in "=+-@" for row in rows)
    assert all("\n" not in value and "\r" not in value for row in rows for value in row.values())
    assert len(rows) == json.loads((out / "summary.json").read_text())["n_judged"]   # --top 0: every label

    gallery = tmp_path / "gallery"
    result = _audit(tiny_checkpoint, shards, gallery, "--top", "1", "--gallery", "1")
    assert result.exit_code == 0, result.output
    text = (gallery / "index.html").read_bytes().decode("utf-8")
    assert "<b>tag</b>" not in text
    page = _Page()
    page.feed(text)
    _check_links(gallery, page)


def test_unusable_inputs_exit_1_and_bad_options_exit_2(tiny_checkpoint, df_shards, category_shards, tmp_path):
    other = _audit(tiny_checkpoint, category_shards, tmp_path / "a")
    assert other.exit_code == 1 and "vsam audit:" in other.output and "differ" in other.output
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert _audit(garbage, df_shards, tmp_path / "b").exit_code == 1
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    result = _audit(tiny_checkpoint, df_shards, occupied)
    assert result.exit_code == 2 and "not a vsam audit" in result.output
    assert (occupied / "notes.txt").read_text() == "mine"
    assert _audit(tiny_checkpoint, df_shards, tmp_path / "c", "--calibration", "magic").exit_code == 2
