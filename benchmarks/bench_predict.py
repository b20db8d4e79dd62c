"""`vsam predict` on a full-width model (224 px): the path before issue 16 beside the new ones, in one run.

    .venv/bin/python benchmarks/bench_predict.py [--photos 64] [--old-commit REV] [--json PATH]

The model: configs/paper.yaml's VSAM (VGG16 trunk, width 1.0, 224 px, ~20 M parameters) for the
DeepFashion attribute vocabulary, from scratch, one Adam step taken on real photos so that the
checkpoint carries the optimizer state a trained one does, saved as `vsam train` saves it (~240 MB)
and exported by `vsam export --format onnx`. Then, each in a fresh process, on the first N DeepFashion
training photos (real catalog shots, ~300 px high), JSON Lines written:

* old: `vsam predict --checkpoint` as it was before issue 16 (the code of --old-commit, default the
  commit before the change, extracted with `git archive`): the whole checkpoint loaded, torch eager,
  2 DataLoader worker processes, batch 64;
* new, --checkpoint: weights memory-mapped, threads decoding, batch 8;
* new, --model FILE.onnx: onnxruntime, numpy preprocessing, no torch in the process.

Per path: photos/s of wall time; CPU seconds per photo (the process and its workers); photos per
CPU-second, and that figure × 2, what the 2 cores give when nothing else runs (the machine is shared:
wall figures move with the load, recorded beside them); peak RSS of the process (VmHWM) and the
largest peak among its child processes (the old path's DataLoader workers, forked with torch loaded,
their pages partly shared with it; or helpers that torch forks to find libraries); whether torch was
imported; the largest score difference from the old path. Then new/old ratios. --json (default
benchmarks/results/bench_predict-cpu-DATE.json) gets every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
OLD_COMMIT = "a41b78f^"      # the commit before `vsam predict --model` and the memory work


def full_width_checkpoint(path: Path, photos: list[Path]) -> None:
    import torch

    from pose_prep.images import load
    from pose_prep.labels import read_labels
    from vsam_train.checkpoint import save_checkpoint
    from vsam_train.config import load_config
    from vsam_train.data import preprocess
    from vsam_train.train import build_model, build_optimizer, checkpoint_state

    class Stream:      # what checkpoint_state reads of a ShardStream
        world_size, vocabulary = 1, read_labels(DATA / "deepfashion-attr").vocabulary

        class info:
            heatmap = {}

    config = load_config(ROOT / "configs" / "paper.yaml", {"model.pretrained": None})
    torch.manual_seed(0)
    model = build_model(config, Stream.vocabulary)
    optimizer, scheduler = build_optimizer(model, config)
    outputs = model(torch.stack([preprocess(load(p)[1].rgb, 224) for p in photos[:2]]))
    (outputs["attributes"].sigmoid().mean() + outputs["attention"].mean()).backward()
    optimizer.step()
    scheduler.step()
    save_checkpoint(path, checkpoint_state(model, optimizer, scheduler, 1, 1, config, Stream))


def export_onnx(checkpoint: Path, out: Path) -> None:
    from vsam_train.export import export_checkpoint

    export_checkpoint(checkpoint, "onnx", out)


def old_tree(commit: str, folder: Path) -> Path | None:
    """The old commit's cli.py, vsam_train/ and pose_prep/ (None outside a git checkout)."""
    archive = folder / "old.tar"
    done = subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), commit, "cli.py", "vsam_train",
                           "pose_prep"], capture_output=True, text=True)
    if done.returncode:
        print(f"old path skipped: git archive {commit}: {done.stderr.strip()}")
        return None
    tree = folder / "old"
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    return tree


CHILD = """
import json, resource, sys, time
sys.path.insert(0, {code!r})
from cli import main
start = time.perf_counter()
try:
    main({args!r})
except SystemExit as exit:
    assert exit.code in (0, None), exit.code
wall = time.perf_counter() - start
me, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent (this benchmark).
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({{"wall_s": wall, "cpu_s": me.ru_utime + me.ru_stime + workers.ru_utime + workers.ru_stime,
                  "peak_rss_mb": peak / 1024, "children_peak_rss_mb": workers.ru_maxrss / 1024,
                  "torch_imported": "torch" in sys.modules}}))
"""


def run_path(name: str, code: Path, args: list[str], photos: int, out: Path) -> dict:
    """One `vsam predict` in a fresh process (its start and model load included in the time)."""
    load_before = os.getloadavg()[0]
    done = subprocess.run([sys.executable, "-c", CHILD.format(code=str(code), args=args)], cwd=code,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    row = {"path": name, **json.loads(done.stdout.strip().splitlines()[-1]), "photos": photos,
           "load_average": (load_before + os.getloadavg()[0]) / 2, "predictions": str(out)}
    row["photos_per_s"] = photos / row["wall_s"]
    row["photos_per_cpu_s"] = photos / row["cpu_s"]
    row["two_idle_cores_photos_per_s"] = 2 * row["photos_per_cpu_s"]
    return row


def largest_score_difference(path: Path, reference: Path) -> float:
    def scores(p):
        return {r["path"]: r["attributes"] for r in map(json.loads, p.read_text().splitlines())}
    ours, theirs = scores(path), scores(reference)
    assert ours.keys() == theirs.keys()
    return max(abs(ours[p][a] - theirs[p][a]) for p in theirs for a in theirs[p])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=64)
    parser.add_argument("--old-commit", default=OLD_COMMIT)
    parser.add_argument("--json", type=Path,
                        default=ROOT / "benchmarks" / "results" / f"bench_predict-cpu-{time.strftime('%Y-%m-%d')}.json")
    args = parser.parse_args()
    names = (DATA / "deepfashion-attr/split/train.txt").read_text().split()[: args.photos]
    results = {"machine": f"{platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
                          "shared with other jobs", "date": time.strftime("%Y-%m-%d %H:%M"), "photos": args.photos,
               "old_commit": args.old_commit}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = tmp / "photos"
        images.mkdir()
        for name in names:
            os.symlink(DATA / "deepfashion-attr" / name, images / Path(name).name)
        checkpoint, exported = tmp / "full.pt", tmp / "full.onnx"
        print(f"full-width checkpoint and its ONNX export (load average {os.getloadavg()[0]:.1f}) ...")
        full_width_checkpoint(checkpoint, sorted(images.iterdir()))
        export_onnx(checkpoint, exported)
        results["checkpoint_mb"] = checkpoint.stat().st_size / 2**20
        results["onnx_mb"] = exported.stat().st_size / 2**20
        common = ["--images", str(images), "--no-progress", "--device", "cpu"]
        paths = []
        tree = old_tree(args.old_commit, tmp)
        if tree is not None:
            paths.append(("old: --checkpoint (before issue 16)", tree, ["--checkpoint", str(checkpoint)]))
        paths += [("new: --checkpoint", ROOT, ["--checkpoint", str(checkpoint)]),
                  ("new: --model .onnx", ROOT, ["--model", str(exported)])]
        rows = []
        for i, (name, code, model) in enumerate(paths):
            out = tmp / f"predictions-{i}.jsonl"
            rows.append(run_path(name, code, ["predict", *model, *common, "--out", str(out)], args.photos, out))
        reference = Path(rows[0]["predictions"])
        for row in rows:
            row["max_score_difference_from_first"] = largest_score_difference(Path(row.pop("predictions")), reference)
    results["paths"] = rows
    if tree is not None:
        old = rows[0]
        results["new_over_old"] = {row["path"]: {key: row[key] / old[key] for key in
                                                 ("photos_per_s", "photos_per_cpu_s", "peak_rss_mb")}
                                   for row in rows[1:]}
    _print(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"written: {args.json}")


def _print(results: dict) -> None:
    print(f"{results['photos']} photos, checkpoint {results['checkpoint_mb']:.0f} MB, ONNX {results['onnx_mb']:.0f} MB")
    print(f"{'vsam predict, 224 px':<38} {'photos/s':>9} {'photos/CPU-s':>13} {'x2 cores':>9} {'peak RSS MB':>12} "
          f"{'children MB':>12} {'torch':>6} {'max Δscore':>11} {'load':>5}")
    for r in results["paths"]:
        print(f"{r['path']:<38} {r['photos_per_s']:>9.2f} {r['photos_per_cpu_s']:>13.2f} "
              f"{r['two_idle_cores_photos_per_s']:>9.1f} {r['peak_rss_mb']:>12.0f} {r['children_peak_rss_mb']:>12.0f} "
              f"{'yes' if r['torch_imported'] else 'no':>6} {r['max_score_difference_from_first']:>11.1e} "
              f"{r['load_average']:>5.1f}")
    for name, ratio in results.get("new_over_old", {}).items():
        print(f"{name + ' / old':<38} {ratio['photos_per_s']:>9.2f} {ratio['photos_per_cpu_s']:>13.2f} "
              f"{'':>9} {ratio['peak_rss_mb']:>12.2f}")


if __name__ == "__main__":
    main()
