"""Validated rows -> train/validation split -> equal shards, one per Spark partition.

The hand-off to the launcher is a DataFrame whose partition ``s`` holds exactly shard ``s``
(train and validation rows of that shard), so a barrier stage of ``k`` tasks over it gives each
rank its own shard straight from Spark's shuffle: nothing is collected on the driver and no
shared filesystem is needed. The launcher hands partition ``s`` to rank ``s`` as Arrow; the
training side (``sparkml_mnist.training.inputs``) turns it into tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from sparkml_mnist.data.columns import (
    LABEL_COLUMN,
    LAYOUT_COLUMN,
    PIXELS_COLUMN,
    ROW_COLUMN,
    SHARD_COLUMN,
    TEST_LAYOUT,
    VALIDATION_COLUMN,
)
from sparkml_mnist.data.libsvm import LibsvmData
from sparkml_mnist.data.split import ShardPlan, plan_shards

HANDOFF_SCHEMA = "shard int, validation boolean, row bigint, label int, pixels binary"

# Spark's HashPartitioning sends a row to pmod(murmur3_x86_32(key, seed 42), k).
_SPARK_HASH_SEED = 42


@dataclass(frozen=True)
class ShardedFrame:
    """The launcher's input: ``frame`` has ``num_shards`` partitions, partition ``s`` = shard ``s``."""

    frame: DataFrame
    plan: ShardPlan
    source: str


@dataclass(frozen=True)
class ShardedLayouts:
    """Several layouts of one input in one hand-off frame (one per validation split), for one barrier
    stage that trains several variants: rows of layout ``i`` carry ``layout == i`` and ``plans[i]``.

    With a test set, its rows ride along once (``layout == TEST_LAYOUT``, row ``i`` in shard ``i % k``,
    none dropped), so each rank scores its share where it trains and the driver only adds up sums.
    """

    frame: DataFrame
    plans: tuple[ShardPlan, ...]
    source: str
    test_rows: int = 0


def shard_frame(data: LibsvmData, num_shards: int, validation_split: float = 0.0) -> ShardedFrame:
    """Split ``data`` in file order and lay it out as equal shards, one per Spark partition."""
    plan = plan_shards(data.num_rows, num_shards, validation_split, data.path)
    return ShardedFrame(frame=_by_shard(_shard_rows(data, plan), num_shards), plan=plan, source=data.path)


def shard_layouts(
    data: LibsvmData, num_shards: int, validation_splits: list[float], test: LibsvmData | None = None
) -> ShardedLayouts:
    """``shard_frame`` for each split at once, in one frame: partition ``s`` holds shard ``s`` of every layout
    (and, given ``test``, the test rows of shard ``s``)."""
    plans = tuple(plan_shards(data.num_rows, num_shards, split, data.path) for split in validation_splits)
    rows = [_shard_rows(data, plan).withColumn(LAYOUT_COLUMN, F.lit(index)) for index, plan in enumerate(plans)]
    if test is not None:
        rows.append(_test_rows(test, num_shards))
    combined = rows[0]
    for more in rows[1:]:
        combined = combined.unionByName(more)
    return ShardedLayouts(frame=_by_shard(combined, num_shards), plans=plans, source=data.path,
                          test_rows=test.num_rows if test is not None else 0)


def _shard_rows(data: LibsvmData, plan: ShardPlan) -> DataFrame:
    """The rows ``plan`` keeps, each with its shard and whether it is in the validation split."""
    row = F.col(ROW_COLUMN)
    in_validation = row >= F.lit(plan.split_at)
    position = F.when(in_validation, row - F.lit(plan.split_at)).otherwise(row)
    kept = F.when(
        in_validation, position < F.lit(plan.validation_per_shard * plan.num_shards)
    ).otherwise(position < F.lit(plan.train_per_shard * plan.num_shards))
    shard = (position % F.lit(plan.num_shards)).cast("int")
    return data.frame.where(kept).select(
        shard.alias(SHARD_COLUMN), in_validation.alias(VALIDATION_COLUMN), row, LABEL_COLUMN, PIXELS_COLUMN
    )


def _test_rows(test: LibsvmData, num_shards: int) -> DataFrame:
    """Every test row, row ``i`` in shard ``i % k``: scoring has no collectives, so shards may differ by a row."""
    row = F.col(ROW_COLUMN)
    return test.frame.select(
        (row % F.lit(num_shards)).cast("int").alias(SHARD_COLUMN), F.lit(False).alias(VALIDATION_COLUMN), row,
        LABEL_COLUMN, PIXELS_COLUMN, F.lit(TEST_LAYOUT).alias(LAYOUT_COLUMN),
    )


def _by_shard(rows: DataFrame, num_shards: int) -> DataFrame:
    """Partition ``s`` = shard ``s``: a hash repartition on keys Spark's own partitioner sends there.

    784 pixel bytes a row cross the shuffle; the rank casts them to float32 in its input pipeline.
    """
    keys = F.array(*[F.lit(key) for key in partition_keys(num_shards)])
    return rows.repartition(num_shards, F.element_at(keys, F.col(SHARD_COLUMN) + 1))


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
