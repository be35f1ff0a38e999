"""A rank's input path without launching ranks: the task streams its partition to a file, the rank maps
it and reads its shard in place, and the pipeline gathers each batch from the mapped bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pytest

from sparkml_mnist.data.columns import (
    LABEL_COLUMN, LAYOUT_COLUMN, PIXELS_COLUMN, ROW_COLUMN, SHARD_COLUMN, VALIDATION_COLUMN,
)
from sparkml_mnist.data.tensors import images_and_labels
from sparkml_mnist.errors import ConfigError, DataError, LaunchError
from sparkml_mnist.launcher.policy import FailurePolicy
from sparkml_mnist.launcher.rank.context import RankContext
from sparkml_mnist.launcher.spec import LaunchSpec
from sparkml_mnist.launcher.task.prepare import write_partition
from sparkml_mnist.training.inputs import ArrayRows, rank_batches, shard_rows

ROWS = 60
BATCH_ROWS = 7  # Spark's Arrow batches: several chunks, not aligned with anything


def handoff_batches(rows: int = ROWS, layouts: int = 2) -> list[pa.RecordBatch]:
    """Rows of two layouts in a shuffled order (as a shuffle delivers them), in several batches."""
    rng = np.random.default_rng(1)
    layout = np.repeat(np.arange(layouts), rows)
    row = np.tile(np.arange(rows) * 2, layouts)  # shard 0 of 2
    order = rng.permutation(len(row))
    layout, row = layout[order], row[order]
    pixels = rng.integers(0, 256, size=(len(row), 784), dtype=np.uint8)
    table = pa.table({
        SHARD_COLUMN: pa.array(np.zeros(len(row), np.int32)),
        VALIDATION_COLUMN: pa.array(row >= rows * 2 * 0.8),
        ROW_COLUMN: pa.array(row, pa.int64()),
        LABEL_COLUMN: pa.array((row // 2 + layout) % 10, pa.int32()),
        PIXELS_COLUMN: pa.array([bytes(p) for p in pixels], pa.binary()),
        LAYOUT_COLUMN: pa.array(layout, pa.int32()),
    })
    return table.to_batches(max_chunksize=BATCH_ROWS)


def rank_context(tmp_path: Path, batches: list[pa.RecordBatch], partition_rows: list[int]) -> RankContext:
    path = tmp_path / "partition.arrow"
    write_partition(iter(batches), path)
    launch = LaunchSpec(size=len(partition_rows), backend="tf", policy=FailurePolicy(), driver_host="127.0.0.1",
                        driver_port=1, has_data=True)
    spec = launch.for_rank(0, ["h"] * len(partition_rows), [1] * len(partition_rows), [], partition_rows)
    return RankContext(spec=spec, partition_file=path)


def test_the_task_writes_each_batch_before_it_asks_for_the_next(tmp_path: Path) -> None:
    path = tmp_path / "partition.arrow"
    sizes: list[int] = []

    def arriving() -> Iterator[pa.RecordBatch]:
        for batch in handoff_batches():
            yield batch
            sizes.append(path.stat().st_size)  # the batch just handed over is already on disk

    assert write_partition(arriving(), path) == 2 * ROWS
    assert all(later > earlier for earlier, later in zip(sizes, sizes[1:])), sizes
    assert write_partition(iter([]), tmp_path / "empty.arrow") == 0
    assert pa.ipc.open_file(pa.memory_map(str(tmp_path / "empty.arrow"))).read_all().num_columns == 0


def test_the_rank_maps_its_partition_in_place_and_reads_it_batch_by_batch(tmp_path: Path) -> None:
    batches = handoff_batches()
    context = rank_context(tmp_path, batches, [2 * ROWS])
    allocated = pa.total_allocated_bytes()
    table = context.partition()
    assert pa.total_allocated_bytes() - allocated < 4096  # mapped, not read into memory
    assert not context.partition_file.exists()  # unlinked once mapped
    assert table.num_rows == 2 * ROWS and table.column(PIXELS_COLUMN).num_chunks == len(batches)
    streamed = list(context.record_batches())
    assert [b.num_rows for b in streamed] == [b.num_rows for b in batches]
    assert pa.Table.from_batches(streamed).equals(table)


def test_a_shard_is_read_in_file_order_and_equals_the_copied_tensors(tmp_path: Path) -> None:
    table = rank_context(tmp_path, handoff_batches(), [2 * ROWS]).partition()
    for layout in (0, 1):
        shard = shard_rows(table, layout)
        mine = table.filter(pa.compute.equal(table.column(LAYOUT_COLUMN), layout))
        mine = mine.sort_by(ROW_COLUMN)
        for part, validation in ((shard.train, False), (shard.validation, True)):
            expected = mine.filter(pa.compute.equal(mine.column(VALIDATION_COLUMN), validation))
            assert part.rows.tolist() == expected.column(ROW_COLUMN).to_pylist()
            images, labels = part.take(np.arange(len(part)))
            want_images, want_labels = images_and_labels(expected, scaled=False)
            assert images.dtype == np.uint8 and images.shape == want_images.shape
            np.testing.assert_array_equal(images, want_images)
            np.testing.assert_array_equal(labels, want_labels)
        picked = np.array([5, 0, len(shard.train) - 1, 17])
        np.testing.assert_array_equal(shard.train.take(picked)[0], shard.train.take(np.arange(len(shard.train)))[0][picked])


@pytest.mark.parametrize("column, kind, said", [
    (PIXELS_COLUMN, pa.list_(pa.float64()), "column 'pixels' is list<item: double>, the input pipeline needs binary"),
    (LABEL_COLUMN, pa.string(), "column 'label' is string, the input pipeline needs an integer"),
])
def test_a_column_the_pipeline_cannot_use_is_named_with_its_type(column: str, kind: pa.DataType, said: str) -> None:
    table = pa.Table.from_batches(handoff_batches())
    index = table.schema.get_field_index(column)
    table = table.set_column(index, column, pa.nulls(table.num_rows, kind))
    with pytest.raises(DataError, match=said.replace("[", r"\[")):
        shard_rows(table, 0)
    with pytest.raises(DataError, match="has no 'layout' column"):
        shard_rows(pa.Table.from_batches(handoff_batches()).drop_columns([LAYOUT_COLUMN]), 0)


def test_equal_steps_agree_on_every_rank_from_the_shared_partition_sizes(tmp_path: Path) -> None:
    context = rank_context(tmp_path, handoff_batches(), [500, 300])
    assert context.equal_steps(16) == 300 // 8
    assert rank_context(tmp_path, handoff_batches(), [64, 64]).equal_steps(16) == 8
    with pytest.raises(ConfigError, match="rank 1's partition has 3 rows, fewer than one step of 8"):
        rank_context(tmp_path, handoff_batches(), [64, 3]).equal_steps(16)
    with pytest.raises(ConfigError, match="at least the number of ranks"):
        context.equal_steps(1)
    no_data = RankContext(spec=LaunchSpec(size=1, backend="tf", policy=FailurePolicy(), driver_host="h",
                                          driver_port=1).for_rank(0, ["h"], [1], []))
    with pytest.raises(LaunchError, match="given no data"):
        no_data.equal_steps(16)
    with pytest.raises(LaunchError, match="given no data"):
        no_data.partition()


def test_the_pipeline_gathers_the_same_batches_from_the_mapped_rows_as_from_arrays(tmp_path: Path) -> None:
    shard = shard_rows(rank_context(tmp_path, handoff_batches(), [2 * ROWS]).partition(), 1)
    copied = ArrayRows(shard.train.take(np.arange(len(shard.train))))
    mapped = list(rank_batches(shard.train, 4, steps=3, shuffle=True, seed=5, epochs=2))
    arrays = list(rank_batches(copied, 4, steps=3, shuffle=True, seed=5, epochs=2))
    assert len(mapped) == len(arrays) == 6
    for (images, labels), (want_images, want_labels) in zip(mapped, arrays):
        assert images.dtype.name == "uint8" and tuple(images.shape) == (4, 28, 28, 1)
        np.testing.assert_array_equal(images.numpy(), want_images.numpy())
        np.testing.assert_array_equal(labels.numpy(), want_labels.numpy())
