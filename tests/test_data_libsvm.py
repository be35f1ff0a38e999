"""The LIBSVM read: real MNIST rows parse as documented; every bad input names its file and line."""

from __future__ import annotations

import bz2
from pathlib import Path

import pytest

from sparkml_mnist.config import load_data_spec
from sparkml_mnist.data.libsvm import check_line, load_libsvm, read_libsvm
from sparkml_mnist.data.paths import dataset_paths, sample_paths
from sparkml_mnist.errors import DataError, SparkMnistError

FIRST_LABELS = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
FIRST_ROW_FIRST_INDEX = 152  # 0-based; the file says "153:3"
# Label counts for 0..9 from ../shared/data/mnist-digits/SOURCE.md
FULL_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
FULL_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

GOOD = "5 153:3 154:18 155:18\n0 128:51 129:159\n4 161:67 162:232\n"


def first_pixel(row) -> int:
    """The 0-based index of a row's first non-zero pixel (its bytes are the image)."""
    return next(index for index, value in enumerate(row["pixels"]) if value)


def first_rows(spark, path: str, count: int):
    return read_libsvm(spark, path).orderBy("row").limit(count).collect()


def test_bundled_sample_parses_to_the_documented_first_rows(spark):
    rows = first_rows(spark, sample_paths().train, len(FIRST_LABELS))
    assert [int(r["label"]) for r in rows] == FIRST_LABELS
    assert first_pixel(rows[0]) == FIRST_ROW_FIRST_INDEX
    assert len(rows[0]["pixels"]) == 784
    assert [r["row"] for r in rows] == list(range(len(FIRST_LABELS)))


def test_shared_sample_parses_to_the_documented_first_rows(spark, full_data_dir):
    rows = first_rows(spark, str(full_data_dir / "mnist-digits-sample.txt"), len(FIRST_LABELS))
    assert [int(r["label"]) for r in rows] == FIRST_LABELS
    assert first_pixel(rows[0]) == FIRST_ROW_FIRST_INDEX


def test_row_numbers_follow_the_file_across_partitions(spark, tmp_path):
    # Small splits force several input partitions; "row" must still be the line's position.
    lines = [f"{i % 10} {i % 700 + 1}:{i % 255 + 1}\n" for i in range(3000)]
    path = tmp_path / "many.txt"
    path.write_text("".join(lines))
    spark.conf.set("spark.sql.files.maxPartitionBytes", "4096")
    try:
        data = load_libsvm(spark, str(path))
        rows = data.frame.select("row", "label", "pixels").collect()
    finally:
        spark.conf.unset("spark.sql.files.maxPartitionBytes")
    assert data.num_rows == 3000
    by_row = {r["row"]: r for r in rows}
    assert sorted(by_row) == list(range(3000))
    for i in (0, 1, 999, 1500, 2999):
        assert by_row[i]["label"] == i % 10
        assert first_pixel(by_row[i]) == i % 700 and by_row[i]["pixels"][i % 700] == i % 255 + 1


def test_bz2_and_plain_text_read_the_same(spark, tmp_path):
    (tmp_path / "plain.txt").write_text(GOOD)
    (tmp_path / "packed.txt.bz2").write_bytes(bz2.compress(GOOD.encode()))
    plain = read_libsvm(spark, str(tmp_path / "plain.txt")).orderBy("row").collect()
    packed = read_libsvm(spark, str(tmp_path / "packed.txt.bz2")).orderBy("row").collect()
    assert plain == packed and len(plain) == 3


def test_dataset_paths_prefers_txt_then_bz2(tmp_path):
    (tmp_path / "mnist-digits-train.txt.bz2").write_bytes(b"")
    (tmp_path / "mnist-digits-test.txt").write_text("")
    paths = dataset_paths(str(tmp_path))
    assert paths.train.endswith("mnist-digits-train.txt.bz2")
    assert paths.test.endswith("mnist-digits-test.txt")
    remote = dataset_paths("dbfs:/databricks-datasets/mnist-digits/data-001/")
    assert remote.train == "dbfs:/databricks-datasets/mnist-digits/data-001/mnist-digits-train.txt"


# --- bad inputs: each case is (file content, line at fault, words the message must hold) ---------

BAD_INPUTS = {
    "non_numeric_label": ("5 1:3\nseven 1:3\n", 2, "label 'seven' is not a number"),
    "fractional_label": ("5 1:3\n2.5 1:3\n", 2, "label '2.5' is not an integer class 0..9"),
    "label_out_of_range": ("5 1:3\n0 1:2\n10 1:3\n", 3, "label '10' is not an integer class 0..9"),
    "negative_label": ("-1 1:3\n", 1, "label '-1'"),
    "missing_colon": ("5 1:3\n0 153\n", 2, "'153' is not index:value"),
    "non_numeric_index": ("5 1:3\n0 x:3\n", 2, "index 'x'"),
    "non_numeric_value": ("5 1:3\n0 3:abc\n", 2, "value 'abc'"),
    "index_zero": ("5 1:3\n0 0:200\n", 2, "index 0 is outside 1..784"),
    "index_above_784": ("5 1:3\n1 2:3 785:4\n", 2, "index 785 is outside 1..784"),
    "indices_not_increasing": ("5 1:3\n5 10:3 9:4\n", 2, "not strictly increasing (9 after 10)"),
    "repeated_index": ("5 1:3 1:4\n", 1, "not strictly increasing (1 after 1)"),
    "pixel_above_255": ("5 1:3\n3 5:256\n", 2, "pixel value 256 at index 5 is outside 0..255"),
    "negative_pixel": ("5 1:3\n3 5:-1\n", 2, "pixel value -1"),
    # Pixels travel as one byte each: a fraction would be silently changed, so it is refused.
    "fractional_pixel": ("5 1:3\n3 5:12.5\n", 2, "pixel value 12.5 at index 5 is not a whole number"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_line_is_named_with_file_line_and_text(spark, tmp_path, case):
    content, line_number, words = BAD_INPUTS[case]
    path = tmp_path / f"{case}.txt"
    path.write_text(content)
    with pytest.raises(DataError) as caught:
        read_libsvm(spark, str(path))
    error = caught.value
    assert error.path == str(path)
    assert error.line_number == line_number
    assert error.line_text == content.splitlines()[line_number - 1]
    assert words in str(error)
    assert f"{path}, line {line_number}:" in str(error)


def test_bad_line_number_counts_across_splits_of_a_bz2_file(spark, tmp_path):
    lines = [f"{i % 10} {i % 700 + 1}:{i % 255 + 1}\n" for i in range(4000)]
    lines[3456] = "7 12:999\n"
    path = tmp_path / "late-error.txt.bz2"
    path.write_bytes(bz2.compress("".join(lines).encode()))
    with pytest.raises(DataError) as caught:
        read_libsvm(spark, str(path))
    assert caught.value.line_number == 3457
    assert "pixel value 999" in str(caught.value)


def test_blank_and_comment_lines_are_skipped_but_counted_in_line_numbers(spark, tmp_path):
    path = tmp_path / "comments.txt"
    path.write_text("# made by hand\n5 1:3\n\n4 2:x\n")
    with pytest.raises(DataError) as caught:
        read_libsvm(spark, str(path))
    assert caught.value.line_number == 4
    good = tmp_path / "good-comments.txt"
    good.write_text("# made by hand\n5 1:3\n\n4 2:7\n")
    assert load_libsvm(spark, str(good)).num_rows == 2


def test_missing_path_is_a_clear_error(spark, tmp_path):
    missing = tmp_path / "nowhere" / "mnist-digits-train.txt"
    with pytest.raises(DataError, match="no such file or directory") as caught:
        read_libsvm(spark, str(missing))
    assert caught.value.path == str(missing)


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n"])
def test_empty_file_is_a_clear_error(spark, tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(DataError, match="holds no data rows"):
        read_libsvm(spark, str(path))


def test_errors_belong_to_the_package_family(spark, tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("x 1:1\n")
    with pytest.raises(SparkMnistError):
        read_libsvm(spark, str(path))


def test_check_line_accepts_the_real_layout_and_skips_blank_lines():
    spec = load_data_spec()
    assert check_line("5 153:3 154:18 784:255", 784, spec) is None
    assert check_line("5.0 1:12.0", 784, spec) is None  # whole numbers written as decimals are whole numbers
    assert "not a whole number" in check_line("5 1:0.5", 784, spec)  # pixels travel as bytes
    assert check_line("", 784, spec) is None
    assert check_line("   # comment", 784, spec) is None
    assert check_line("3", 784, spec) is None  # an all-black image has no features


def test_full_mnist_has_the_documented_rows_and_labels(spark, full_data_dir):
    paths = dataset_paths(str(full_data_dir))
    for path, counts in ((paths.train, FULL_TRAIN_COUNTS), (paths.test, FULL_TEST_COUNTS)):
        data = load_libsvm(spark, path)
        assert data.num_rows == sum(counts)
        found = {int(r["label"]): r["count"] for r in data.frame.groupBy("label").count().collect()}
        assert [found[d] for d in range(10)] == counts


def test_full_train_file_keeps_row_order(spark, full_data_dir):
    path = dataset_paths(str(full_data_dir)).train
    frame = read_libsvm(spark, path)
    rows = frame.where("row < 10 or row >= 59998").orderBy("row").collect()
    assert [r["row"] for r in rows] == list(range(10)) + [59998, 59999]
    assert [int(r["label"]) for r in rows[:10]] == FIRST_LABELS
    # The last two lines of the train file, read straight from the bz2 as the reference.
    with bz2.open(Path(path), "rt") as handle:
        tail = handle.read().splitlines()[-2:]
    assert [int(r["label"]) for r in rows[10:]] == [int(line.split()[0]) for line in tail]
