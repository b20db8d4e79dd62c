"""VSAM against VGG16 (and ablations) over seeds on the CPU: `vsam_train.experiments.compare` from the shell.

    python benchmarks/compare.py --shards S --out runs/compare --config configs/small.yaml \\
        --variant vgg16 --variant vsam --variant vsam-groups --seeds 0,1,2 --parallel 2

A variant is a model (vgg16, vsam, vsam-groups, resnet50) or `NAME=MODEL,KEY=VALUE,...` for an
ablation, e.g. `--variant lambda1=vsam,loss.heatmap_loss.weight=1` (NAME: letters, digits, `.`, `_`, `-`,
not starting with `.`; it names the folder OUT/runs/NAME/). Rerun the same command to
continue a killed comparison. Prints one line per run started and finished, then a table of
mean ± std over seeds per variant and of the differences to `--reference` (paired by seed);
`--json` also copies OUT/compare.json to a file (e.g. under benchmarks/results/).

Exit codes: 0 every run evaluated, 1 some run failed (its run.log says why), 2 bad options (checked before
any run starts: a --shards that is not a collection with train and val items, a --config that does not load
with every variant's overrides, a seed train.seed refuses, an --out or --json that cannot be written), or an
--out whose evaluated runs were trained with another config (they are never reused for other figures).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vsam_train.config import ConfigError, parse_assignments, typed_value  # noqa: E402
from vsam_train.experiments.compare import (CompareError, Variant, compare, format_summary,  # noqa: E402
                                            output_problem)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", required=True, type=Path, help="Collection with train and val splits.")
    parser.add_argument("--out", required=True, type=Path, help="Comparison folder (runs/, compare.json).")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "small.yaml", help="Base config.")
    parser.add_argument("--variant", action="append", dest="variants", help="Repeat; default vgg16 and vsam.")
    parser.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds (default 0,1,2).")
    parser.add_argument("--parallel", type=int, default=2, help="Runs side by side (default 2: one per core).")
    parser.add_argument("--reference", help="Variant the differences are taken to (default: vgg16, when compared).")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="Config override for every variant (repeatable).")
    parser.add_argument("--json", type=Path, help="Also write compare.json here.")
    args = parser.parse_args(argv)
    try:
        args.settings = parse_assignments(args.settings)
        args.variants = [Variant.parse(v) for v in (args.variants or ["vgg16", "vsam"])]
        args.seeds = parse_seeds(args.seeds)
    except (ConfigError, CompareError, ValueError) as error:
        parser.error(str(error))
    names = [variant.name for variant in args.variants]
    if args.reference is not None and args.reference not in names:      # else no differences, silently
        parser.error(f"--reference {args.reference}: not a compared variant ({', '.join(names)})")
    args.reference = args.reference or ("vgg16" if "vgg16" in names else None)
    if args.parallel < 1:
        parser.error(f"--parallel {args.parallel}: runs side by side, at least 1")
    problem = args.json and output_problem(args.json, folder=False)
    if problem:         # found now, not after hours of runs
        parser.error(f"--json {args.json}: {problem}")
    return args


def parse_seeds(text: str) -> list[int]:
    """`0,1,2` as [0, 1, 2]: each a train.seed the config accepts, none twice (two runs in one folder)."""
    seeds = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            seeds.append(typed_value(("train", "seed"), part))
        except ConfigError as error:
            raise ValueError(f"--seeds {text}: {error}") from None
    if not seeds:
        raise ValueError(f"--seeds {text!r}: give at least one seed, e.g. 0,1,2")
    twice = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if twice:
        raise ValueError(f"--seeds {text}: seed {', '.join(map(str, twice))} given twice")
    return seeds


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{(time.monotonic() - started) / 60:5.1f} min] {message}", flush=True)

    try:
        data = compare(args.shards, args.out, args.variants, args.seeds, config_file=args.config,
                       settings=args.settings, parallel=args.parallel, log=log, command=sys.argv)
    except CompareError as error:      # bad shards, config, --out, or runs of another config: nothing started
        print(f"compare.py: {error}", file=sys.stderr)
        return 2
    reference = args.reference if args.reference in data["models"] else None
    print(format_summary(data, reference))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.out / "compare.json", args.json)
    return 1 if data["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
