"""Validated rows -> train/validation split -> equal shards -> per-task float32 tensors.

The hand-off to the launcher is a DataFrame whose partition ``s`` holds exactly shard ``s``
(train and validation rows of that shard), so a barrier stage of ``k`` tasks over it gives each
rank its own shard straight from Spark's shuffle: nothing is collected on the driver and no
shared filesystem is needed. Inside the task, ``shard_tensors`` turns the Arrow batches into
numpy arrays without a Python loop over rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from sparkml_mnist.config import DataSpec, load_data_spec
from sparkml_mnist.data.libsvm import ROW_COLUMN, LibsvmData
from sparkml_mnist.errors import ConfigError, DataError

SHARD_COLUMN = "shard"
VALIDATION_COLUMN = "validation"
LABEL_COLUMN = "label"
PIXELS_COLUMN = "pixels"
HANDOFF_SCHEMA = "shard int, validation boolean, row bigint, label int, pixels array<float>"

# Spark's HashPartitioning sends a row to pmod(murmur3_x86_32(key, seed 42), k).
_SPARK_HASH_SEED = 42


@dataclass(frozen=True)
class ShardPlan:
    """How ``num_rows`` file rows become ``num_shards`` equal training (and validation) shards.

    The validation split is the last ``validation_split`` of the rows, as Keras's
    ``validation_split`` takes it. Within each split, row ``i`` goes to shard ``i % k``; the
    last ``rows % k`` rows of each split are left out so every shard is the same size (at most
    ``k - 1`` rows lost per split), which keeps every rank on the same number of steps.
    """

    num_rows: int
    num_shards: int
    validation_split: float
    split_at: int
    train_per_shard: int
    validation_per_shard: int

    @property
    def train_rows(self) -> int:
        return self.split_at

    @property
    def validation_rows(self) -> int:
        return self.num_rows - self.split_at

    @property
    def dropped_train_rows(self) -> int:
        return self.train_rows - self.train_per_shard * self.num_shards

    @property
    def dropped_validation_rows(self) -> int:
        return self.validation_rows - self.validation_per_shard * self.num_shards


def validation_split_index(num_rows: int, validation_split: float, source: str = "input data") -> int:
    """First row of the validation split, computed exactly as tf_keras does."""
    if isinstance(validation_split, bool) or not 0.0 <= validation_split < 1.0:
        raise ConfigError(f"validation_split must be in [0, 1), got {validation_split!r}")
    split_at = int(math.floor(num_rows * (1.0 - validation_split)))
    if validation_split > 0 and split_at in (0, num_rows):
        raise DataError(
            source,
            f"{num_rows} rows are too few to split off validation_split={validation_split}",
            hint="Use more data or validation_split 0",
        )
    return split_at


def plan_shards(
    num_rows: int, num_shards: int, validation_split: float = 0.0, source: str = "input data"
) -> ShardPlan:
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ConfigError(f"number of shards (np) must be a positive integer, got {num_shards!r}")
    split_at = validation_split_index(num_rows, validation_split, source)
    plan = ShardPlan(
        num_rows=num_rows,
        num_shards=num_shards,
        validation_split=validation_split,
        split_at=split_at,
        train_per_shard=split_at // num_shards,
        validation_per_shard=(num_rows - split_at) // num_shards,
    )
    if plan.train_per_shard == 0:
        raise DataError(
            source,
            f"{plan.train_rows} training rows cannot fill {num_shards} shards",
            hint="Use fewer workers (np) or more data",
        )
    if plan.validation_rows and plan.validation_per_shard == 0:
        raise DataError(
            source,
            f"{plan.validation_rows} validation rows cannot fill {num_shards} shards",
            hint="Use fewer workers (np), more data or validation_split 0",
        )
    return plan


@dataclass(frozen=True)
class ShardedFrame:
    """The launcher's input: ``frame`` has ``num_shards`` partitions, partition ``s`` = shard ``s``."""

    frame: DataFrame
    plan: ShardPlan
    source: str


def shard_frame(
    data: LibsvmData, num_shards: int, validation_split: float = 0.0, spec: DataSpec | None = None
) -> ShardedFrame:
    """Split ``data`` in file order and lay it out as equal shards, one per Spark partition."""
    plan = plan_shards(data.num_rows, num_shards, validation_split, data.path)
    row = F.col(ROW_COLUMN)
    in_validation = row >= F.lit(plan.split_at)
    position = F.when(in_validation, row - F.lit(plan.split_at)).otherwise(row)
    kept = F.when(
        in_validation, position < F.lit(plan.validation_per_shard * num_shards)
    ).otherwise(position < F.lit(plan.train_per_shard * num_shards))
    shard = (position % F.lit(num_shards)).cast("int")
    keys = F.array(*[F.lit(key) for key in partition_keys(num_shards)])
    frame = (
        data.frame.where(kept)
        .select(
            shard.alias(SHARD_COLUMN),
            in_validation.alias(VALIDATION_COLUMN),
            row,
            F.col("label").cast("int").alias(LABEL_COLUMN),
            F.col("features"),
        )
        .repartition(num_shards, F.element_at(keys, F.col(SHARD_COLUMN) + 1))
        # Densified after the shuffle, inside each task: sparse vectors cross the network.
        .select(
            SHARD_COLUMN,
            VALIDATION_COLUMN,
            ROW_COLUMN,
            LABEL_COLUMN,
            vector_to_array(F.col("features"), "float32").alias(PIXELS_COLUMN),
        )
    )
    return ShardedFrame(frame=frame, plan=plan, source=data.path)


def spark_hash_int(value: int, seed: int = _SPARK_HASH_SEED) -> int:
    """Spark's ``hash()`` of an int column (Murmur3_x86_32.hashInt), as a signed 32-bit int."""
    mask = 0xFFFFFFFF

    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (32 - r))) & mask

    k1 = (value & mask) * 0xCC9E2D51 & mask
    k1 = rotl(k1, 15) * 0x1B873593 & mask
    h1 = rotl((seed & mask) ^ k1, 13)
    h1 = (h1 * 5 + 0xE6546B64) & mask
    h1 ^= 4
    h1 ^= h1 >> 16
    h1 = h1 * 0x85EBCA6B & mask
    h1 ^= h1 >> 13
    h1 = h1 * 0xC2B2AE35 & mask
    h1 ^= h1 >> 16
    return h1 - (1 << 32) if h1 >= 1 << 31 else h1


def partition_keys(num_shards: int) -> list[int]:
    """For each shard ``s``, an int key that Spark's hash partitioning sends to partition ``s``."""
    keys: dict[int, int] = {}
    candidate = 0
    while len(keys) < num_shards:
        keys.setdefault(spark_hash_int(candidate) % num_shards, candidate)  # Python % is pmod
        candidate += 1
    return [keys[s] for s in range(num_shards)]


# ---------------------------------------------------------------------------------------------
# Arrow -> numpy, in the task that trains (or on the driver for evaluation).
# ---------------------------------------------------------------------------------------------


@dataclass
class ShardTensors:
    """One rank's data, in file order: ``x`` float32 (n, 28, 28, 1) in [0, 1], ``y`` one-hot."""

    shard: int
    x_train: np.ndarray
    y_train: np.ndarray
    train_rows: np.ndarray
    x_validation: np.ndarray
    y_validation: np.ndarray
    validation_rows: np.ndarray


def images_and_labels(
    table: pa.Table, spec: DataSpec | None = None, pixels_column: str = PIXELS_COLUMN
) -> tuple[np.ndarray, np.ndarray]:
    """Arrow ``label`` + ``pixels`` (array<float>, raw 0..255) -> scaled images, one-hot labels."""
    spec = spec or load_data_spec()
    count = table.num_rows
    pixels = pc.list_flatten(table.column(pixels_column)).to_numpy(zero_copy_only=False)
    if pixels.size != count * spec.num_features:
        raise DataError(
            "<arrow batch>", f"expected {spec.num_features} pixels per row, got {pixels.size} for {count} rows"
        )
    images = (pixels.astype(np.float32, copy=False) / np.float32(spec.max_pixel_value)).reshape(
        (count, *spec.image_shape)
    )
    labels = table.column(LABEL_COLUMN).to_numpy(zero_copy_only=False).astype(np.int64)
    return images, np.eye(spec.num_classes, dtype=np.float32)[labels]


def shard_tensors(batches: Iterable[pa.RecordBatch], spec: DataSpec | None = None) -> ShardTensors:
    """All batches of one hand-off partition -> that shard's tensors, sorted back to file order."""
    batches = list(batches)
    if not batches:
        raise DataError("<shard>", "this task received no rows: the hand-off frame has an empty partition")
    table = pa.Table.from_batches(batches)
    shards = np.unique(table.column(SHARD_COLUMN).to_numpy(zero_copy_only=False))
    if shards.size != 1:
        raise DataError("<shard>", f"one task received several shards {shards.tolist()}; expected exactly one")
    table = table.take(pc.sort_indices(table, sort_keys=[(ROW_COLUMN, "ascending")]))
    is_validation = table.column(VALIDATION_COLUMN).to_numpy(zero_copy_only=False)
    train, validation = table.filter(pa.array(~is_validation)), table.filter(pa.array(is_validation))
    x_train, y_train = images_and_labels(train, spec)
    x_validation, y_validation = images_and_labels(validation, spec)
    return ShardTensors(
        shard=int(shards[0]),
        x_train=x_train,
        y_train=y_train,
        train_rows=train.column(ROW_COLUMN).to_numpy(zero_copy_only=False),
        x_validation=x_validation,
        y_validation=y_validation,
        validation_rows=validation.column(ROW_COLUMN).to_numpy(zero_copy_only=False),
    )


def collect_tensors(data: LibsvmData, spec: DataSpec | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The whole input as tensors on the driver, in file order (for the test set's evaluation)."""
    table = (
        data.frame.select(
            ROW_COLUMN,
            F.col("label").cast("int").alias(LABEL_COLUMN),
            vector_to_array(F.col("features"), "float32").alias(PIXELS_COLUMN),
        )
        .orderBy(ROW_COLUMN)
        .toArrow()
    )
    return images_and_labels(table, spec)
