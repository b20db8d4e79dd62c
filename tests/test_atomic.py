import pytest

from pose_prep.atomic import atomic_path, atomic_write_text


@pytest.mark.parametrize("durable", [False, True])
def test_the_new_content_replaces_the_file_only_when_the_block_completes(tmp_path, durable):
    target = tmp_path / "report.json"
    target.write_text("old")
    with atomic_path(target, durable=durable) as temporary:
        assert temporary == tmp_path / ".report.json.tmp"
        temporary.write_bytes(b"new")
        assert target.read_text() == "old"
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "last.pt"
    target.write_text("old")
    with pytest.raises(ZeroDivisionError):
        with atomic_path(target, durable=True) as temporary:
            temporary.write_text("half")
            1 / 0
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_text_is_written_as_utf8(tmp_path):
    atomic_write_text(tmp_path / "a.json", "größe")
    assert (tmp_path / "a.json").read_bytes() == "größe".encode("utf-8")
