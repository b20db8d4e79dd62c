"""`vsam`: the command line. Each command imports its machinery lazily, so `vsam --help` is quick
and the training commands never import a pose detector (a GPU machine without mediapipe trains)."""
from __future__ import annotations

import os
import sys
from typing import NoReturn

import click

from vsam_train.model_registry import architectures, attentions   # the model names; torch-free

# Exit codes, shared by every command.
EXIT_OK = 0
EXIT_FAILED = 1          # the job could not do what was asked (nothing processed, --strict, ...)
EXIT_USAGE = 2           # click's own code for bad options
EXIT_BUSY = 75           # another run holds the lock (EX_TEMPFAIL: try again later)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vsam")
@click.option("-v", "--verbose", is_flag=True,
              help="Let the pose detectors' own log lines (mediapipe, TensorFlow Lite, absl) through to the "
                   "terminal, as VSAM_VERBOSE=1 does; by default vsam keeps them out.")
def main(verbose: bool) -> None:
    """vsam: pose-guided attention for multi-label fashion image classification."""
    if verbose:
        from pose_prep.native_logs import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"      # read where the detectors run, worker processes included


def _fail(command: str, message, code: int) -> NoReturn:
    """End `vsam COMMAND` with one line on stderr, `vsam COMMAND: message`, and exit code `code`."""
    click.echo(f"vsam {command}: {message}", err=True)
    sys.exit(code)


def _a_folder_that_can_be_made(context, parameter, value: str | None) -> str | None:
    """An output folder under a file: one line naming that file, exit 1, before any work (the OS would
    name the folder it could not make, e.g. "[Errno 20] Not a directory: 'afile/run'")."""
    from pose_prep.atomic import UnusableOutput, check_folder_can_be_made

    if value is not None:
        try:
            check_folder_can_be_made(value)
        except UnusableOutput as error:
            _fail(_command_name(context), error, EXIT_FAILED)
    return value


def _command_name(context) -> str:
    """"experiment audit" for `vsam experiment audit`: the names below the top-level group."""
    names = []
    while context.parent is not None:
        names.append(context.info_name)
        context = context.parent
    return " ".join(reversed(names))


# --- pose (pose_prep) --------------------------------------------------------------------------

_DETECTOR_HELP = "auto, blazepose, yolo, mmpose or openpose-json:DIR (default: {default})."


def _detector_default() -> str:
    from pose_prep.detectors import DEFAULT
    return DEFAULT


@main.command("pose")
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of photos, searched recursively (jpg, jpeg, png, webp, bmp).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              callback=_a_folder_that_can_be_made,
              help="Output folder: <relative path>_keypoints.json per image (OpenPose format).")
@click.option("--detector", default=None, help=_DETECTOR_HELP.format(default="auto"))
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(1), help="Worker processes.")
@click.option("--overlays", is_flag=True, help="Also write <relative path>_overlay.png: skeleton and heatmap.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
def pose(images, out, detector, jobs, overlays, progress) -> None:
    """Detect body keypoints (COCO-18) in every photo under --images.

    Writes one OpenPose JSON file per photo (an empty people list when nobody is found). A bad file
    gets one line (file and reason) on stderr and in OUT/pose_failures.jsonl, and the run goes on.
    The last line counts images, with a person, without, failed. Exit code 0; 1 when no image
    could be processed or an output cannot be written (a full disk, an --out under a file)."""
    from pose_prep.detectors import DetectorUnavailable
    from pose_prep.pose import FAILURES_FILE, run

    detector = detector or _detector_default()
    try:
        summary = run(images, out, detector_name=detector, jobs=jobs, overlays=overlays,
                      progress=sys.stderr.isatty() if progress is None else progress)
    except (ValueError, FileNotFoundError, DetectorUnavailable) as error:
        raise click.UsageError(str(error)) from None
    except OSError as error:    # an output that cannot be written: a full disk (DiskFull), --out under a file
        _fail("pose", error, EXIT_FAILED)
    where = f" (failures listed in {out}/{FAILURES_FILE})" if summary.failed else ""
    click.echo(f"vsam pose: {summary.line()}{where}")
    if summary.nothing_processed:
        _fail("pose", f"nothing could be processed under {images}", EXIT_FAILED)


@main.command("pose-eval")
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder holding the annotated images (searched by file name, recursively).")
@click.option("--annotations", required=True, multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="COCO person-keypoints JSON; repeat to pool several files (e.g. val and test).")
@click.option("--detector", default=None, help=_DETECTOR_HELP.format(default="auto"))
@click.option("--threshold", default=0.1, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="PCK threshold as a fraction of the longer side of the person's box.")
def pose_eval(images, annotations, detector, threshold) -> None:
    """Score a detector against COCO keypoint annotations: prints one JSON object with PCK of the
    12 body joints (per joint and overall), the detection rate and mean ms per image."""
    import json

    from pose_prep.detectors import DetectorUnavailable
    from pose_prep.pose_eval import EvalError, evaluate

    try:
        result = evaluate(images, annotations, detector or _detector_default(), threshold=threshold)
    except (ValueError, FileNotFoundError, DetectorUnavailable) as error:
        raise click.UsageError(str(error)) from None
    except EvalError as error:
        _fail("pose-eval", error, EXIT_FAILED)
    click.echo(json.dumps(result, indent=2))


# --- prep-pose and shards (pose_prep) ---------------------------------------------------------

def _max_retire(context, parameter, value: str) -> str:
    from pose_prep.prep import RetireLimit

    try:
        RetireLimit.parse(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    return value


def _echo_first(kind: str, lines: list[str], total: int | None = None, limit: int = 10) -> None:
    """The first `limit` lines on stderr as `kind: line`, then how many more there are (of `total`)."""
    total = len(lines) if total is None else total
    for line in lines[:limit]:
        click.echo(f"{kind}: {line}", err=True)
    if total > limit:
        click.echo(f"{kind}: ... and {total - limit} more (see the report)", err=True)


def _echo_label_mismatches(match: dict) -> None:
    first = match["first"]
    _echo_first("case only", [f"label row {row} and image {image} differ only in letter case: not matched"
                              for row, image in first["case_only"]], match["case_only"])
    _echo_first("ambiguous", [f"{line}: left unlabelled" for line in first["ambiguous"]], match["ambiguous"])
    _echo_first("unlabelled", first["unlabelled"], match["unlabelled"])
    _echo_first("unmatched label row", first["unmatched_rows"], match["unmatched_rows"])


@main.command("prep-pose")
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False),
              help="Catalog folder, searched recursively (jpg, jpeg, png, webp, bmp).")
@click.option("--labels", type=click.Path(exists=True),
              help="Labels: a DeepFashion attribute-challenge folder, a DeepFashion benchmark folder, or a CSV.")
@click.option("--labels-format", type=click.Choice(["deepfashion-attr", "deepfashion", "csv"]),
              help="Force the labels format instead of detecting it from --labels.")
@click.option("--out", default="shards", show_default=True, type=click.Path(file_okay=False),
              callback=_a_folder_that_can_be_made,
              help="Output folder: shards, index.sqlite, reports/.")
@click.option("--detector", default=None,
              help="Pose detector, as for `vsam pose` (default: the one the collection was built with, else auto).")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(1), help="Worker processes.")
@click.option("--backend", default="loky", show_default=True, type=click.Choice(["loky", "dask"]),
              help="loky: local processes; dask: the cluster at --scheduler.")
@click.option("--scheduler", help="Dask scheduler address (with --backend dask), e.g. tcp://10.0.0.5:8786.")
@click.option("--worker-wait", default=120, show_default=True, type=click.FloatRange(0), metavar="SECONDS",
              help="With dask: how long the run waits while the cluster has no worker (all left, or none started), "
                   "or its scheduler does not answer, saying so on stderr, before it stops (exit 1; what it "
                   "received is committed).")
@click.option("--shard-size", default=1000, show_default=True, type=click.IntRange(1), help="Items per shard.")
@click.option("--compact-below", default=50, show_default=True, type=click.IntRange(0, 100), metavar="PERCENT",
              help="At the end, rewrite every shard with at most this share of live rows (0: never); see "
                   "`vsam shards compact`.")
@click.option("--strict", is_flag=True,
              help="Exit 1 while any file of the catalog is rejected, a folder or file could not be read, or (with "
                   "--labels) an image is unlabelled or a label row matches no image.")
@click.option("--max-retire", default="10%", show_default=True, metavar="N|P%", callback=_max_retire,
              help="Refuse (change nothing, exit 1) a run that would retire more live items than this: a count "
                   "(500) or a share of the live items (10%); 100% allows any, also an empty --images.")
@click.option("--crop-bbox", is_flag=True, help="Store the crop to the annotated box (formats with boxes).")
@click.option("--max-side", default=256, show_default=True, type=click.IntRange(0),
              help="Longer side of the stored JPEG (0: original size).")
@click.option("--jpeg-quality", default=90, show_default=True, type=click.IntRange(1, 100))
@click.option("--splits", help="Keep only images of these splits, e.g. train,val (others are left out).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
def prep_pose(images, labels, labels_format, out, detector, jobs, backend, scheduler, worker_wait, shard_size,
              compact_below, strict, max_retire, crop_bbox, max_side, jpeg_quality, splits, progress) -> None:
    """Detect poses in a catalog and write images, heatmaps, keypoints and labels into HDF5 shards.

    Incremental (only new or changed images are processed, deleted ones retired) and crash-safe;
    one run at a time per output folder (a second one exits with code 75). Exit code 0 also when
    some files were rejected (they are listed in the report); 1 when the run was refused (it would
    retire more than --max-retire, or found no image at all: nothing was changed), with --strict while
    any file is rejected or unreadable or the labels do not pair one to one with the images, or when
    nothing could be processed. A label row pairs with an image only when one path is a
    whole-component suffix of the other and no other pairing is possible."""
    from pathlib import Path

    from pose_prep import lock
    from pose_prep.images import printable_name
    from pose_prep.labels import LabelError
    from pose_prep.prep import DetectorChoiceError, PrepError, PrepOptions, run
    from pose_prep.shard_format import SPLITS, ShardFormatError

    chosen = tuple(s.strip() for s in splits.split(",") if s.strip()) if splits else None
    if chosen and not set(chosen) <= set(SPLITS):
        raise click.BadParameter(f"{splits!r}: splits are {', '.join(SPLITS)}", param_hint="--splits")
    options = PrepOptions(images=Path(images), out=Path(out), labels=Path(labels) if labels else None,
                          labels_format=labels_format, detector=detector, jobs=jobs,
                          backend=backend, scheduler=scheduler, shard_size=shard_size, strict=strict,
                          crop_bbox=crop_bbox, max_side=max_side, jpeg_quality=jpeg_quality, splits=chosen,
                          progress=progress, max_retire=max_retire, worker_wait=worker_wait,
                          compact_below=compact_below / 100)
    try:
        report = run(options)
    except lock.Busy as error:
        _fail("prep-pose", error, EXIT_BUSY)
    except DetectorChoiceError as error:
        raise click.UsageError(str(error)) from None
    except (LabelError, PrepError, ShardFormatError, OSError) as error:   # OSError: a full disk, --out under a file
        _fail("prep-pose", error, EXIT_FAILED)
    for rejected in report.rejected:     # one line each, whatever the name holds (a newline: \n)
        click.echo(f"rejected: {printable_name(rejected['path'])}: {rejected['reason']}", err=True)
    _echo_first("unreadable", [f"{u['path']}: {u['reason']} (its stored items are kept)" for u in report.unreadable])
    if report.labels_match:
        _echo_label_mismatches(report.labels_match)
    if report.status != "refused":
        click.echo(report.summary())
    click.echo(f"report: {report.path}")
    if report.exit_code != EXIT_OK:
        _fail("prep-pose", report.error, report.exit_code)


@main.group()
def shards() -> None:
    """Inspect and check a shard folder written by `vsam prep-pose`."""


@shards.command("info")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
def shards_info(folder) -> None:
    """One JSON object: items per split, with and without pose, schema, detector, vocabularies, rejected files."""
    import json

    from pose_prep.shard_format import ShardFormatError, collection_info

    try:
        click.echo(json.dumps(collection_info(folder), indent=1, ensure_ascii=False))
    except ShardFormatError as error:
        _fail("shards info", error, EXIT_FAILED)


@shards.command("list")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
def shards_list(folder) -> None:
    """One JSON line per live item: path, sha256, split, has_pose, shard, row."""
    import json

    from pose_prep.shard_format import ShardFormatError, live_items

    try:
        for item in live_items(folder):
            click.echo(json.dumps(item, ensure_ascii=False))
    except ShardFormatError as error:
        _fail("shards list", error, EXIT_FAILED)


@shards.command("compact")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--below", default=50, show_default=True, type=click.IntRange(1, 100), metavar="PERCENT",
              help="Rewrite every shard with at most this share of live rows.")
@click.option("--shard-size", type=click.IntRange(1),
              help="Rows per new shard (default: as many as the largest shard holds).")
def shards_compact(folder, below, shard_size) -> None:
    """Rewrite the shards at most --below live, crash-safe (prep-pose does it at the end of each run).

    Old shards are deleted once no running reader holds them (kept in FOLDER/retired/ until then).
    Exit codes: 0 done, 1 the collection is damaged (nothing moved from a damaged shard) or the disk is
    full (one line naming the file; what was committed stays), 75 a prep-pose run holds the folder."""
    from pose_prep import lock
    from pose_prep.atomic import reporting_disk_full
    from pose_prep.compaction import compact
    from pose_prep.shard_format import ShardFormatError, existing_index, open_index

    try:
        # existing_index: no lock nor index is created in a folder that is not a collection. reporting_disk_full:
        # SQLite's full disk (SQLITE_FULL, a WAL -shm that cannot grow) as prep-pose says it.
        with reporting_disk_full(existing_index(folder)), lock.exclusive(folder, command="vsam shards compact"), \
                open_index(folder) as connection:
            done = compact(folder, connection, shard_size, below / 100)
    except lock.Busy as error:
        _fail("shards compact", error, EXIT_BUSY)
    except (ShardFormatError, OSError) as error:      # OSError: a full disk (DiskFull names the file)
        _fail("shards compact", error, EXIT_FAILED)
    click.echo(f"compacted {len(done.shards)} shard(s) ({done.bytes_before} bytes) into {len(done.new_shards)} "
               f"({done.bytes_after} bytes), {done.rows} live rows moved")


@shards.command("verify")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
def shards_verify(folder) -> None:
    """Check every shard's checksums and the index against the files; name what is broken (exit 1)."""
    from pose_prep.lock import is_locked
    from pose_prep.shard_format import verify_collection

    running = is_locked(folder)
    problems = verify_collection(folder, check_leftovers=not running)
    for problem in problems:
        click.echo(f"broken: {problem}")
    if problems:
        _fail("shards verify", f"{len(problems)} problem(s) in {folder}", EXIT_FAILED)
    click.echo(f"ok: {folder}" + (" (a prep-pose run is active: its temporary files were not checked)"
                                  if running else ""))


# --- train (vsam_train) -----------------------------------------------------------------------

def _config_assignments(ctx, param, assignments) -> dict:
    """--set KEY=VALUE options (train, experiment) as config overrides, each typed by the config schema
    (optim.lr=1e-3 is a number); an unknown key, a wrong type or a value out of range is a usage error."""
    from vsam_train.config import ConfigError, parse_assignments

    try:
        return parse_assignments(assignments)
    except ConfigError as error:
        raise click.BadParameter(str(error), ctx=ctx, param=param) from None


@main.command("train")
@click.option("--shards", required=True, type=click.Path(exists=True, file_okay=False),
              help="Shard folder written by `vsam prep-pose`.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              callback=_a_folder_that_can_be_made,
              help="Run folder: config.yaml, checkpoints/, metrics.jsonl, steps.jsonl, tensorboard/.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="YAML recipe (default: the paper's from scratch; configs/paper.yaml adds ImageNet weights).")
@click.option("--model", type=click.Choice(architectures()), help="model.name")
@click.option("--attention", type=click.Choice(attentions()),
              help="model.attention (vsam): the paper's one Ŝ, or one map per attribute group.")
@click.option("--epochs", type=click.IntRange(1), help="train.epochs")
@click.option("--batch-size", type=click.IntRange(1), help="train.batch_size (per process)")
@click.option("--width", type=float, help="model.width (channel multiplier)")
@click.option("--image-size", type=click.IntRange(32), help="model.image_size (a multiple of 32)")
@click.option("--pretrained", help="model.pretrained: 'imagenet' (torchvision's file in the torch hub cache, "
                                   "downloaded if missing), 'none' (from scratch) or a state_dict file.")
@click.option("--workers", type=click.IntRange(0), help="data.num_workers")
@click.option("--decode", type=click.Choice(["cpu", "gpu"]), help="data.decode: JPEGs on CPU workers or nvjpeg.")
@click.option("--compile/--no-compile", default=None, help="train.compile (torch.compile)")
@click.option("--deterministic/--no-deterministic", default=None,
              help="train.deterministic: same results on every run, at some speed.")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE", callback=_config_assignments,
              help="Any other config value, e.g. --set optim.lr=1e-3 (repeatable; typed as docs/config.md says).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from checkpoints/last.pt.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="Default: cuda when present.")
def train(shards, out, config_file, model, attention, epochs, batch_size, width, image_size, pretrained, workers,
          decode, compile, deterministic, assignments, resume, device) -> None:
    """Train VSAM (or a baseline) on a shard folder; under torchrun, with DDP.

    Exit codes: 0 done, 1 the run failed (data, weights, run folder), 2 bad options or config (also an
    --out that holds files but is not a run folder), 75 another `vsam train` is running in --out (one
    run per folder; try again later)."""
    from pose_prep.lock import Busy
    from pose_prep.shard_format import ShardFormatError
    from vsam_train.checkpoint import CheckpointError
    from vsam_train.config import ConfigError
    from vsam_train.models import PretrainedWeightsError
    from vsam_train.train import NotARunFolder, RunFolderError, main as train_main, resolve_run_config

    overrides = {key: value for key, value in (
        ("model.name", model), ("model.attention", attention), ("train.epochs", epochs),
        ("train.batch_size", batch_size), ("model.width", width), ("model.image_size", image_size),
        ("model.pretrained", pretrained), ("data.num_workers", workers), ("data.decode", decode),
        ("train.compile", compile), ("train.deterministic", deterministic))
        if value is not None}
    overrides.update(assignments)
    try:
        config = resolve_run_config(out, config_file, overrides, resume)
        summary = train_main(config, shards, out, resume=resume, device=device)
    except Busy as error:
        _fail("train", error, EXIT_BUSY)
    except (ConfigError, NotARunFolder) as error:
        _fail("train", error, EXIT_USAGE)
    except (RunFolderError, ShardFormatError, PretrainedWeightsError, CheckpointError, OSError, ValueError,
            FloatingPointError) as error:     # OSError: a full disk (DiskFull), an --out that cannot be made
        _fail("train", error, EXIT_FAILED)
    for record in summary["epochs"]:
        val = f", val_loss {record['val_loss']:.4f}" if "val_loss" in record else ""
        click.echo(f"epoch {record['epoch']}: train_loss {record['train_loss']:.4f}{val}")
    if summary["epochs"]:
        click.echo(f"checkpoint: {summary['checkpoint']}")
    elif resume and os.environ.get("RANK", "0") == "0":
        click.echo(f"vsam train: {out} already holds all {summary['epochs_done']} epochs; nothing to do "
                   "(raise --epochs to train on)")


# --- eval, predict, explain, export, experiment (vsam_train) ----------------------------------

_CHECKPOINT = click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False),
                           help="A checkpoint of `vsam train` (e.g. RUN/checkpoints/last.pt).")
_DEVICE = click.option("--device", type=click.Choice(["cpu", "cuda"]), help="Default: cuda when present.")
_CHECKPOINT_OR_MODEL = click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False),
                                    help="A checkpoint of `vsam train` (e.g. RUN/checkpoints/last.pt); or --model.")
_MODEL = click.option("--model", "onnx_model", type=click.Path(exists=True, dir_okay=False),
                      help="A file of `vsam export --format onnx`, run by onnxruntime on the CPU (instead of "
                           "--checkpoint).")


def _a_file_name(context, parameter, value: str | None) -> str | None:
    """An output file option given as "" is a usage error, not the current folder nor the default name."""
    if value == "":
        raise click.BadParameter("an empty path; give a file name", ctx=context, param=parameter)
    return value


def _model_file(checkpoint: str | None, onnx_model: str | None, device: str | None) -> str:
    """--checkpoint FILE or --model FILE.onnx, exactly one (usage error, exit 2, otherwise)."""
    if bool(checkpoint) == bool(onnx_model):
        raise click.UsageError("give either --checkpoint FILE or --model FILE.onnx")
    if onnx_model and not onnx_model.lower().endswith(".onnx"):
        raise click.BadParameter(f"{onnx_model}: not an .onnx file (a checkpoint goes with --checkpoint)",
                                 param_hint="--model")
    if checkpoint and checkpoint.lower().endswith(".onnx"):
        raise click.BadParameter(f"{checkpoint}: an ONNX export goes with --model", param_hint="--checkpoint")
    if onnx_model and device == "cuda":
        raise click.BadParameter("--model runs on the CPU (onnxruntime)", param_hint="--device")
    return checkpoint or onnx_model


def _inference_errors():
    """The exceptions that mean 'this checkpoint, data or folder cannot be used' (exit 1)."""
    from pose_prep.shard_format import ShardFormatError
    from vsam_train.errors import CheckpointError     # torch-free: predict --model never imports torch

    return CheckpointError, ShardFormatError, ValueError, RuntimeError, OSError


@main.command("eval")
@_CHECKPOINT_OR_MODEL
@_MODEL
@click.option("--shards", required=True, type=click.Path(exists=True, file_okay=False),
              help="Shard folder written by `vsam prep-pose` (the same vocabulary as the checkpoint's).")
@click.option("--split", default="val", show_default=True, type=click.Choice(["train", "val", "test", "none"]))
@click.option("--json", "json_out", type=click.Path(dir_okay=False), callback=_a_file_name,
              help="Also write every metric to this file.")
@click.option("--batch-size", type=click.IntRange(1), help="Default: the checkpoint's eval/train batch size.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(0), help="Loader worker processes.")
@click.option("--per-attribute", is_flag=True, help="Also print a table row per attribute (and per category).")
@_DEVICE
def eval_command(checkpoint, onnx_model, shards, split, json_out, batch_size, workers, per_attribute, device) -> None:
    """Score a checkpoint on one split: P@k, R@k, F1@k (macro and weighted), AP, DeepFashion top-3/5
    recall per attribute group (Liu & Lu's protocol, unknown labels as negatives, and the variant
    that leaves unknown labels out of the ranking), group top-1, category top-1/5 accuracy and
    category precision, recall, F1 (macro and weighted), as tables that name their protocol. The
    JSON file's "protocols" says what each key is.

    Exit codes: 0 done, 1 the checkpoint or shards cannot be used (unreadable, other vocabulary,
    empty split), 2 bad options."""
    from pose_prep.atomic import check_output
    from vsam_train.evaluate import EvalError, evaluate_checkpoint, write_json
    from vsam_train.metrics import format_table

    model_file = _model_file(checkpoint, onnx_model, device)
    try:
        if json_out:
            check_output(json_out)      # a path under a file, a folder: said now, not after the evaluation
        metrics = evaluate_checkpoint(model_file, shards, split, batch_size=batch_size, device=device,
                                      workers=workers)
    except (EvalError, *_inference_errors()) as error:
        _fail("eval", error, EXIT_FAILED)
    click.echo(f"{metrics['model']} epoch {metrics['epoch']} on {shards} split {split}")
    click.echo(format_table(metrics, per_attribute=per_attribute))
    if json_out:
        try:
            write_json(metrics, json_out)
        except OSError as error:     # a full disk (pose_prep.atomic.DiskFull names the file), a folder not there
            _fail("eval", error, EXIT_FAILED)
        click.echo(f"metrics: {json_out}")


@main.command("predict")
@_CHECKPOINT_OR_MODEL
@_MODEL
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of photos, searched recursively (jpg, jpeg, png, webp, bmp).")
@click.option("--out", default="-", show_default=True, type=click.Path(dir_okay=False, allow_dash=True),
              callback=_a_file_name, help="JSON Lines file, one line per image ('-': stdout).")
@click.option("--threshold", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="Attributes scoring at least this are listed in \"predicted\".")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1), help="Images per forward pass.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(0),
              help="Threads decoding the next batch while the model runs (0: decode in turn).")
@click.option("--strict", is_flag=True, help="Exit 1 when any file could not be used.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@_DEVICE
def predict_command(checkpoint, onnx_model, images, out, threshold, batch_size, workers, strict, progress,
                    device) -> None:
    """Category and attribute scores for every photo under --images; no pose detector is needed.

    Each line: {"path", "category", "category_prob", "attributes": {name: score}, "predicted": [names],
    "groups" (exclusive groups only)}; a bad file gets {"path", "error"} and a line on stderr, and the
    run goes on. Exit codes: 0 done (also when some files were bad), 1 no image could be predicted,
    or --strict and a file was bad, or the checkpoint cannot be used; 2 bad options."""
    from vsam_train.predict import predict_to_file

    model_file = _model_file(checkpoint, onnx_model, device)
    try:
        summary = predict_to_file(model_file, images, out, threshold=threshold, batch_size=batch_size,
                                  device=device, workers=workers,
                                  progress=sys.stderr.isatty() if progress is None else progress)
    except _inference_errors() as error:
        _fail("predict", error, EXIT_FAILED)
    click.echo(f"vsam predict: {summary.line()}" + (f" -> {out}" if out != "-" else ""), err=True)
    if summary.n_predicted == 0:
        _fail("predict", f"no image under {images} could be predicted", EXIT_FAILED)
    if strict and summary.n_failed:
        _fail("predict", "failed: --strict and some files could not be used", EXIT_FAILED)


@main.command("explain")
@_CHECKPOINT
@click.option("--baseline", type=click.Path(exists=True, dir_okay=False),
              help="A second checkpoint (e.g. vgg16) shown beside the first, for the same attributes.")
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of photos, searched recursively.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              callback=_a_folder_that_can_be_made, help="Gallery folder: index.html, images/.")
@click.option("--attributes", help="Comma-separated attribute names to explain (default: the top predicted).")
@click.option("--top", default=1, show_default=True, type=click.IntRange(1),
              help="Without --attributes: how many of the best-scoring attributes to explain.")
@click.option("--limit", type=click.IntRange(1), help="Only the first N images (sorted by path).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@_DEVICE
def explain_command(checkpoint, baseline, images, out, attributes, top, limit, progress, device) -> None:
    """PNG overlays of Ŝ (VSAM's hallucinated pose attention), CAM of the predicted category (the top
    attribute without a category head), Grad-CAM and saliency (captum) of chosen attributes, and
    OUT/index.html, a gallery with the baseline beside the model.

    Exit codes: 0 done (also when some files were bad: listed in the gallery and on stderr), 1 no
    image could be explained or a checkpoint cannot be used, 2 bad options (unknown attribute, an --out
    that holds files but is not an explain gallery)."""
    from vsam_train.explain import ExplainError, explain_folder

    names = [name.strip() for name in attributes.split(",") if name.strip()] if attributes else None
    try:
        summary = explain_folder(checkpoint, images, out, baseline=baseline, attributes=names, top=top, limit=limit,
                                 device=device, progress=sys.stderr.isatty() if progress is None else progress)
    except ExplainError as error:
        raise click.UsageError(str(error)) from None
    except _inference_errors() as error:
        _fail("explain", error, EXIT_FAILED)
    click.echo(f"vsam explain: {summary.line()}; open {out}/index.html")
    if summary.n_explained == 0:
        _fail("explain", f"no image under {images} could be explained", EXIT_FAILED)


@main.command("audit")
@_CHECKPOINT
@click.option("--shards", required=True, type=click.Path(exists=True, file_okay=False),
              help="Shard folder written by `vsam prep-pose` (the same vocabulary as the checkpoint's).")
@click.option("--split", default="train", show_default=True, type=click.Choice(["train", "val", "test", "none"]),
              help="The split whose labels are audited.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              callback=_a_folder_that_can_be_made,
              help="New or empty folder (or a previous audit's): audit.csv, index.html, images/, summary.json.")
@click.option("--calibration", default="platt", show_default=True, type=click.Choice(["platt", "isotonic", "raw"]),
              help="How each attribute's scores become probabilities (cross-fitted); raw: the model's own.")
@click.option("--top", default=50, show_default=True, type=click.IntRange(0),
              help="Rows of audit.csv: each attribute's N most suspect labels (0: every label).")
@click.option("--gallery", default=6, show_default=True, type=click.IntRange(0),
              help="Rows of index.html: each attribute's N most suspect labels, with photo and overlays.")
@click.option("--batch-size", type=click.IntRange(1), help="Default: the checkpoint's eval/train batch size.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(0), help="Loader worker processes.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@_DEVICE
def audit_command(checkpoint, shards, split, out, calibration, top, gallery, batch_size, workers, progress,
                  device) -> None:
    """Find the labels of a split that the model disagrees with: missing (false or unknown, scored
    high), wrong (true, scored low) and, for mutually exclusive groups, swaps; ranked, per attribute
    and overall, by how strongly the calibrated scores speak against the label (0.5 no evidence, 1
    strong; prior-free, so a rare label is not suspect for being rare). Writes OUT/audit.csv,
    OUT/index.html (photos, Ŝ and Grad-CAM of each attribute's top suspects) and OUT/summary.json.

    Exit codes: 0 done, 1 the checkpoint or shards cannot be used (unreadable, other vocabulary,
    empty split), 2 bad options (an --out that holds other files)."""
    from pose_prep.images import printable_name
    from vsam_train.audit import AuditError, run
    from vsam_train.evaluate import EvalError

    try:
        summary = run(checkpoint, shards, out, split=split, calibration=calibration, top=top, gallery=gallery,
                      batch_size=batch_size, device=device, workers=workers,
                      progress=sys.stderr.isatty() if progress is None else progress)
    except AuditError as error:
        raise click.UsageError(str(error)) from None
    except (EvalError, *_inference_errors()) as error:
        _fail("audit", error, EXIT_FAILED)
    kinds = ", ".join(f"{n} {kind}" for kind, n in summary["by_kind"].items())
    click.echo(f"vsam audit: {summary['n_items']} items, {summary['n_judged']} labels judged ({kinds}); "
               f"{summary['csv_rows']} rows in {out}/audit.csv; open {out}/index.html")
    for row in summary["overall_top"][:10]:
        suggested = f" -> {row['suggested']}" if row["suggested"] else ""
        click.echo(f"{row['rank']:>6}  {row['score']:.3f}  {row['kind']:<7}  {row['attribute']}={row['label']}"
                   f"{suggested}  {printable_name(row['path'])}")


@main.command("export")
@_CHECKPOINT
@click.option("--format", "fmt", required=True, type=click.Choice(["onnx", "torchscript"]))
@click.option("--out", type=click.Path(dir_okay=False), callback=_a_file_name,
              help="Output file (default: beside the checkpoint, NAME.onnx or NAME.torchscript.pt).")
def export_command(checkpoint, fmt, out) -> None:
    """Write the model as ONNX or TorchScript: input (B, 3, S, S) normalised images, outputs the
    attribute (and category) logits and Ŝ; vocabulary and preprocessing in the file's metadata.
    The file is loaded back and checked against the checkpoint before it is kept.

    Exit codes: 0 written and checked, 1 the checkpoint cannot be used (its outputs are not finite) or
    the export does not match, 2 bad options (an --out that is the checkpoint, or whose suffix says
    the other format: .onnx is ONNX)."""
    from vsam_train.export import ExportError, ExportOptionError, export_checkpoint

    try:
        result = export_checkpoint(checkpoint, fmt, out)
    except ExportOptionError as error:
        _fail("export", error, EXIT_USAGE)
    except (ExportError, *_inference_errors()) as error:
        _fail("export", error, EXIT_FAILED)
    click.echo(f"{result.path}: outputs {', '.join(result.outputs)}; largest difference from the checkpoint "
               f"on a probe batch {result.max_difference:.2g}")


@main.group()
def experiment() -> None:
    """Experiments of the paper that train and evaluate several models."""


@experiment.command("label-noise")
@click.option("--shards", required=True, type=click.Path(exists=True, file_okay=False),
              help="Shard folder written by `vsam prep-pose` (with a train and a held-out split).")
@click.option("--attribute", required=True, help="The attribute whose training positives lose their label.")
@click.option("--drop", default=0.75, show_default=True, type=click.FloatRange(0, 1),
              help="Fraction of its positive training labels set to 0.")
@click.option("--category", help="Drop only among the items of this category, and compare within it (the paper: "
                                 "Longsleeved among Coats & Jackets); needs a collection with categories.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="YAML recipe for both models (e.g. configs/tiny.yaml; default: the paper's).")
@click.option("--out", type=click.Path(file_okay=False),
              callback=_a_folder_that_can_be_made, help="New folder (default: label-noise-ATTRIBUTE).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds the dropped labels and train.seed.")
@click.option("--eval-split", default="val", show_default=True, type=click.Choice(["val", "test", "train", "none"]),
              help="Held-out split whose true positives are scored.")
@click.option("--models", default="vsam,vgg16", show_default=True, help="Comma-separated models to compare.")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE", callback=_config_assignments,
              help="Any config value for both models, e.g. --set train.epochs=2 (repeatable).")
@_DEVICE
def label_noise(shards, attribute, drop, category, config_file, out, seed, eval_split, models, assignments,
                device) -> None:
    """Drop a fraction of one attribute's positive training labels (of one --category), train VSAM and
    VGG16 identically on them, and compare the scores they give the dropped training items with the
    kept positives and the negatives (the paper's Fig. 4), and the held-out true positives' scores:
    writes OUT/label_noise_dropped.png, OUT/label_noise.png (a panel per model) and
    OUT/label_noise.json (the numbers of both).

    Exit codes: 0 done, 1 the experiment failed (no positives, non-empty --out, data), 2 bad options."""
    from vsam_train.config import ConfigError
    from vsam_train.experiments.label_noise import ExperimentError, run
    from vsam_train.models import PretrainedWeightsError

    names = tuple(name.strip() for name in models.split(",") if name.strip())
    if not names or not set(names) <= set(architectures()):    # run() sets model.name to each
        raise click.BadParameter(f"{models!r}: choose among {', '.join(architectures())}", param_hint="--models")
    out = out or f"label-noise-{attribute}"
    try:
        report = run(shards, attribute, drop, out, category=category, config_file=config_file, overrides=assignments,
                     seed=seed, eval_split=eval_split, models=names, device=device)
    except ConfigError as error:
        _fail("experiment label-noise", error, EXIT_USAGE)
    except (ExperimentError, PretrainedWeightsError, FloatingPointError, *_inference_errors()) as error:
        _fail("experiment label-noise", error, EXIT_FAILED)
    within = f" among {category}" if category else ""
    click.echo(f"{attribute}{within}: {report['dropped']} of {report['train_positives']} training positives dropped; "
               f"{report['eval_positives']} {eval_split} positives")
    for name, result in report["models"].items():
        train = result["train"]
        means = "  ".join(f"{group.replace('_', ' ')} {_fmt(train[group]['mean'])}"
                          for group in ("dropped", "kept_positives", "negatives"))
        click.echo(f"{name:>8}: training items' mean score: {means}  "
                   f"AUC dropped vs negatives {_fmt(train['AUC_dropped_vs_negatives'])}")
        recall = "  ".join(f"recall@{t} {_fmt(v)}" for t, v in result["recall"].items())
        click.echo(f"{'':>8}  {eval_split} positives: {recall}  mean score {_fmt(result['mean_score'])}  "
                   f"AP {_fmt(result['AP'])}")
    click.echo(f"figures: {out}/label_noise_dropped.png {out}/label_noise.png  numbers: {out}/label_noise.json")


@experiment.command("audit")
@click.option("--shards", required=True, type=click.Path(exists=True, file_okay=False),
              help="Shard folder written by `vsam prep-pose` (with a train and a val split).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              callback=_a_folder_that_can_be_made,
              help="New folder (or this experiment's, to continue it): shards/, runs/, audit/, audit_experiment.json.")
@click.option("--drop-attribute", required=True, help="The attribute whose training positives lose their label.")
@click.option("--drop", default=0.10, show_default=True, type=click.FloatRange(0, 1),
              help="Fraction of its positive training labels set to 0.")
@click.option("--swap-group", help="An exclusive attribute group (e.g. texture) in which labels are swapped.")
@click.option("--swap", default=0.05, show_default=True, type=click.FloatRange(0, 1),
              help="Fraction of the group's singly labelled training items moved to another of its attributes.")
@click.option("--swap-to", default="frequency", show_default=True, type=click.Choice(["frequency", "uniform"]),
              help="How a swap's new attribute is drawn: by how often each is labelled, or uniformly.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="YAML recipe for every model (e.g. configs/small.yaml; default: the paper's).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds the injected errors and train.seed.")
@click.option("--models", default="vsam,vgg16", show_default=True,
              help="Comma-separated models (vsam, vgg16, vsam-groups, resnet50).")
@click.option("--parallel", default=2, show_default=True, type=click.IntRange(1), help="Training runs side by side.")
@click.option("--n", "ns", default="25,50,100,200,400", show_default=True, help="The N of precision@N and recall@N.")
@click.option("--gallery", default=6, show_default=True, type=click.IntRange(0),
              help="Rows per attribute in each model's audit gallery (OUT/audit/<model>/index.html).")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE", callback=_config_assignments,
              help="Any config value for every model, e.g. --set train.epochs=2 (repeatable).")
@_DEVICE
def audit_experiment(shards, out, drop_attribute, drop, swap_group, swap, swap_to, config_file, seed, models, parallel,
                     ns, gallery, assignments, device) -> None:
    """Inject known label errors into a copy of the training split (dropped positives of one
    attribute, swaps within one exclusive group), train each model on it, audit it with `vsam audit`
    and report precision@N and recall@N of the injected errors for the audit's ranking (Platt,
    isotonic) and two baselines (the raw model scores, a random order). Writes
    OUT/audit_experiment.json and OUT/audit_experiment.md; a rerun continues a killed experiment.

    Exit codes: 0 done, 1 the experiment failed (a training run, the data), 2 bad options or config."""
    from vsam_train.checkpoint import inference_device
    from vsam_train.config import ConfigError
    from vsam_train.experiments.compare import CompareError
    from vsam_train.experiments.injected_errors import format_table, run
    from vsam_train.experiments.label_noise import ExperimentError
    from vsam_train.model_registry import list_models

    names = tuple(name.strip() for name in models.split(",") if name.strip())
    if not names or not set(names) <= set(list_models()):
        raise click.BadParameter(f"{models!r}: choose among {', '.join(list_models())}", param_hint="--models")
    try:
        counts = tuple(sorted({int(n) for n in ns.split(",") if n.strip()}))
    except ValueError:
        counts = ()
    if not counts or counts[0] < 1:
        raise click.BadParameter(f"{ns!r}: comma-separated positive whole numbers", param_hint="--n")
    try:
        report = run(shards, out, drop_attribute=drop_attribute, drop=drop, swap_group=swap_group, swap=swap,
                     swap_to=swap_to, config_file=config_file, overrides=assignments, seed=seed, models=names,
                     parallel=parallel,
                     device=inference_device(device).type, ns=counts, gallery=gallery, command=sys.argv,
                     log=lambda message: click.echo(f"vsam experiment audit: {message}", err=True))
    except (ConfigError, CompareError) as error:   # CompareError: --out holds runs of another config
        _fail("experiment audit", error, EXIT_USAGE)
    except (ExperimentError, *_inference_errors()) as error:
        _fail("experiment audit", error, EXIT_FAILED)
    click.echo(format_table(report))
    click.echo(f"numbers: {out}/audit_experiment.json  audits: {out}/audit/<model>/index.html")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
