"""Real photos that installed packages ship, for the demo: `python -m pose_prep.sample_images DIR`.

People: matplotlib's grace_hopper.jpg (a front-view portrait), scikit-image's astronaut (Eileen
Collins, head and torso) and camera (a cameraman in profile, grayscale). Nobody: scikit-image's
chelsea (a cat) and coffee (a cup), on which a detector should find no one.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

PEOPLE = ("grace_hopper.jpg", "astronaut.png", "camera.png")
NOBODY = ("chelsea.png", "coffee.png")


def write_sample_images(folder: str | Path) -> list[Path]:
    from matplotlib import cbook
    from PIL import Image
    from skimage import data

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "grace_hopper.jpg"]
    shutil.copyfile(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), written[0])
    for name in PEOPLE[1:] + NOBODY:
        path = folder / name
        Image.fromarray(getattr(data, Path(name).stem)()).save(path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m pose_prep.sample_images DIR", file=sys.stderr)
        return 2
    for path in write_sample_images(argv[0]):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
