"""A folder of real bad (and awkward but valid) image files, built from photos that installed packages ship.

`make_bad_image_folder(folder)` returns {relative path: expected} where expected is None for a file
that must decode (and be processed) and otherwise a substring of the `BadImage` reason it must get.
The symbolic-link loop `nested/loop -> ..` is not a file and not in the mapping: a discovery that
followed it would find `nested/loop/...` paths that are not keys, or never end.
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# Names the tests refer to directly.
ZERO_BYTES = "zero_bytes.jpg"
TRUNCATED = "truncated.jpg"
TEXT_AS_JPEG = "notes_not_an_image.jpg"
CMYK = "cmyk_astronaut.jpg"
GRAYSCALE = "grayscale_grace_hopper.jpg"
PNG16 = "sixteen_bit_grace_hopper.png"
RGBA = "rgba_astronaut.png"
EXIF_ROTATED = "exif_rotated_grace_hopper.jpg"
BOMB = "decompression_bomb.png"
HUGE = "huge_declared_size.png"
UNICODE = "modèle_çà_模特.JPG"
NO_PERMISSION = "no_permission.jpg"
DANGLING = "dangling_link.jpg"
DUPLICATE_A = "duplicate_a.jpg"
DUPLICATE_B = "nested/duplicate_b.jpeg"
NESTED_VALID = "nested/astronaut.png"

# The size the EXIF-rotated photo shows once its orientation is applied: (width, height).
EXIF_ROTATED_UPRIGHT_SIZE = (256, 300)
BOMB_DECLARED_SIZE = (40_000, 40_000)   # beyond Pillow's own limit
HUGE_DECLARED_SIZE = (8_000, 8_000)     # under Pillow's limit, over pose_prep.images.MAX_PIXELS


def grace_hopper(max_side: int = 300) -> Image.Image:
    """Matplotlib's sample photo (a front-view portrait), RGB, scaled to `max_side`."""
    from matplotlib import cbook

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as image:
        return _shrink(image.convert("RGB"), max_side)


def astronaut(max_side: int = 320) -> Image.Image:
    """scikit-image's astronaut (Eileen Collins, front view, head and torso), RGB."""
    from skimage import data

    return _shrink(Image.fromarray(data.astronaut()), max_side)


def _shrink(image: Image.Image, max_side: int) -> Image.Image:
    scale = max_side / max(image.size)
    if scale >= 1:
        return image
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)


def _jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width × height 1-bit pixels, with only a few rows of data: a tiny
    file that would expand to gigabytes if a decoder believed it."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    rows = zlib.compress(b"\x00" * ((width + 7) // 8 + 1) * 16, 9)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", rows)
            + _png_chunk(b"IEND", b""))


def _exif_rotated(image: Image.Image) -> bytes:
    # Orientation 6: "rotate 90° clockwise to display". Store the pixels turned 90° counter-clockwise,
    # so a viewer that applies the tag shows the photo upright.
    stored = image.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _jpeg_bytes(stored, exif=exif.tobytes())


def make_bad_image_folder(folder: str | os.PathLike) -> dict[str, str | None]:
    """Write the bad and awkward files into `folder` (created); return {relative path: expected}."""
    folder = Path(folder)
    (folder / "nested").mkdir(parents=True, exist_ok=True)
    hopper, crew = grace_hopper(), astronaut()
    hopper_jpeg, crew_jpeg = _jpeg_bytes(hopper), _jpeg_bytes(crew)
    upright = hopper.resize(EXIF_ROTATED_UPRIGHT_SIZE, Image.LANCZOS)
    sixteen_bit = (np.asarray(hopper.convert("L"), np.uint16) * 257).astype(np.uint16)
    rgba = np.dstack([np.asarray(crew), np.full(crew.size[::-1], 200, np.uint8)])

    files: dict[str, tuple[bytes, str | None]] = {
        ZERO_BYTES: (b"", "empty file"),
        TRUNCATED: (hopper_jpeg[: len(hopper_jpeg) // 3], "truncated"),
        TEXT_AS_JPEG: ("size,colour\nM,red\n".encode(), "not an image"),
        CMYK: (_jpeg_bytes(crew.convert("CMYK")), None),
        GRAYSCALE: (_jpeg_bytes(hopper.convert("L")), None),
        PNG16: (_png_bytes(Image.fromarray(sixteen_bit)), None),
        RGBA: (_png_bytes(Image.fromarray(rgba)), None),
        EXIF_ROTATED: (_exif_rotated(upright), None),
        BOMB: (bomb_png(*BOMB_DECLARED_SIZE), "decompression bomb"),
        HUGE: (bomb_png(*HUGE_DECLARED_SIZE), "decompression bomb"),
        UNICODE: (hopper_jpeg, None),
        DUPLICATE_A: (crew_jpeg, None),
        DUPLICATE_B: (crew_jpeg, None),
        NESTED_VALID: (_png_bytes(crew), None),
        # chmod 000 stops every user but root; as root the file reads and decodes.
        NO_PERMISSION: (hopper_jpeg, None if os.geteuid() == 0 else "permission denied"),
    }
    expected = {}
    for name, (data, outcome) in files.items():
        (folder / name).write_bytes(data)
        expected[name] = outcome
    (folder / NO_PERMISSION).chmod(0)

    (folder / DANGLING).symlink_to("no_such_photo.jpg")
    expected[DANGLING] = "cannot read"
    (folder / "nested" / "loop").symlink_to("..", target_is_directory=True)
    return expected


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
