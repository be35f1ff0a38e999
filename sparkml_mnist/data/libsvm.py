"""LIBSVM files -> validated Spark DataFrames, through Spark's own ``libsvm`` source.

A valid file is parsed once: one pass validates every row, turns it into compact pixel bytes and is
kept; counting the rows of every input partition (so each row gets its 0-based position in the file
without a shuffle) reads what was kept. Only when that pass fails or finds bad values is the file
scanned again as text, to name the first bad line: Spark's own parse errors do not say which line or
file is at fault.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from sparkml_mnist.config import DataSpec, load_data_spec
from sparkml_mnist.data.columns import LABEL_COLUMN, PIXELS_COLUMN, ROW_COLUMN
from sparkml_mnist.data.compact import BAD_COLUMN, COMPACT_SCHEMA, ID_COLUMN, compact_rows
from sparkml_mnist.errors import DataError

LIBSVM_SOURCE = "libsvm"
# monotonically_increasing_id() keeps the partition index in its upper 31 bits, the position
# inside the partition in its lower 33 bits (Spark's documented layout).
_PARTITION_SHIFT = 33
_POSITION_MASK = (1 << _PARTITION_SHIFT) - 1
_FIX_HINT = "Fix or remove that line, or point the job at a file in the MNIST LIBSVM layout"


@dataclass(frozen=True)
class LibsvmData:
    """A validated LIBSVM input: ``frame`` has ``row: bigint, label: int, pixels: binary`` (784 ``uint8``).

    The rows are parsed once and kept (Spark's storage, memory and disk) for every later use: the row
    count, the shards, the test set. ``release()`` frees them.
    """

    path: str
    frame: DataFrame
    num_rows: int
    kept: DataFrame | None = None

    def release(self) -> None:
        if self.kept is not None:
            self.kept.unpersist()


def read_libsvm(spark: SparkSession, path: str, num_features: int | None = None) -> DataFrame:
    """Read and validate a LIBSVM file: ``row: bigint, label: int, pixels: binary`` (one byte a pixel).

    ``row`` is each image's 0-based position in the file (for a folder of files: in Spark's
    reading order), so splits can follow the file's order as Keras's ``validation_split`` does.
    """
    return load_libsvm(spark, path, num_features=num_features).frame


def load_libsvm(
    spark: SparkSession,
    path: str,
    num_features: int | None = None,
    spec: DataSpec | None = None,
) -> LibsvmData:
    """``read_libsvm`` that also returns the row count its validating pass measured.

    One parse of the file: Spark's ``libsvm`` source reads it, one pass turns every row into its label
    and 784 pixel bytes while checking both (``compact``), and that result is kept for every later use;
    the row counts and the checks are read from it. Only when something is wrong is the file scanned
    again as text, to name the first bad line.
    """
    spec = spec or load_data_spec()
    features = num_features if num_features is not None else spec.num_features
    if features <= 0:
        raise DataError(path, f"num_features must be positive, got {features}")
    kept = None
    try:
        raw = spark.read.format(LIBSVM_SOURCE).option("numFeatures", str(features)).load(path)
        raw = raw.withColumn(ID_COLUMN, F.monotonically_increasing_id())
        compact = raw.mapInArrow(compact_rows(features, spec.num_classes, spec.max_pixel_value), COMPACT_SCHEMA)
        kept = compact.persist(StorageLevel.MEMORY_AND_DISK)
        summary = _summarise(kept).collect()
    except Exception as error:  # Spark's parse errors arrive as many exception types
        if kept is not None:
            kept.unpersist()
        if _is_missing_path(error):
            raise DataError(
                path, "no such file or directory", hint="Check the data path (--data, --train, --test)"
            ) from None
        _raise_first_bad_line(spark, path, features, spec, cause=error)
        raise  # unreachable: the call above always raises

    num_rows = sum(row["rows"] for row in summary)
    if num_rows == 0 or any(row["bad"] for row in summary):
        kept.unpersist()
    if num_rows == 0:
        raise DataError(
            path,
            "holds no data rows (empty, or only blank and comment lines)",
            hint="Expected lines such as '5 153:3 154:18 ...'",
        )
    if any(row["bad"] for row in summary):
        _raise_first_bad_line(spark, path, features, spec, cause=None)

    frame = kept.select(_row_position(kept[ID_COLUMN], summary).alias(ROW_COLUMN), LABEL_COLUMN, PIXELS_COLUMN)
    return LibsvmData(path=path, frame=frame, num_rows=num_rows, kept=kept)


def _summarise(compact: DataFrame) -> DataFrame:
    """Per input partition: its row count and how many rows break the layout (label or a pixel)."""
    return compact.groupBy(F.shiftright(F.col(ID_COLUMN), _PARTITION_SHIFT).alias("partition")).agg(
        F.count(F.lit(1)).alias("rows"),
        F.sum(F.col(BAD_COLUMN).cast("int")).alias("bad"),
    )


def _row_position(row_id: Column, summary: list) -> Column:
    """0-based position in the file: rows in earlier partitions + position inside this one."""
    counts = {int(row["partition"]): int(row["rows"]) for row in summary}
    offsets, total = [], 0
    for partition in range(max(counts) + 1):
        offsets.append(total)
        total += counts.get(partition, 0)
    partition_index = F.shiftright(row_id, _PARTITION_SHIFT).cast("int") + 1
    offset = F.element_at(F.array(*[F.lit(o).cast("bigint") for o in offsets]), partition_index)
    return offset + row_id.bitwiseAND(F.lit(_POSITION_MASK))


def _is_missing_path(error: Exception) -> bool:
    condition = getattr(error, "getCondition", None) or getattr(error, "getErrorClass", None)
    try:
        if callable(condition) and condition() == "PATH_NOT_FOUND":
            return True
    except Exception:  # older clients may raise for errors without a condition
        pass
    return "PATH_NOT_FOUND" in str(error) or "Path does not exist" in str(error)


# ---------------------------------------------------------------------------------------------
# Locating the first bad line (only on failure): the same rules as Spark's parser plus ours.
# ---------------------------------------------------------------------------------------------


def check_line(line: str, num_features: int, spec: DataSpec) -> str | None:
    """Why a LIBSVM line breaks the MNIST layout, or ``None`` when it is fine (or skipped)."""
    text = line.strip()
    if not text or text.startswith("#"):  # Spark's libsvm source skips these
        return None
    tokens = [token for token in text.split(" ") if token]
    label_token, items = tokens[0], tokens[1:]
    try:
        label = float(label_token)
    except ValueError:
        return f"label {label_token!r} is not a number"
    if math.isnan(label) or label != math.floor(label) or not 0 <= label < spec.num_classes:
        return f"label {label_token!r} is not an integer class 0..{spec.num_classes - 1}"
    previous = 0
    for item in items:
        parts = item.split(":")
        if len(parts) != 2:
            return f"feature {item!r} is not index:value (missing or extra colon)"
        index_token, value_token = parts
        try:
            index = int(index_token)
        except ValueError:
            return f"feature index {index_token!r} in {item!r} is not an integer"
        try:
            value = float(value_token)
        except ValueError:
            return f"feature value {value_token!r} in {item!r} is not a number"
        if not 1 <= index <= num_features:
            return f"feature index {index} is outside 1..{num_features} (indices are 1-based)"
        if index <= previous:
            return f"feature indices are not strictly increasing ({index} after {previous})"
        if math.isnan(value) or not 0 <= value <= spec.max_pixel_value:
            return f"pixel value {value_token} at index {index} is outside 0..{spec.max_pixel_value}"
        if value != math.floor(value):
            return f"pixel value {value_token} at index {index} is not a whole number (pixels are 0..255)"
        previous = index
    return None


@dataclass(frozen=True)
class BadLine:
    path: str
    line_number: int
    text: str
    problem: str


def find_first_bad_line(
    spark: SparkSession, path: str, num_features: int, spec: DataSpec
) -> BadLine | None:
    """Scan the file(s) as text in parallel and return the first line that breaks the layout.

    Each input split reports its line count and its first bad line; lines are numbered by adding
    the counts of the earlier splits of the same file (ordered by their start offset).
    """
    lines = spark.read.text(path).select(
        F.col("value"),
        F.col("_metadata.file_path").alias("file"),
        F.col("_metadata.file_block_start").alias("start"),
    )

    def scan(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        splits: dict[tuple[str, int], list] = {}  # (file, start) -> [lines, bad_index, problem, text]
        for batch in batches:
            values = batch.column("value").to_pylist()
            files = batch.column("file").to_pylist()
            starts = batch.column("start").to_pylist()
            for value, file, start in zip(values, files, starts):
                split = splits.setdefault((file, start), [0, -1, None, None])
                if split[1] < 0:
                    problem = check_line(value or "", num_features, spec)
                    if problem is not None:
                        split[1:] = [split[0], problem, value]
                split[0] += 1
        yield pa.RecordBatch.from_pylist(
            [
                {"file": f, "start": s, "lines": v[0], "bad": v[1], "problem": v[2], "text": v[3]}
                for (f, s), v in splits.items()
            ],
            schema=_SCAN_SCHEMA,
        )

    reports = sorted(
        lines.mapInArrow(scan, "file string, start bigint, lines bigint, bad bigint, problem string, text string")
        .collect(),
        key=lambda r: (r["file"], r["start"]),
    )
    lines_before: dict[str, int] = {}
    for report in reports:
        before = lines_before.get(report["file"], 0)
        if report["bad"] >= 0:
            return BadLine(report["file"], before + report["bad"] + 1, report["text"], report["problem"])
        lines_before[report["file"]] = before + report["lines"]
    return None


_SCAN_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("start", pa.int64()),
        ("lines", pa.int64()),
        ("bad", pa.int64()),
        ("problem", pa.string()),
        ("text", pa.string()),
    ]
)


def _raise_first_bad_line(
    spark: SparkSession, path: str, num_features: int, spec: DataSpec, cause: Exception | None
) -> None:
    try:
        bad = find_first_bad_line(spark, path, num_features, spec)
    except Exception:  # the text scan cannot read it either (e.g. no filesystem for its scheme): Spark's cause
        bad = None
    if bad is not None:
        raise DataError(_local_name(bad.path), bad.problem, bad.line_number, bad.text, _FIX_HINT) from None
    summary = _first_line_of(cause) if cause is not None else "Spark reported bad rows"
    raise DataError(
        path, f"cannot be read as LIBSVM ({summary})", hint="No single bad line was found; check the file's format"
    ) from cause


def _local_name(uri: str) -> str:
    """``file:/x/y`` -> ``/x/y``; other schemes (dbfs:, s3a:, hdfs:) are kept as they are."""
    return uri[len("file:") :] if uri.startswith("file:") else uri


def _first_line_of(error: Exception) -> str:
    text = str(error).strip()
    for marker in ("Exception: ", "Error: "):
        if marker in text:
            text = text.split(marker, 1)[1]
            break
    return text.splitlines()[0][:200] if text else type(error).__name__
