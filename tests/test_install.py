"""The installed environment: consistent requirements and exactly one cv2 (docs/install.md, "One cv2")."""
import importlib.util
import subprocess
import sys
from importlib import metadata
from pathlib import Path

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"


def _pinned(name: str) -> str:
    for line in CONSTRAINTS.read_text().splitlines():
        package, _, version = line.partition("==")
        if package.strip().lower() == name:
            return version.strip()
    raise AssertionError(f"{name} is not pinned in {CONSTRAINTS}")


def test_pip_check_is_clean():
    completed = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_one_cv2_on_the_path():
    locations = []
    for entry in sys.path:
        folder = Path(entry or ".")
        if folder.is_dir():
            locations += [str(p) for p in folder.iterdir() if p.name == "cv2" or p.name.startswith("cv2.")]
    assert len(locations) == 1, f"cv2 found in several places: {locations}"
    spec = importlib.util.find_spec("cv2")
    assert Path(spec.origin).parent == Path(locations[0])


def test_cv2_is_the_pinned_contrib_build():
    import cv2

    # mediapipe needs the contrib modules; ultralytics is content with any build of the same version.
    assert hasattr(cv2, "xfeatures2d") and hasattr(cv2, "ximgproc"), "cv2 is not the contrib build"
    pinned = _pinned("opencv-contrib-python")
    assert metadata.version("opencv-contrib-python") == pinned
    assert cv2.__version__ == ".".join(pinned.split(".")[:3])
    # Every OpenCV wheel writes the same cv2/ folder: another build or version beside the contrib one
    # would have replaced some of its files. ultralytics pulls opencv-python: it must match exactly.
    installed = {d.metadata["Name"].lower(): d.version for d in metadata.distributions()
                 if d.metadata["Name"] and d.metadata["Name"].lower().startswith("opencv")}
    assert set(installed) <= {"opencv-contrib-python", "opencv-python"}, installed
    assert set(installed.values()) == {pinned}, installed
