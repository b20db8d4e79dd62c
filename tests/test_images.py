import os

import numpy as np
import pytest
from PIL import Image

import bad_images as bad
from awkward_names import make_awkward_name_folder
from pose_prep import images


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_images")
    return folder, bad.make_bad_image_folder(folder)


def test_discovery_is_recursive_case_insensitive_and_ignores_link_loops(bad_folder):
    folder, expected = bad_folder
    found = [p.relative_to(folder).as_posix() for p in images.find_images(folder)]
    assert found == sorted(found)
    assert set(found) == set(expected), "no path through nested/loop, nothing missed"
    assert bad.UNICODE in found and bad.UNICODE.endswith(".JPG")
    assert bad.DANGLING in found, "a dangling link is listed, then fails on read"


def test_every_case_decodes_or_fails_with_its_reason(bad_folder):
    folder, expected = bad_folder
    for name, reason in expected.items():
        if reason is None:
            data, decoded = images.load(folder / name)
            assert decoded.rgb.dtype == np.uint8 and decoded.rgb.ndim == 3 and decoded.rgb.shape[2] == 3, name
            assert (decoded.width, decoded.height) == (decoded.rgb.shape[1], decoded.rgb.shape[0])
            assert len(data) == os.path.getsize(folder / name)
        else:
            with pytest.raises(images.BadImage) as caught:
                images.load(folder / name)
            assert reason in caught.value.reason, (name, caught.value.reason)
            assert str(folder / name) in str(caught.value), "the error names the file"


def test_exif_rotation_is_applied(bad_folder):
    folder, _ = bad_folder
    _, decoded = images.load(folder / bad.EXIF_ROTATED)
    assert (decoded.width, decoded.height) == bad.EXIF_ROTATED_UPRIGHT_SIZE
    upright = np.asarray(bad.grace_hopper().resize(bad.EXIF_ROTATED_UPRIGHT_SIZE, Image.LANCZOS), np.float32)
    error = np.abs(decoded.rgb.astype(np.float32) - upright).mean()
    assert error < 8, f"decoded pixels differ from the upright photo by {error:.1f} on average"


def test_colour_modes_come_out_as_the_photo(bad_folder):
    folder, _ = bad_folder
    crew = np.asarray(bad.astronaut(), np.float32)
    for name in (bad.CMYK, bad.RGBA):
        _, decoded = images.load(folder / name)
        # RGBA is at alpha 200/255 over white; CMYK goes through JPEG: both stay close to the photo.
        assert np.abs(decoded.rgb.astype(np.float32) - crew).mean() < 40, name
    gray = np.asarray(bad.grace_hopper().convert("L"), np.float32)
    for name in (bad.GRAYSCALE, bad.PNG16):
        _, decoded = images.load(folder / name)
        assert (decoded.rgb[:, :, 0] == decoded.rgb[:, :, 2]).all(), name
        assert np.abs(decoded.rgb[:, :, 0].astype(np.float32) - gray).mean() < 4, f"{name}: 16 bits scaled to 8"


def test_rgba_sits_on_white(tmp_path):
    transparent = np.zeros((8, 8, 4), np.uint8)
    Image.fromarray(transparent).save(tmp_path / "clear.png")
    _, decoded = images.load(tmp_path / "clear.png")
    assert (decoded.rgb == 255).all()


def test_duplicates_have_the_same_bytes(bad_folder):
    folder, _ = bad_folder
    assert images.load(folder / bad.DUPLICATE_A)[0] == images.load(folder / bad.DUPLICATE_B)[0]


def test_pixel_limit_is_configurable(bad_folder):
    folder, _ = bad_folder
    with pytest.raises(images.BadImage, match="too many pixels"):
        images.load(folder / bad.GRAYSCALE, max_pixels=1000)


def test_unreadable_file_as_the_current_user(bad_folder):
    folder, expected = bad_folder
    # chmod 000 stops everyone but root, which CI runs as: then the file simply reads.
    if os.geteuid() == 0:
        assert expected[bad.NO_PERMISSION] is None
        images.load(folder / bad.NO_PERMISSION)
    else:
        with pytest.raises(images.BadImage, match="permission denied"):
            images.load(folder / bad.NO_PERMISSION)


def test_a_directory_named_like_an_image_and_a_missing_root(tmp_path):
    (tmp_path / "album.jpg").mkdir()
    with pytest.raises(images.BadImage, match="is a directory"):
        images.load(tmp_path / "album.jpg")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        images.find_images(tmp_path / "nowhere")


def test_catalog_images_name_every_file_in_utf8_and_reject_names_that_are_not(tmp_path):
    """Real files whose names are not valid UTF-8 (a Latin-1 é, a lone 0xFF, a folder) next to valid
    but awkward names: each is found once, in sorted order, with a name every output can write."""
    expected = make_awkward_name_folder(tmp_path)
    found = images.catalog_images(tmp_path)
    assert {image.name: image.reason for image in found} == {
        name: reason if reason == images.NAME_NOT_UTF8 else None for name, reason in expected.items()}
    assert [image.path for image in found] == images.find_images(tmp_path)
    for image in found:
        image.name.encode("utf-8")                       # strict: every name can be written
        assert image.path.is_file()                      # the path still opens the real file
    rejected = {image.name for image in found if image.reason}
    assert rejected == {"caf\\xe9.jpg", "bad\\xff.jpg", "dir\\xfe/inside.jpg"}


def test_printable_name_escapes_undecodable_bytes_and_control_characters_only():
    assert images.printable_name(os.fsdecode(b"caf\xe9.jpg")) == "caf\\xe9.jpg"
    assert images.printable_name("new\nline\t.jpg") == "new\\nline\\t.jpg"
    awkward = "ünïcødé 模特 <b>&\"'#%?.jpg"
    assert images.printable_name(awkward) == awkward
