"""Splits, equal shards, the barrier hand-off, and the tensors each task builds."""

from __future__ import annotations

import bz2
from typing import Iterator

import numpy as np
import pyarrow as pa
import pytest
from pyspark.sql import functions as F

from sparkml_mnist.data.libsvm import load_libsvm
from sparkml_mnist.data.paths import sample_paths
from sparkml_mnist.data.shards import partition_keys, shard_frame, spark_hash_int
from sparkml_mnist.data.split import plan_shards, validation_split_index
from sparkml_mnist.data.tensors import collect_tensors
from sparkml_mnist.training.inputs import shard_rows
from sparkml_mnist.errors import ConfigError, DataError


def write_rows(path, count: int) -> str:
    """Rows whose label and single pixel encode the row number, so tensors can be traced back."""
    path.write_text("".join(f"{i % 10} {i % 784 + 1}:{i % 255 + 1}\n" for i in range(count)))
    return str(path)


def test_validation_split_matches_keras():
    data_adapter = pytest.importorskip("tf_keras.src.engine.data_adapter")
    for rows, fraction in ((6000, 0.1), (1001, 0.1), (7, 0.3), (59999, 0.25)):
        (train,), (validation,) = data_adapter.train_validation_split((np.arange(rows),), validation_split=fraction)
        assert validation_split_index(rows, fraction) == len(train)
        assert int(train[-1]) + 1 == int(validation[0]) and int(validation[-1]) == rows - 1
    assert validation_split_index(10, 0.0) == 10


@pytest.mark.parametrize("rows,shards,fraction", [(6000, 2, 0.1), (1001, 2, 0.1), (1003, 3, 0.0), (20, 4, 0.2)])
def test_plan_gives_equal_shards_and_loses_at_most_k_minus_1_rows_per_split(rows, shards, fraction):
    plan = plan_shards(rows, shards, fraction)
    assert plan.train_per_shard * shards + plan.dropped_train_rows == plan.train_rows
    assert plan.validation_per_shard * shards + plan.dropped_validation_rows == plan.validation_rows
    assert 0 <= plan.dropped_train_rows < shards
    assert 0 <= plan.dropped_validation_rows < shards
    assert plan.train_rows + plan.validation_rows == rows


@pytest.mark.parametrize(
    "args,error,words",
    [
        ((100, 0, 0.1), ConfigError, "positive integer"),
        ((100, -2, 0.1), ConfigError, "positive integer"),
        ((100, 2, 1.0), ConfigError, "validation_split must be in [0, 1)"),
        ((100, 2, -0.1), ConfigError, "validation_split"),
        ((3, 4, 0.0), DataError, "3 training rows cannot fill 4 shards"),
        ((20, 4, 0.1), DataError, "2 validation rows cannot fill 4 shards"),
        ((1, 1, 0.5), DataError, "too few to split"),
    ],
)
def test_plan_rejects_impossible_layouts(args, error, words):
    with pytest.raises(error, match=words.replace("[", r"\[").replace(")", r"\)").replace("(", r"\(")):
        plan_shards(*args)


def test_spark_hash_int_matches_spark(spark):
    values = list(range(-5, 200)) + [2**31 - 1, -(2**31)]
    frame = spark.createDataFrame([(v,) for v in values], "v int")
    expected = {r["v"]: r["h"] for r in frame.select("v", F.hash("v").alias("h")).collect()}
    assert all(spark_hash_int(v) == expected[v] for v in values)


@pytest.mark.parametrize("shards", [1, 2, 3, 5, 8])
def test_partition_keys_land_each_shard_in_its_own_partition(shards):
    keys = partition_keys(shards)
    assert [spark_hash_int(k) % shards for k in keys] == list(range(shards))


def _report_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Runs in each barrier task: what this task received, reduced to a small record."""
    from pyspark import BarrierTaskContext

    context = BarrierTaskContext.get()
    shard = shard_rows(pa.Table.from_batches(list(batches)))
    x_train, y_train = shard.train.take(np.arange(len(shard.train)))
    x_validation, _ = shard.validation.take(np.arange(len(shard.validation)))
    context.barrier()
    yield pa.RecordBatch.from_pylist(
        [
            {
                "partition": context.partitionId(),
                "shard": shard.shard,
                "train_rows": shard.train.rows.tolist(),
                "validation_rows": shard.validation.rows.tolist(),
                "labels": y_train.argmax(axis=1).tolist(),
                "pixel_sum": float(x_train.sum(dtype=np.int64) + x_validation.sum(dtype=np.int64)),
                "x_shape": list(x_train.shape),
                "x_dtype": str(x_train.dtype),
                "x_max": float(x_train.max()),
            }
        ]
    )


HANDOFF_REPORT = (
    "partition bigint, shard bigint, train_rows array<bigint>, validation_rows array<bigint>, "
    "labels array<bigint>, pixel_sum double, x_shape array<bigint>, x_dtype string, x_max double"
)


def run_handoff(spark, path: str, shards: int, fraction: float):
    data = load_libsvm(spark, path)
    sharded = shard_frame(data, shards, fraction)
    reports = sharded.frame.mapInArrow(_report_partition, HANDOFF_REPORT, barrier=True).collect()
    return data, sharded, sorted(reports, key=lambda r: r["partition"])


def test_each_barrier_task_gets_its_own_equal_disjoint_shard(spark, tmp_path):
    path = write_rows(tmp_path / "rows.txt", 1001)
    data, sharded, reports = run_handoff(spark, path, 2, 0.1)
    plan = sharded.plan
    assert plan.split_at == 900 and plan.train_per_shard == 450 and plan.validation_per_shard == 50
    assert [r["partition"] for r in reports] == [0, 1]
    assert [r["shard"] for r in reports] == [0, 1]  # partition s holds shard s
    train = [set(r["train_rows"]) for r in reports]
    validation = [set(r["validation_rows"]) for r in reports]
    assert all(len(t) == 450 for t in train) and all(len(v) == 50 for v in validation)
    assert not train[0] & train[1] and not validation[0] & validation[1]
    assert train[0] | train[1] == set(range(900))  # no training row dropped: 900 = 2 x 450
    assert validation[0] | validation[1] == set(range(900, 1000))  # row 1000 is the one left out
    for report in reports:
        assert report["train_rows"] == sorted(report["train_rows"])  # file order kept in each shard
        assert all(row % 2 == report["shard"] for row in report["train_rows"])
        assert report["labels"] == [row % 10 for row in report["train_rows"]]


def test_handoff_puts_exactly_one_shard_in_each_partition_for_any_k(spark, tmp_path):
    # Three shards need three slots in barrier mode; a plain stage shows the layout on two cores.
    data = load_libsvm(spark, write_rows(tmp_path / "rows.txt", 300))
    sharded = shard_frame(data, 3, 0.0)
    rows = sharded.frame.select(F.spark_partition_id().alias("p"), "shard", "row").collect()
    assert {(r["p"], r["shard"]) for r in rows} == {(0, 0), (1, 1), (2, 2)}
    assert sorted(r["row"] for r in rows) == list(range(300))


def test_tensors_are_scaled_float32_images_with_one_hot_labels(spark):
    data = load_libsvm(spark, sample_paths().test)
    x, y = collect_tensors(data)
    assert x.shape == (1000, 28, 28, 1) and x.dtype == np.float32
    assert y.shape == (1000, 10) and y.dtype == np.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert np.array_equal(y.sum(axis=1), np.ones(1000, dtype=np.float32))
    # Row 0 of the test file, parsed by hand from the bz2 text: pixel (r, c) = value / 255.
    with bz2.open(sample_paths().test, "rt") as handle:
        first = handle.readline().split()
    expected = np.zeros(784, dtype=np.float32)
    for item in first[1:]:
        index, value = item.split(":")
        expected[int(index) - 1] = float(value) / 255
    assert np.array_equal(x[0].reshape(784), expected)
    assert int(y[0].argmax()) == int(first[0])


def test_sample_shards_cover_the_training_split_at_np2(spark):
    data, sharded, reports = run_handoff(spark, sample_paths().train, 2, 0.1)
    assert data.num_rows == 6000
    assert [len(r["train_rows"]) for r in reports] == [2700, 2700]
    assert [len(r["validation_rows"]) for r in reports] == [300, 300]
    # The ranks keep raw pixel bytes (a quarter of float32's memory); their input pipeline scales them.
    assert all(r["x_shape"] == [2700, 28, 28, 1] and r["x_dtype"] == "uint8" for r in reports)
    assert all(r["x_max"] == 255 for r in reports)
    x, _ = collect_tensors(data)
    assert sum(r["pixel_sum"] for r in reports) == np.rint(x.astype(np.float64) * 255).sum()
