"""Fewer training labels: a copy of a DeepFashion attribute-challenge label folder keeping N training rows.

    python benchmarks/deepfashion_subset.py --source ../shared/data/deepfashion-attr --train 1000 --seed 0 \\
        --out df-1k-labels
    vsam prep-pose --images ../shared/data/deepfashion-attr --labels df-1k-labels --out df-1k \\
        --splits train,val --max-side 160 --jobs 2

Writes OUT/split/: every train*.txt file (train.txt, train_attr.txt, train_bbox.txt, ...) reduced to the same
N rows, drawn at random with --seed and kept in their original order; every other file of split/ (val, test,
list_attr_cloth.txt) copied unchanged, so val stays the whole val split. The photos are not copied: prep-pose
reads them from --images and leaves the training photos that are no longer listed out of the collection.

Exit codes: 0 written, 2 bad options (no split/train.txt, N not in 1..rows, train files of different lengths,
an --out that already exists).
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys
from pathlib import Path


def train_files(split: Path) -> list[Path]:
    """train.txt and its row-aligned companions (train_attr.txt, train_bbox.txt, train_landmards.txt...)."""
    return sorted(path for path in split.iterdir() if path.name.startswith("train") and path.suffix == ".txt")


def sample_rows(total: int, keep: int, seed: int) -> list[int]:
    return sorted(random.Random(seed).sample(range(total), keep))


def write_subset(source: Path, out: Path, keep: int, seed: int) -> list[int]:
    """Write the reduced copy; returns the kept row numbers (0-based, in train.txt's order)."""
    split = source / "split"
    files = train_files(split)
    rows = {path: path.read_text().splitlines() for path in files}
    lengths = {len(lines) for lines in rows.values()}
    if len(lengths) != 1:
        raise ValueError(f"{split}: the train files have different row counts: "
                         + ", ".join(f"{path.name} {len(lines)}" for path, lines in rows.items()))
    total = lengths.pop()
    if not 1 <= keep <= total:
        raise ValueError(f"--train {keep}: {split / 'train.txt'} has {total} rows")
    kept = sample_rows(total, keep, seed)
    (out / "split").mkdir(parents=True)
    for path in split.iterdir():
        if path in rows:
            (out / "split" / path.name).write_text("".join(rows[path][row] + "\n" for row in kept))
        elif path.is_file():
            shutil.copyfile(path, out / "split" / path.name)
    return kept


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, type=Path, help="Attribute-challenge folder (with split/).")
    parser.add_argument("--train", required=True, type=int, help="Training rows to keep.")
    parser.add_argument("--seed", type=int, default=0, help="Which rows (default 0).")
    parser.add_argument("--out", required=True, type=Path, help="New label folder (must not exist).")
    args = parser.parse_args(argv)
    if not (args.source / "split" / "train.txt").is_file():
        parser.error(f"{args.source}: no split/train.txt (not a DeepFashion attribute-challenge folder)")
    if args.out.exists():
        parser.error(f"{args.out}: already exists")
    try:
        kept = write_subset(args.source, args.out, args.train, args.seed)
    except ValueError as error:
        parser.error(str(error))
    print(f"{args.out / 'split'}: {len(kept)} training rows of {args.source / 'split' / 'train.txt'} "
          f"(seed {args.seed}); the other splits unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
