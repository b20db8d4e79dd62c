"""A reader of a shard collection in its own process, for the tests of readers beside a prep-pose run.

    python tests/lease_reader.py SHARDS SIGNALS [--workers N]

Takes a `ShardStream` over every split (its snapshot is leased from now on), reads one epoch through a
DataLoader whose workers are forked per epoch (they open the shards afresh each time), writes
SIGNALS/epoch-0.json (path → category of every item read) and waits for SIGNALS/go; then reads a
second epoch and writes SIGNALS/epoch-1.json. A ShardFormatError is one line on stderr and exit 1,
as the vsam commands print it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pose_prep.shard_format import ShardFormatError  # noqa: E402
from vsam_train.data import ShardStream, make_loader  # noqa: E402


def epoch(stream: ShardStream, workers: int, number: int) -> dict[str, int]:
    stream.set_epoch(number)
    items = {}
    for batch in make_loader(stream, workers):
        items.update(zip(batch["path"], batch["category"].tolist()))
    return items


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("shards", type=Path)
    parser.add_argument("signals", type=Path)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    try:
        stream = ShardStream(args.shards, None, image_size=32, batch_size=4, train=False)
        (args.signals / "epoch-0.json").write_text(json.dumps(epoch(stream, args.workers, 0)))
        deadline = time.monotonic() + 120
        while not (args.signals / "go").exists():
            if time.monotonic() > deadline:
                sys.exit("lease_reader: no go signal within 120 s")
            time.sleep(0.02)
        (args.signals / "epoch-1.json").write_text(json.dumps(epoch(stream, args.workers, 1)))
    except ShardFormatError as error:
        print(f"lease_reader: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
