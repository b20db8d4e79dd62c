"""Finding and safely decoding catalog images.

Every way an image can be bad ends in one `BadImage` that names the file and the reason, so a batch
job can record it and go on. Decoding applies the EXIF orientation (keypoints must match the pixels
people see) and brings every mode (CMYK, grayscale, palette, RGBA, 16-bit) to 8-bit RGB.

File names: every command that walks a folder (pose, prep-pose, predict, explain) takes its list
from `catalog_images`, so that all of them name files alike. A relative path that is valid UTF-8 is
written as it is (JSON escapes what it must, HTML is escaped). A path that is not valid UTF-8 (bytes
a Latin-1 or Windows tool wrote) cannot be written into a UTF-8 output, nor stored as an item or
joined to a catalog by name, so the file is rejected with NAME_NOT_UTF8; outputs write its name with
the undecodable bytes as \\xNN escapes (`caf\\xe9.jpg`), which shows a person which file to rename
but is not a name that opens anything. One-line messages (stderr, gallery text) show any name through
`printable_name`, so that a newline in a name cannot split a line.
"""
from __future__ import annotations

import io
import os
import sys
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

NAME_NOT_UTF8 = "file name is not valid UTF-8"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
# A catalog photo is a few megapixels; anything far beyond is a decompression bomb.
MAX_PIXELS = 50_000_000


class BadImage(Exception):
    """An image that cannot be used; str() is 'path: reason'."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass
class DecodedImage:
    rgb: np.ndarray          # (H, W, 3) uint8, EXIF orientation applied
    width: int
    height: int


def find_images(root: str | os.PathLike, on_error: Callable[[OSError], None] | None = None) -> list[Path]:
    """Image files under `root`, recursively, sorted; suffixes matched case-insensitively.
    Symbolic links to directories are not followed (a link loop must not hang a batch job).
    A folder that cannot be listed (permission, I/O error) is skipped; `on_error` gets its OSError
    (`.filename` names the folder), so a caller can tell "not there" from "not seen"."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    found = []
    for folder, subfolders, files in os.walk(root, onerror=on_error, followlinks=False):
        subfolders.sort()
        found.extend(Path(folder) / name for name in files if Path(name).suffix.lower() in IMAGE_SUFFIXES)
    return sorted(found)


def warn_unreadable(stream=None) -> Callable[[OSError], None]:
    """An `on_error` for `find_images`/`catalog_images` that writes one line per folder that cannot be
    listed, `unreadable: FOLDER: reason (its photos are skipped)`, to `stream` (stderr), so that photos a
    command did not see are never silent (prep-pose keeps such a folder's stored items instead)."""
    def warn(error: OSError) -> None:
        folder = os.fsdecode(error.filename) if error.filename is not None else "?"
        print(f"unreadable: {printable_name(folder)}: {error.strerror or error} (its photos are skipped)",
              file=stream or sys.stderr, flush=True)
    return warn


@dataclass(frozen=True)
class CatalogImage:
    path: Path               # the file (opens it, whatever its name)
    name: str                # its path relative to the root, POSIX separators, as outputs write it: valid UTF-8
    reason: str | None       # NAME_NOT_UTF8 when the file must be rejected for its name, else None


def catalog_images(root: str | os.PathLike, on_error: Callable[[OSError], None] | None = None) -> list[CatalogImage]:
    """`find_images(root)` with the name each command writes for each file (see the module docstring)."""
    root = Path(root)
    found = []
    for path in find_images(root, on_error):
        relative = path.relative_to(root).as_posix()
        try:
            relative.encode("utf-8")
        except UnicodeEncodeError:    # os.walk decoded the undecodable bytes as lone surrogates
            found.append(CatalogImage(path, printable_name(relative), NAME_NOT_UTF8))
        else:
            found.append(CatalogImage(path, relative, None))
    return found


def printable_name(name: str) -> str:
    """`name` for a one-line, UTF-8 message: bytes that are not UTF-8 (surrogate-escaped, as os.walk
    gives them) as \\xNN, control characters (newline, tab, ...) as Python writes them (\\n, \\t)."""
    try:
        text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:        # a surrogate no file system returns: escape it as it is
        text = name.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) == "Cc" else c
                   for c in text)


def read_bytes(path: str | os.PathLike) -> bytes:
    try:
        data = Path(path).read_bytes()
    except PermissionError:
        raise BadImage(path, "permission denied") from None
    except IsADirectoryError:
        raise BadImage(path, "is a directory") from None
    except OSError as error:
        raise BadImage(path, f"cannot read ({error.strerror or error})") from None
    if not data:
        raise BadImage(path, "empty file (0 bytes)")
    return data


def decode(data: bytes, path: str | os.PathLike = "<bytes>", max_pixels: int = MAX_PIXELS) -> DecodedImage:
    """Encoded bytes → 8-bit RGB with the EXIF orientation applied."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise BadImage(path, f"too many pixels ({width}x{height} > {max_pixels}): possible decompression bomb")
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImage(path, f"decompression bomb ({error})") from None
    except UnidentifiedImageError:
        raise BadImage(path, "not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImage(path, f"corrupt or truncated image ({error})") from None
    return DecodedImage(rgb=rgb, width=rgb.shape[1], height=rgb.shape[0])


def load(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> tuple[bytes, DecodedImage]:
    """The file's bytes (for hashing and storage) and its decoded pixels."""
    data = read_bytes(path)
    return data, decode(data, path, max_pixels)


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit (or 32-bit integer) grayscale: scale the used range to 8 bits.
        values = np.asarray(image, np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        gray = np.clip(values / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "F":
        values = np.asarray(image, np.float64)
        gray = np.clip(values * (255.0 if values.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Product shots with transparency sit on white, as a web shop shows them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))
