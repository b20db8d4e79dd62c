"""A folder of real photos under awkward file names, as catalog drops produce them.

`make_awkward_name_folder(folder)` writes one small real photo (matplotlib's Grace Hopper) under
each name of AWKWARD_NAMES (valid UTF-8: every command must process them) and of NOT_UTF8 (raw
bytes that are not valid UTF-8, as a Latin-1 or Windows-1252 tool writes them: every command must
reject each with one line and go on), and an empty file under EMPTY_FILE (a name with a newline).
It returns {relative path: None, or the rejection reason}, a rejected path written as outputs write
it (its undecodable bytes as \\xNN escapes).
"""
from __future__ import annotations

import io
import os
from pathlib import Path

from bad_images import grace_hopper

# Valid UTF-8 names that a shell, a URL or an HTML page would mangle without quoting.
AWKWARD_NAMES = (
    "with space.jpg",
    "-leading-dash.jpg",
    "--help.jpg",
    "#hash 50% what?.jpg",
    "<b>tag</b> & \"double\" 'single'.jpg",
    "new\nline.jpg",
    "back\\slash.jpg",
    "folder with space/ünïcødé 模特.jpg",
)
# Raw bytes, relative to the folder: a name in Latin-1 (é = 0xE9), a lone 0xFF, a folder whose name
# is not UTF-8 (the photo inside has a plain name).
NOT_UTF8 = (b"caf\xe9.jpg", b"bad\xff.jpg", b"dir\xfe/inside.jpg")
# How outputs write them: the undecodable bytes as \xNN escapes.
NOT_UTF8_WRITTEN = ("caf\\xe9.jpg", "bad\\xff.jpg", "dir\\xfe/inside.jpg")
NAME_REASON = "file name is not valid UTF-8"
# An empty file under a name with a newline: its rejection line must stay one line (\\n escaped).
EMPTY_FILE = "zero\nbytes.jpg"
EMPTY_REASON = "empty file (0 bytes)"


def photo_bytes(max_side: int = 96) -> bytes:
    buffer = io.BytesIO()
    grace_hopper(max_side).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def make_awkward_name_folder(folder: str | os.PathLike) -> dict[str, str | None]:
    """Write the photos into `folder` (created); return {written name: None or the rejection reason}."""
    folder = Path(folder)
    data = photo_bytes()
    expected: dict[str, str | None] = {}
    for name in AWKWARD_NAMES:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected[name] = None
    (folder / EMPTY_FILE).write_bytes(b"")
    expected[EMPTY_FILE] = EMPTY_REASON
    root = os.fsencode(folder)
    for raw, written in zip(NOT_UTF8, NOT_UTF8_WRITTEN):
        path = os.path.join(root, raw)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        expected[written] = NAME_REASON
    return expected
