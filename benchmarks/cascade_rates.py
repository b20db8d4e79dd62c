"""How often each detector puts a pose on a person, and on a garment shot without anyone in it.

Runs BlazePose and YOLO on the DeepFashion images labelled by hand in benchmarks/person_labels.csv
(person yes/no; mannequins and dress forms count as no) and prints, per labelled set, the persons
found and the garments posed by: blazepose, yolo, the cascade with no rule (YOLO's any person when
BlazePose finds nobody) and `auto` (the cascade with its rule, pose_prep.detectors.auto).

    .venv/bin/python benchmarks/cascade_rates.py [--data ../shared/data] [--limit N]

The rule was chosen looking at train-0-299 and train-300-599; val-0-299 was labelled afterwards and
is the held-out check.
"""
from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--labels", type=Path, default=ROOT / "benchmarks" / "person_labels.csv")
    parser.add_argument("--limit", type=int, default=0, help="images per set (0: all)")
    args = parser.parse_args()

    from tqdm import tqdm

    from pose_prep import images
    from pose_prep.detectors.auto import looks_like_person
    from pose_prep.detectors.blazepose import BlazePose
    from pose_prep.detectors.yolo import Yolo

    rows = list(csv.DictReader(args.labels.open()))
    if args.limit:
        per_set = defaultdict(list)
        for row in rows:
            per_set[row["set"]].append(row)
        rows = [row for chosen in per_set.values() for row in chosen[:args.limit]]
    blazepose, yolo = BlazePose(), Yolo()
    found = defaultdict(lambda: defaultdict(int))   # (set, is person) → detector → images with a pose
    totals = defaultdict(int)
    for row in tqdm(rows, unit="img"):
        _, decoded = images.load(args.data / row["image"])
        by_blazepose = bool(blazepose.detect(decoded.rgb))
        scored = yolo.detect_scored(decoded.rgb)
        by_yolo = bool(scored)
        kept = any(looks_like_person(person, score) for person, score in scored)
        key = (row["set"], row["person"] == "yes")
        totals[key] += 1
        for name, posed in (("blazepose", by_blazepose), ("yolo", by_yolo),
                            ("cascade, no rule", by_blazepose or by_yolo), ("auto", by_blazepose or kept)):
            found[key][name] += posed
    _print_table(found, totals)


def _print_table(found, totals) -> None:
    names = ("blazepose", "yolo", "cascade, no rule", "auto")
    print(f"{'set':<14} {'detector':<17} {'persons found':>15} {'garments posed':>15}")
    for label_set in sorted({s for s, _ in totals}):
        people, garments = totals[(label_set, True)], totals[(label_set, False)]
        for name in names:
            hit, wrong = found[(label_set, True)][name], found[(label_set, False)][name]
            print(f"{label_set:<14} {name:<17} {f'{hit}/{people}':>9} {_percent(hit, people):>5} "
                  f"{f'{wrong}/{garments}':>9} {_percent(wrong, garments):>5}")


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


if __name__ == "__main__":
    main()
