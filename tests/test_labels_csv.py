"""CSV labels as spreadsheets write them (`labels.read_csv`): a UTF-8 byte-order mark, CRLF, blank and
empty rows, cells over several lines; every malformed row refused with file:line (the physical line
where its record starts) and the reason, also through `vsam prep-pose`."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

import bad_images
from cli import EXIT_FAILED, main
from pose_prep.labels import LabelError, read_labels

HEADER = "path,category,attributes,split"


def write(tmp_path, text: str, encoding: str = "utf-8"):
    path = tmp_path / "labels.csv"
    path.write_bytes(text.encode(encoding))
    return path


def test_an_excel_file_with_a_byte_order_mark_crlf_and_empty_rows_is_read(tmp_path):
    # Excel's "CSV UTF-8": a BOM, CRLF line ends, and empty trailing rows of commas.
    path = write(tmp_path, "\ufeff" + HEADER + "\r\nshop/a.jpg,Dress,floral;maxi,train\r\nshop/b.jpg,Jeans,,val\r\n"
                 ",,,\r\n,,,\r\n")
    labels = read_labels(path)
    assert labels.vocabulary.categories == ["Dress", "Jeans"] and labels.vocabulary.attributes == ["floral", "maxi"]
    a, b = labels.for_item("a.jpg"), labels.for_item("b.jpg")
    assert (a.category, a.attributes.tolist(), a.split) == (0, [1, 1], "train")
    assert (b.category, b.split) == (1, "val")
    assert set(labels.items) == {"shop/a.jpg", "shop/b.jpg"}


def test_a_cell_over_several_lines_is_one_record(tmp_path):
    labels = read_labels(write(tmp_path, HEADER + '\na.jpg,"Summer\nDress",,train\nb.jpg,Tee,,val\n'))
    assert labels.vocabulary.categories == ["Summer\nDress", "Tee"] and labels.for_item("b.jpg").split == "val"


@pytest.mark.parametrize("text, message", [
    # blank lines and a quoted cell over two lines before the bad row: its physical line is 7, not 4
    (HEADER + '\na.jpg,Dress,,train\n\n"b.jpg","Coat","floral;\nmaxi",train\n\nc.jpg,Dress,,holdout\n',
     "labels.csv:7: split 'holdout'"),
    (HEADER + "\na.jpg,Dress,,train\n\nb.jpg,Dress\n", r"labels.csv:4: expected 4 fields \(path,category,"
                                                         r"attributes,split\), got 2$"),
    (HEADER + "\na.jpg,Dress,,train,extra\n", r"labels.csv:2: expected 4 fields \(path,category,attributes,split\), "
                                              "got 5$"),
    # a quote never closed swallows the rest of the file into one record: named where it starts
    (HEADER + '\na.jpg,"Dress,,train\nb.jpg,Coat,,val\n', r"labels.csv:2: expected 4 fields .* got 2 "
                                                          r"\(the record runs to line 3: a quote not closed\?\)"),
    (HEADER + "\n\na.jpg,Dress,,train\n\na.jpg,Coat,,train\n", "labels.csv:5: a.jpg is listed twice"),
    (HEADER + ",category_type\na.jpg,Jeans,,train,2\n\nb.jpg,Jeans,,train,1\n",
     "labels.csv:4: category_type of 'Jeans' must be one value of 1, 2, 3"),
    ("\n\n" + HEADER + "\n,Dress,,train\n", "labels.csv:4: empty path"),
    ("path,category,path\na.jpg,Dress,b.jpg\n", "labels.csv:1: column 'path' appears twice"),
    ("\ufeffimage,category\na.jpg,Dress\n", "needs a header with a 'path' column"),
])
def test_a_malformed_row_is_refused_with_its_physical_line(tmp_path, text, message):
    with pytest.raises(LabelError, match=message):
        read_labels(write(tmp_path, text))


def test_a_file_that_is_not_utf8_names_the_line_of_the_first_bad_byte(tmp_path):
    path = write(tmp_path, HEADER + "\na.jpg,Dress,,train\nb.jpg,Négligé,,train\n", encoding="latin-1")
    with pytest.raises(LabelError, match=r"labels.csv:3: not UTF-8 \(byte 0xe9\); save it as UTF-8"):
        read_labels(path)


def test_prep_pose_stops_on_a_malformed_row_before_anything_is_written(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    bad_images.grace_hopper(96).save(images / "a.jpg", quality=90)
    labels = write(tmp_path, "\ufeff" + HEADER + "\r\na.jpg,Dress,,train\r\n\r\nb.jpg,Dress\r\n")
    result = CliRunner().invoke(main, ["prep-pose", "--images", str(images), "--labels", str(labels),
                                       "--out", str(tmp_path / "shards"), "--detector", "blazepose"])
    assert result.exit_code == EXIT_FAILED
    assert result.stderr.strip() == f"vsam prep-pose: {labels}:4: expected 4 fields (path,category,attributes," \
                                    "split), got 2"
    assert not (tmp_path / "shards/index.sqlite").exists() and not list((tmp_path / "shards").glob("shard-*.h5"))
