"""The training side's input pipeline: a rank's partition -> its rows in place -> ``tf.data`` with global-batch semantics.

The launcher hands each rank its partition of the data stage's hand-off frame as an Arrow file that
the rank memory-maps. Nothing here copies the partition: a shard's training and validation rows are
positions into the mapped columns (8 bytes a row, in file order), and each step gathers its batch's
rows from the mapped pixel bytes, as ``uint8``, until the pipeline scales them. This module also works
out how many steps every rank takes (the same on all of them, or collectives fail) and builds the
dataset the backend distributes: ``B / n`` rows per rank and step, so np=1 and np=2 run the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import pyarrow as pa

from sparkml_mnist.config import DataSpec, load_data_spec
from sparkml_mnist.data.columns import LABEL_COLUMN, LAYOUT_COLUMN, PIXELS_COLUMN, ROW_COLUMN, SHARD_COLUMN, VALIDATION_COLUMN
from sparkml_mnist.errors import ConfigError, DataError
from sparkml_mnist.launcher import keras_flavour

if TYPE_CHECKING:
    from sparkml_mnist.launcher.rank.context import RankContext

PREFETCH_BATCHES = 2  # the step being trained and the next one
PARTITION_SOURCE = "<this rank's partition>"
# What each hand-off column must be for the input pipeline to read it in place.
COLUMN_TYPES: dict[str, Callable[[pa.DataType], bool]] = {
    SHARD_COLUMN: pa.types.is_integer,
    VALIDATION_COLUMN: pa.types.is_boolean,
    ROW_COLUMN: pa.types.is_integer,
    LABEL_COLUMN: pa.types.is_integer,
    PIXELS_COLUMN: pa.types.is_binary,
}
COLUMN_TYPE_NAMES = {SHARD_COLUMN: "an integer", VALIDATION_COLUMN: "a boolean", ROW_COLUMN: "an integer",
                     LABEL_COLUMN: "an integer", PIXELS_COLUMN: "binary (784 bytes a row)"}


class RowSource(Protocol):
    """Rows a pipeline gathers a batch at a time: ``take(positions)`` -> one array per output."""

    dtypes: tuple[np.dtype, ...]
    shapes: tuple[tuple[int, ...], ...]  # one row's shape per output

    def __len__(self) -> int: ...

    def take(self, index: np.ndarray) -> tuple[np.ndarray, ...]: ...


@dataclass(frozen=True)
class ArrayRows:
    """Rows of numpy arrays already in memory (a user's own, or tests')."""

    arrays: tuple[np.ndarray, ...]

    @property
    def dtypes(self) -> tuple[np.dtype, ...]:
        return tuple(array.dtype for array in self.arrays)

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(array.shape[1:] for array in self.arrays)

    def __len__(self) -> int:
        return len(self.arrays[0])

    def take(self, index: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(array[index] for array in self.arrays)


class MappedImages:
    """A partition's ``pixels`` and ``label`` columns read in place: a view per Arrow chunk, no copy."""

    def __init__(self, table: pa.Table, spec: DataSpec) -> None:
        self.spec = spec
        self._pixels: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        starts = [0]
        for pixels, labels in zip(_chunks(table.column(PIXELS_COLUMN)), _chunks(table.column(LABEL_COLUMN))):
            self._pixels.append(_pixel_view(pixels, spec.num_features))
            self._labels.append(labels.to_numpy(zero_copy_only=labels.null_count == 0))
            starts.append(starts[-1] + len(pixels))
        self._starts = np.asarray(starts[:-1], dtype=np.int64)
        self._one_hot = np.eye(spec.num_classes, dtype=np.float32)

    def take(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rows at ``positions`` of the partition: uint8 images (b, 28, 28, 1), one-hot float32 labels."""
        images = np.empty((len(positions), self.spec.num_features), dtype=np.uint8)
        labels = np.empty(len(positions), dtype=np.int64)
        for chunk, selected, local in self._by_chunk(positions):
            images[selected] = self._pixels[chunk][local]
            labels[selected] = self._labels[chunk][local]
        return images.reshape((len(positions), *self.spec.image_shape)), self._one_hot[labels]

    def label_ids(self, positions: np.ndarray) -> np.ndarray:
        """The class ids (int64) of the rows at ``positions``."""
        labels = np.empty(len(positions), dtype=np.int64)
        for chunk, selected, local in self._by_chunk(positions):
            labels[selected] = self._labels[chunk][local]
        return labels

    def _by_chunk(self, positions: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(chunk, which of ``positions`` lie in it, their offsets in it), for each chunk they touch."""
        chunk_of = np.searchsorted(self._starts, positions, side="right") - 1
        for chunk in np.unique(chunk_of):
            selected = chunk_of == chunk
            yield int(chunk), selected, positions[selected] - self._starts[chunk]


@dataclass(frozen=True)
class PartRows:
    """One part (training or validation) of a rank's shard, in file order: positions into the mapped columns."""

    images: MappedImages
    positions: np.ndarray  # the part's rows' positions in the partition, in file order
    rows: np.ndarray  # their rows in the input file

    @property
    def dtypes(self) -> tuple[np.dtype, ...]:
        return (np.dtype(np.uint8), np.dtype(np.float32))

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return (tuple(self.images.spec.image_shape), (self.images.spec.num_classes,))

    def __len__(self) -> int:
        return len(self.positions)

    def take(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``index`` of this part (0 = its first row in file order)."""
        return self.images.take(self.positions[index])


@dataclass(frozen=True)
class ShardRows:
    """One rank's data: its shard's training and validation rows, read in place from its partition."""

    shard: int
    train: PartRows
    validation: PartRows


def shard_rows(table: pa.Table, layout: int | None = None, spec: DataSpec | None = None) -> ShardRows:
    """One hand-off partition (of ``layout``, when it holds several) -> that shard's rows in file order.

    Only small per-row columns are read (shard, validation, row, layout); the pixels stay where they are.
    """
    spec = spec or load_data_spec()
    if table.num_rows == 0:
        raise DataError(
            PARTITION_SOURCE, "this rank's partition of the hand-off frame is empty",
            hint="Give the launcher the frame of shard_frame(data, np) for the same np",
        )
    _check_columns(table.schema, [*COLUMN_TYPES, *([LAYOUT_COLUMN] if layout is not None else [])])
    keep = np.ones(table.num_rows, dtype=bool)
    if layout is not None:
        keep &= _column(table, LAYOUT_COLUMN) == layout
    shards = np.unique(_column(table, SHARD_COLUMN)[keep])
    if shards.size != 1:
        raise DataError(PARTITION_SOURCE, f"one rank received several shards {shards.tolist()}; expected exactly one")
    rows = _column(table, ROW_COLUMN)
    validation = _column(table, VALIDATION_COLUMN)
    images = MappedImages(table, spec)
    return ShardRows(shard=int(shards[0]), train=_part(images, rows, keep & ~validation),
                     validation=_part(images, rows, keep & validation))


def layout_rows(table: pa.Table, layout: int, spec: DataSpec | None = None) -> PartRows:
    """Every row of one ``layout`` of a partition (e.g. its test rows), in file order, read in place."""
    _check_columns(table.schema, [LAYOUT_COLUMN, ROW_COLUMN, LABEL_COLUMN, PIXELS_COLUMN])
    images = MappedImages(table, spec or load_data_spec())
    return _part(images, _column(table, ROW_COLUMN), _column(table, LAYOUT_COLUMN) == layout)


def _part(images: MappedImages, rows: np.ndarray, selected: np.ndarray) -> PartRows:
    positions = np.flatnonzero(selected)
    positions = positions[np.argsort(rows[positions], kind="stable")]
    return PartRows(images=images, positions=positions, rows=rows[positions])


def _check_columns(schema: pa.Schema, names: Sequence[str]) -> None:
    """Name a missing column, or one whose type the pipeline cannot read, with its type."""
    for name in names:
        if name not in schema.names:
            raise DataError(PARTITION_SOURCE, f"the partition has no '{name}' column (it has {schema.names})",
                            hint="Give the launcher the frame of shard_frame(data, np) or shard_layouts(...)")
        kind = schema.field(name).type
        check = COLUMN_TYPES.get(name, pa.types.is_integer)
        if not check(kind):
            expected = COLUMN_TYPE_NAMES.get(name, "an integer")
            raise DataError(PARTITION_SOURCE, f"column '{name}' is {kind}, the input pipeline needs {expected}")


def _column(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy()


def _chunks(column: pa.ChunkedArray) -> list[pa.Array]:
    return [chunk for chunk in column.chunks if len(chunk)]


def _pixel_view(chunk: pa.Array, num_features: int) -> np.ndarray:
    """A binary chunk of ``num_features``-byte images as a ``uint8`` (n, num_features) view of its buffer."""
    offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
    if not np.all(np.diff(offsets) == num_features):
        raise DataError(PARTITION_SOURCE, f"column '{PIXELS_COLUMN}': every image must hold {num_features} pixels")
    return np.frombuffer(chunk.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]].reshape(len(chunk), num_features)


def steps_per_epoch(rows_per_rank: int, global_batch_size: int, ranks: int, part: str = "training") -> int:
    """Steps every rank takes over its ``rows_per_rank`` rows at ``B / ranks`` rows a step.

    With equal shards of ``N / n`` rows this is ``N // B``: the same for np=1 and np=2.
    """
    per_rank = global_batch_size // ranks
    steps = rows_per_rank // per_rank
    if steps == 0:
        raise ConfigError(
            f"each rank's {part} shard has {rows_per_rank} rows, fewer than one step of {per_rank} rows per rank "
            f"(global batch {global_batch_size}); use a smaller batch, fewer ranks or more data"
        )
    return steps


def scale_images(spec: DataSpec | None = None) -> Callable[..., Any]:
    """The input pipeline's map: (uint8 images, labels) -> (float32 images in [0, 1], labels)."""
    tf = keras_flavour.tensorflow()
    maximum = float((spec or load_data_spec()).max_pixel_value)

    def scale(images: Any, labels: Any) -> tuple[Any, Any]:
        return tf.cast(images, tf.float32) / maximum, labels

    return scale


def rank_batches(
    source: RowSource, batch_size: int, steps: int, shuffle: bool = False, seed: int = 0, replicas: int = 1,
    first_epoch: int = 0, preprocess: Callable[..., Any] | None = None, epochs: int | None = None,
) -> Any:
    """``steps`` batches of ``batch_size`` rows per replica of ``source`` per epoch, epoch after epoch.

    Shuffled, epoch ``e``'s order is a stateless function of ``(seed, e)``: the same in every run, and a
    run resumed at ``first_epoch`` sees exactly the batches an undisturbed one would have. Each batch is
    gathered from ``source`` when the pipeline reaches it (``source.take``), so only a few batches are
    ever copied out of the mapped partition. ``epochs``: the dataset ends after that epoch (None: never).
    """
    tf = keras_flavour.tensorflow()
    rows = steps * batch_size * replicas
    count = len(source)
    dtypes = [tf.as_dtype(dtype) for dtype in source.dtypes]

    def epoch_order(epoch: Any) -> Any:
        everything = tf.range(count, dtype=tf.int64)
        if shuffle:
            key = tf.stack([tf.constant(seed, tf.int64), epoch])
            everything = tf.random.experimental.stateless_shuffle(everything, seed=key)
        return everything[:rows]

    def gather(index: Any) -> tuple[Any, ...]:
        batch = tf.numpy_function(source.take, [index], dtypes, stateful=False)
        for tensor, shape in zip(batch, source.shapes):
            tensor.set_shape((batch_size, *shape))
        return tuple(batch)

    epoch_numbers = (tf.data.Dataset.counter(first_epoch) if epochs is None
                     else tf.data.Dataset.range(first_epoch, epochs, output_type=tf.int64))
    indices = epoch_numbers.map(epoch_order).unbatch().batch(batch_size, drop_remainder=True)
    gathered = indices.map(gather)
    if preprocess is not None:
        gathered = gathered.map(preprocess)
    # A fixed prefetch, and no tf.data autotuning: a pipeline of three cheap maps has nothing to tune,
    # and an autotuned iterator's destructor waits for its model thread's next wake-up (seconds at the
    # end of a fit; see backends.tf.stop_device_prefetch_autotuning).
    options = tf.data.Options()
    options.autotune.enabled = False
    return gathered.prefetch(PREFETCH_BATCHES).with_options(options)


def distributed_dataset(
    context: RankContext, source: RowSource, global_batch_size: int, steps: int,
    shuffle: bool = False, seed: int = 0, first_epoch: int = 0, preprocess: Callable[..., Any] | None = None,
    epochs: int | None = None,
) -> Any:
    """``source``'s rows as the backend's input: ``steps`` global batches per epoch, from ``first_epoch`` on
    (up to ``epochs``, when given: give it, ``fit`` then ends without waiting for unused batches)."""

    def make(per_replica_batch: int, replicas: int) -> Any:
        return rank_batches(source, per_replica_batch, steps, shuffle, seed, replicas, first_epoch, preprocess,
                            epochs)

    return context.distribute_dataset(make, global_batch_size, steps)
