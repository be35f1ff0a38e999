"""Scoring on the executors: ``predict(frame, model)`` adds ``prediction`` and ``probability`` to a frame of raw pixels.

The model is resolved and checked once, on the driver (``model_source``); its ``.keras`` bytes travel with
the tasks and each Python worker loads it once and keeps it for its next tasks (Spark reuses its workers),
its TensorFlow held to the task's cores. A pandas UDF over Spark's Arrow batches turns each batch's pixels
(the data stage's binary column of 784 bytes, or an array column of 784 raw values) into the model's input
with training's own scaling (``serving``), so these predictions are the ones the report counted. Nothing
row-sized reaches the driver, and nothing needs a SparkContext: it works over Spark Connect.

``predict_to_path`` is the command's whole flow (``sparkml-mnist predict``): every bad input (a model that
does not load, a column that is not pixels, rows of another width, an output that exists) is one
``ConfigError`` naming it, found before anything is written.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    BinaryType,
    ByteType,
    DataType,
    DoubleType,
    FloatType,
    IntegerType,
    LongType,
    ShortType,
)

from sparkml_mnist.config import DataSpec, load_data_spec
from sparkml_mnist.config import platform as databricks
from sparkml_mnist.data.columns import LABEL_COLUMN, PIXELS_COLUMN, ROW_COLUMN
from sparkml_mnist.data.libsvm import LibsvmData, load_libsvm
from sparkml_mnist.data.paths import SAMPLE_FOLDER, sample_paths
from sparkml_mnist.errors import ConfigError, DataError
from sparkml_mnist.job.model_source import ServedModel, load_keras, resolve_model
from sparkml_mnist.job.serving import class_probabilities
from sparkml_mnist.redact import redact

PREDICTION_COLUMN = "prediction"
PROBABILITY_COLUMN = "probability"
SCORES_COLUMN = "__sparkml_mnist_scores"  # the UDF's struct, unpacked into the two columns above
SCORES_TYPE = f"{PREDICTION_COLUMN} int, {PROBABILITY_COLUMN} array<float>"
# Array element types that can hold raw pixel values (the rows' values are checked as well).
PIXEL_ELEMENT_TYPES = (ByteType, ShortType, IntegerType, LongType, FloatType, DoubleType)
MODELS_KEPT_PER_WORKER = 2  # a Python worker keeps this many loaded models (the newest) for its next tasks
DEFAULT_SOURCE = "the frame"

LIBSVM, PARQUET, DELTA = "libsvm", "parquet", "delta"
DATA_FORMATS = (LIBSVM, PARQUET, DELTA)
OUTPUT_FORMATS = (PARQUET, DELTA)
PARQUET_SUFFIX = ".parquet"
DELTA_LOG = "_delta_log"
DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
EXTENSIONS_CONF = "spark.sql.extensions"
LOCAL_SCHEMES = ("", "file")
OVERWRITE = "overwrite"
REFUSE_EXISTING = "error"  # a writer's error-if-exists mode: Spark Connect knows it by this name only
# What Spark's Parquet and Delta writers put in an output folder: --overwrite replaces only such a folder.
SPARK_OUTPUT_ENTRY = re.compile(r"(part-.*|_SUCCESS|_committed_.*|_started_.*|\..*\.crc|_delta_log|_temporary)")


def predict(frame: DataFrame | LibsvmData, model: str | Path | ServedModel, column: str | None = None,
            variant: str | None = None, source: str = DEFAULT_SOURCE) -> DataFrame:
    """``frame`` with ``prediction`` (int) and ``probability`` (array<float>) beside its own columns.

    ``model``: a run's output folder (its best variant by test accuracy, or ``variant``), a ``.keras`` file, an
    MLflow model URI or local MLflow model folder, or a ``ServedModel``. ``column``: the raw pixels, binary
    (784 bytes a row: the data stage's ``pixels``, the default when present) or an array of 784 values 0..255.
    Lazy like any transformation: the model is loaded and the column checked now, the rows when an action runs.
    """
    if isinstance(frame, LibsvmData):
        frame = frame.frame
    spec = load_data_spec()
    served = resolve_model(model, variant, spec)
    name, _ = pixel_column(frame, column, source, spec)
    clashes = [taken for taken in (PREDICTION_COLUMN, PROBABILITY_COLUMN, SCORES_COLUMN) if taken in frame.columns]
    if clashes:
        raise ConfigError(f"{source} already has a '{clashes[0]}' column; drop or rename it before predicting")
    score = F.pandas_udf(_scorer(served, spec, f"{source}, column '{name}'"), SCORES_TYPE)  # type: ignore[call-overload]
    scored = frame.withColumn(SCORES_COLUMN, score(_col(name)))
    return scored.select(*[_col(own) for own in frame.columns],
                         F.col(f"{SCORES_COLUMN}.{PREDICTION_COLUMN}").alias(PREDICTION_COLUMN),
                         F.col(f"{SCORES_COLUMN}.{PROBABILITY_COLUMN}").alias(PROBABILITY_COLUMN))


def pixel_column(frame: DataFrame, column: str | None, source: str = DEFAULT_SOURCE,
                 spec: DataSpec | None = None) -> tuple[str, DataType]:
    """The column of raw pixels: ``column``, else ``pixels``, else the frame's only column that can hold them."""
    spec = spec or load_data_spec()
    types = {entry.name: entry.dataType for entry in frame.schema.fields}
    if column is None:
        candidates = [name for name, kind in types.items() if _holds_pixels(kind)]
        if PIXELS_COLUMN in types or len(candidates) != 1:
            column = PIXELS_COLUMN
    if column is None:
        column = candidates[0]
    if column not in types:
        raise ConfigError(f"{source} has no column '{column}' (its columns: {', '.join(types) or 'none'}); "
                          f"name the pixel column with --column")
    if not _holds_pixels(types[column]):
        raise ConfigError(f"{source}: column '{column}' is {types[column].simpleString()}, not pixels; give a binary "
                          f"column of {spec.num_features} bytes a row (the data stage's '{PIXELS_COLUMN}') or an "
                          f"array of {spec.num_features} values 0..{spec.max_pixel_value}")
    return column, types[column]


def check_pixel_rows(frame: DataFrame, column: str, source: str = DEFAULT_SOURCE, spec: DataSpec | None = None) -> None:
    """One pass over ``column`` on the executors: the first row that is null, not 784 wide, or holds a value
    that is not a whole number 0..255, as a ``ConfigError``; only that row reaches the driver."""
    spec = spec or load_data_spec()
    pixels = _col(column)
    binary = isinstance(frame.schema[column].dataType, BinaryType)
    width = F.length(pixels) if binary else F.size(pixels)
    if binary:
        bad_value = F.lit(None)
    else:
        def wrong(value: Any) -> Any:
            return value.isNull() | (value < 0) | (value > spec.max_pixel_value) | (value != F.floor(value))

        bad_value = F.when(F.exists(pixels, wrong), F.try_element_at(F.filter(pixels, wrong), F.lit(1)).cast("string"))
    where = [_col(ROW_COLUMN).alias("row")] if ROW_COLUMN in frame.columns else [F.lit(None).alias("row")]
    found = (frame.select(*where, pixels.isNull().alias("null"), width.alias("width"), bad_value.alias("value"))
             .where(F.col("null") | (F.col("width") != spec.num_features) | F.col("value").isNotNull())
             .limit(1).collect())
    if not found:
        return
    first = found[0]
    row = f" ({ROW_COLUMN} {first['row']})" if first["row"] is not None else ""
    if first["null"]:
        raise ConfigError(f"{source}: column '{column}' has a null row{row}; every row needs its {spec.num_features} pixels")
    if first["width"] != spec.num_features:
        unit = "bytes" if binary else "values"
        raise ConfigError(f"{source}: column '{column}' has a row of {first['width']} {unit}{row}, not "
                          f"{spec.num_features}; MNIST images have {spec.num_features} pixels "
                          f"({'x'.join(map(str, spec.image_shape))})")
    raise ConfigError(f"{source}: column '{column}' holds {first['value']}{row}, not a whole number "
                      f"0..{spec.max_pixel_value}; give raw pixel values (the model scales them as training did)")


# -- the command: read, predict, write -------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictionSummary:
    """What ``predict_to_path`` wrote: counted from the output itself."""

    output: str
    output_format: str
    rows: int
    model: str
    correct: int | None  # rows whose prediction is their label (None: the input has no label)
    report_accuracy: float | None  # the model's test accuracy in its run's report, when it came from one
    seconds: float

    @property
    def accuracy(self) -> float | None:
        return None if self.correct is None or not self.rows else self.correct / self.rows

    def line(self) -> str:
        text = f"wrote {self.rows:,} predictions of {self.model} to {self.output} ({self.output_format}, {self.seconds:.1f} s)"
        if self.accuracy is not None:
            text += f"; accuracy against '{LABEL_COLUMN}': {self.accuracy:.4f}"
            if self.report_accuracy is not None:
                text += f" (its report's test accuracy: {self.report_accuracy:.4f})"
        return text


def check_output(output: str, overwrite: bool, data: str | None = None) -> None:
    """Before any work: an existing output is refused unless ``overwrite``, and even then only a folder that
    holds nothing but a Spark writer's output (its first other entry is named). Remote outputs are checked by
    Spark's own writer, when it starts."""
    if data is not None and output.rstrip("/") == data.rstrip("/"):
        raise ConfigError(f"--output {redact(output)} is the input itself; give another path")
    scheme = urlparse(output).scheme
    if scheme not in LOCAL_SCHEMES:
        return
    path = Path(output[len("file:"):] if scheme == "file" else output)
    if not path.exists() and not path.is_symlink():
        return
    if not overwrite:
        raise ConfigError(f"--output {redact(output)} exists; give a new path, or --overwrite to replace it")
    if path.is_symlink() or not path.is_dir():
        raise ConfigError(f"--output {redact(output)} is not a folder of predictions; --overwrite replaces only "
                          f"what a Spark writer wrote, give another path")
    foreign = next((entry.name for entry in sorted(path.iterdir()) if not SPARK_OUTPUT_ENTRY.fullmatch(entry.name)), None)
    if foreign is not None:
        raise ConfigError(f"--output {redact(output)} holds '{foreign}', which no Spark writer wrote; --overwrite "
                          f"replaces only a folder of predictions, give another path")


def predict_to_path(
    spark: SparkSession, model: str | Path | ServedModel, data: str, output: str, *, overwrite: bool = False,
    variant: str | None = None, column: str | None = None, data_format: str | None = None,
    output_format: str = PARQUET,
) -> PredictionSummary:
    """Read ``data`` (LIBSVM through the data stage, or Parquet/Delta with a pixel column), predict on the
    executors, write ``output`` (Parquet, or Delta where the session has it): the input's own columns but the
    pixels, then ``prediction`` and ``probability``. Every check comes before anything is written."""
    started = time.perf_counter()
    spec = load_data_spec()
    data = sample_paths().test if data == SAMPLE_FOLDER else data
    check_output(output, overwrite, data)
    fmt = data_format or guess_data_format(data)
    _check_formats(spark, fmt, output_format)
    served = resolve_model(model, variant, spec)
    frame, loaded = read_input(spark, data, fmt)
    try:
        shown = redact(data)
        name, _ = pixel_column(frame, column, shown, spec)
        if loaded is None:  # the data stage has checked its rows already
            check_pixel_rows(frame, name, shown, spec)
        scored = predict(frame, served, name, source=shown).drop(name)
        try:
            scored.write.format(output_format).mode(OVERWRITE if overwrite else REFUSE_EXISTING).save(output)
        except Exception as error:
            if "PATH_ALREADY_EXISTS" in str(error) or "already exists" in str(error):
                raise ConfigError(f"--output {redact(output)} exists; give a new path, or --overwrite to "
                                  f"replace it") from None
            raise
    finally:
        if loaded is not None:
            loaded.release()
    written = spark.read.format(output_format).load(output)
    counts = [F.count(F.lit(1)).alias("rows")]
    labelled = LABEL_COLUMN in written.columns
    if labelled:
        counts.append(F.sum((F.col(LABEL_COLUMN) == F.col(PREDICTION_COLUMN)).cast("long")).alias("correct"))
    totals = written.agg(*counts).collect()[0]
    return PredictionSummary(
        output=redact(output), output_format=output_format, rows=int(totals["rows"]), model=served.describe(),
        correct=int(totals["correct"] or 0) if labelled else None, report_accuracy=served.test_accuracy,
        seconds=time.perf_counter() - started)


def guess_data_format(data: str) -> str:
    """Parquet for a ``.parquet`` path or a local folder of Parquet files, Delta for a folder with a Delta log,
    else LIBSVM (read by the data stage, as training reads it). ``--data-format`` says it outright."""
    if data.rstrip("/").lower().endswith(PARQUET_SUFFIX):
        return PARQUET
    scheme = urlparse(data).scheme
    folder = Path(data[len("file:"):] if scheme == "file" else data)
    if scheme in LOCAL_SCHEMES and folder.is_dir():
        if (folder / DELTA_LOG).is_dir():
            return DELTA
        if any(folder.glob(f"*{PARQUET_SUFFIX}")):
            return PARQUET
    return LIBSVM


def read_input(spark: SparkSession, data: str, data_format: str) -> tuple[DataFrame, LibsvmData | None]:
    """The input frame, and the data stage's kept rows when it read them (to release once written)."""
    if data_format == LIBSVM:
        loaded = load_libsvm(spark, data)
        return loaded.frame, loaded
    try:
        frame = spark.read.format(data_format).load(data)
        frame.schema  # noqa: B018 - resolves the path now: a missing one is this error, not a later one
    except Exception as error:  # Spark's analysis errors (a missing path, not Parquet) come as several types
        raise DataError(data, f"cannot be read as {data_format} ({_first_line(error)})",
                        hint="Check --data, or say its format with --data-format") from None
    return frame, None


def delta_available(spark: SparkSession) -> bool:
    """Delta Lake is there on Databricks, and where the session was made with its SQL extension."""
    return databricks.is_databricks() or DELTA_EXTENSION in (spark.conf.get(EXTENSIONS_CONF, "") or "")


def _check_formats(spark: SparkSession, data_format: str, output_format: str) -> None:
    if data_format not in DATA_FORMATS:
        raise ConfigError(f"--data-format {data_format}: choose one of {', '.join(DATA_FORMATS)}")
    if output_format not in OUTPUT_FORMATS:
        raise ConfigError(f"--format {output_format}: choose one of {', '.join(OUTPUT_FORMATS)}")
    if DELTA in (data_format, output_format) and not delta_available(spark):
        raise ConfigError(f"Delta needs a session with Delta Lake ({EXTENSIONS_CONF}={DELTA_EXTENSION}, or "
                          f"Databricks); use Parquet here")


# -- on the executors --------------------------------------------------------------------------------------------

_worker_models: OrderedDict[str, Any] = OrderedDict()  # per Python worker: model digest -> loaded Keras model


def _scorer(model: ServedModel, spec: DataSpec, source: str) -> Any:
    """The pandas UDF's function: each Arrow batch of pixels -> its predictions and probabilities."""

    def score(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        keras_model = _worker_model(model)
        for batch in batches:
            probabilities = class_probabilities(keras_model, batch, spec, source)
            yield pd.DataFrame({PREDICTION_COLUMN: probabilities.argmax(axis=1).astype(np.int32),
                                PROBABILITY_COLUMN: list(probabilities)})

    return score


def _worker_model(model: ServedModel) -> Any:
    """``model`` loaded once per Python worker (the newest few kept for the worker's next tasks)."""
    key = model.digest
    if key in _worker_models:
        _worker_models.move_to_end(key)
        return _worker_models[key]
    _hold_to_task_cpus()
    _worker_models[key] = load_keras(model)
    while len(_worker_models) > MODELS_KEPT_PER_WORKER:
        _worker_models.popitem(last=False)
    return _worker_models[key]


def _hold_to_task_cpus() -> None:
    """TensorFlow's threads to the task's cores (``spark.task.cpus``), as the ranks run: the workers of one
    executor share its cores. Only possible before this worker's TensorFlow has run anything."""
    from pyspark import TaskContext

    from sparkml_mnist.launcher.keras_flavour import tensorflow

    context = TaskContext.get()
    if context is None:
        return
    tf = tensorflow()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(context.cpus())
        tf.config.threading.set_inter_op_parallelism_threads(context.cpus())
    except RuntimeError:  # TensorFlow already runs in this worker (an earlier task): its pools stay
        pass


def _holds_pixels(kind: DataType) -> bool:
    return isinstance(kind, BinaryType) or (isinstance(kind, ArrayType) and isinstance(kind.elementType, PIXEL_ELEMENT_TYPES))


def _col(name: str) -> Any:
    return F.col(f"`{name.replace('`', '``')}`")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return redact(text.splitlines()[0] if text else type(error).__name__)
