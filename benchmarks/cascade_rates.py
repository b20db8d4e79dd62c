"""How often each detector puts a pose on a person, and on a garment shot without anyone in it.

Runs BlazePose and YOLO on the DeepFashion images labelled by hand in benchmarks/person_labels.csv
(person yes/no; mannequins and dress forms count as no) and prints, per labelled set, the persons
found and the garments posed by: blazepose, yolo, the cascade with no rule (YOLO's any person when
BlazePose finds nobody) and `auto` (the cascade with its rule, pose_prep.detectors.auto).

    .venv/bin/python benchmarks/cascade_rates.py [--data ../shared/data] [--limit N] [--compare-runtimes]

YOLO runs through the runtime VSAM_YOLO_RUNTIME names (default onnx). --compare-runtimes also runs
ultralytics' torch path on every photo and prints how far the ONNX path is from it: people found,
box and joint scores, keypoints in pixels, and the photos where auto would decide otherwise.

The rule was chosen looking at train-0-299 and train-300-599; val-0-299 was labelled afterwards and
is the held-out check.
"""
from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--labels", type=Path, default=ROOT / "benchmarks" / "person_labels.csv")
    parser.add_argument("--limit", type=int, default=0, help="images per set (0: all)")
    parser.add_argument("--compare-runtimes", action="store_true",
                        help="also run YOLO through ultralytics' torch path and compare it with onnxruntime")
    parser.add_argument("--json", type=Path, help="also write the rates (and the comparison) here")
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
    blazepose, yolo = BlazePose(), Yolo(runtime="onnx" if args.compare_runtimes else None)
    reference = Yolo(runtime="torch") if args.compare_runtimes else None
    differences = RuntimeDifferences()
    found = defaultdict(lambda: defaultdict(int))   # (set, is person) → detector → images with a pose
    totals = defaultdict(int)
    for row in tqdm(rows, unit="img"):
        _, decoded = images.load(args.data / row["image"])
        by_blazepose = bool(blazepose.detect(decoded.rgb))
        scored = yolo.detect_scored(decoded.rgb)
        by_yolo = bool(scored)
        kept = any(looks_like_person(person, score) for person, score in scored)
        if reference is not None:
            differences.add(row["image"], yolo, reference, decoded.rgb, by_blazepose, by_blazepose or kept)
        key = (row["set"], row["person"] == "yes")
        totals[key] += 1
        for name, posed in (("blazepose", by_blazepose), ("yolo", by_yolo),
                            ("cascade, no rule", by_blazepose or by_yolo), ("auto", by_blazepose or kept)):
            found[key][name] += posed
    print(f"YOLO: {yolo.version}")
    rates = _print_table(found, totals)
    results = {"yolo_version": yolo.version, "rates": rates}
    if reference is not None:
        results["onnx_against_torch"] = differences.summary(reference.version)
        print(json.dumps(results["onnx_against_torch"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


class RuntimeDifferences:
    """How far YOLO through onnxruntime is from ultralytics' torch path, photo by photo."""

    def __init__(self):
        self.photos = self.people = 0
        self.count_mismatches, self.auto_mismatches = [], []
        self.max_xy_px = self.max_score = 0.0

    def add(self, name, onnx, torch_path, rgb, by_blazepose: bool, auto_posed: bool) -> None:
        """`auto_posed`: what auto decided with the ONNX path's people (the caller has them)."""
        from pose_prep.detectors.auto import looks_like_person
        from pose_prep.detectors.yolo import MIN_BOX_SCORE

        self.photos += 1
        _, scores, points = onnx._model.predict(rgb, MIN_BOX_SCORE)
        _, want_scores, want_points = torch_path._model.predict(rgb, MIN_BOX_SCORE)
        if len(scores) != len(want_scores):
            self.count_mismatches.append(name)
        else:
            self.people += len(scores)
            if len(scores):
                self.max_xy_px = max(self.max_xy_px, float(np.abs(points[..., :2] - want_points[..., :2]).max()))
                self.max_score = max(self.max_score, float(np.abs(scores - want_scores).max()),
                                     float(np.abs(points[..., 2] - want_points[..., 2]).max()))
        if auto_posed != (by_blazepose or any(looks_like_person(p, s) for p, s in torch_path.detect_scored(rgb))):
            self.auto_mismatches.append(name)

    def summary(self, reference_version: str) -> dict:
        return {"reference": reference_version, "photos": self.photos, "people_compared": self.people,
                "photos_with_another_count": self.count_mismatches, "photos_auto_decides_otherwise": self.auto_mismatches,
                "max_keypoint_difference_px": self.max_xy_px, "max_score_difference": self.max_score}


def _print_table(found, totals) -> list[dict]:
    names = ("blazepose", "yolo", "cascade, no rule", "auto")
    rows = []
    print(f"{'set':<14} {'detector':<17} {'persons found':>15} {'garments posed':>15}")
    for label_set in sorted({s for s, _ in totals}):
        people, garments = totals[(label_set, True)], totals[(label_set, False)]
        for name in names:
            hit, wrong = found[(label_set, True)][name], found[(label_set, False)][name]
            print(f"{label_set:<14} {name:<17} {f'{hit}/{people}':>9} {_percent(hit, people):>5} "
                  f"{f'{wrong}/{garments}':>9} {_percent(wrong, garments):>5}")
            rows.append({"set": label_set, "detector": name, "people": people, "people_found": hit,
                         "garments": garments, "garments_posed": wrong})
    return rows


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


if __name__ == "__main__":
    main()
