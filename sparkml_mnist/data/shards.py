"""Validated rows -> train/validation split -> equal shards, one per Spark partition.

The hand-off to the launcher is a DataFrame whose partition ``s`` holds exactly shard ``s``
(train and validation rows of that shard), so a barrier stage of ``k`` tasks over it gives each
rank its own shard straight from Spark's shuffle: nothing is collected on the driver and no
shared filesystem is needed. The launcher hands partition ``s`` to rank ``s`` as Arrow; the
training side (``sparkml_mnist.inputs``) turns it into tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from sparkml_mnist.data.columns import LABEL_COLUMN, PIXELS_COLUMN, ROW_COLUMN, SHARD_COLUMN, VALIDATION_COLUMN
from sparkml_mnist.data.libsvm import LibsvmData
from sparkml_mnist.data.split import ShardPlan, plan_shards

HANDOFF_SCHEMA = "shard int, validation boolean, row bigint, label int, pixels array<float>"

# Spark's HashPartitioning sends a row to pmod(murmur3_x86_32(key, seed 42), k).
_SPARK_HASH_SEED = 42


@dataclass(frozen=True)
class ShardedFrame:
    """The launcher's input: ``frame`` has ``num_shards`` partitions, partition ``s`` = shard ``s``."""

    frame: DataFrame
    plan: ShardPlan
    source: str


def shard_frame(
    data: LibsvmData, num_shards: int, validation_split: float = 0.0
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
