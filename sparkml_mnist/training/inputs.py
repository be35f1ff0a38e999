"""The training side's input pipeline: a rank's partition -> tensors -> ``tf.data`` with global-batch semantics.

The launcher hands each rank its partition of the data stage's hand-off frame as Arrow; this module
turns it into that shard's tensors (train and validation, in file order), works out how many steps
every rank takes (the same on all of them, or collectives fail), and builds the dataset the
backend distributes: ``B / n`` rows per rank and step, so np=1 and np=2 run the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sparkml_mnist.launcher import keras_flavour
from sparkml_mnist.config import DataSpec, load_data_spec
from sparkml_mnist.data.columns import ROW_COLUMN, SHARD_COLUMN, VALIDATION_COLUMN
from sparkml_mnist.data.tensors import images_and_labels
from sparkml_mnist.errors import ConfigError, DataError

if TYPE_CHECKING:
    from sparkml_mnist.launcher.rank.context import RankContext

PREFETCH_BATCHES = 2  # the step being trained and the next one


@dataclass
class ShardTensors:
    """One rank's data, in file order: ``x`` uint8 (n, 28, 28, 1) raw pixels, ``y`` one-hot."""

    shard: int
    x_train: np.ndarray
    y_train: np.ndarray
    train_rows: np.ndarray
    x_validation: np.ndarray
    y_validation: np.ndarray
    validation_rows: np.ndarray


def shard_tensors(table: pa.Table, spec: DataSpec | None = None) -> ShardTensors:
    """One hand-off partition -> that shard's tensors, sorted back to file order."""
    if table.num_rows == 0:
        raise DataError(
            "<shard>", "this rank's partition of the hand-off frame is empty",
            hint="Give the launcher the frame of shard_frame(data, np) for the same np",
        )
    shards = np.unique(table.column(SHARD_COLUMN).to_numpy(zero_copy_only=False))
    if shards.size != 1:
        raise DataError("<shard>", f"one rank received several shards {shards.tolist()}; expected exactly one")
    table = table.take(pc.sort_indices(table, sort_keys=[(ROW_COLUMN, "ascending")]))
    is_validation = table.column(VALIDATION_COLUMN).to_numpy(zero_copy_only=False)
    train, validation = table.filter(pa.array(~is_validation)), table.filter(pa.array(is_validation))
    x_train, y_train = images_and_labels(train, spec, scaled=False)  # uint8: cast in the input pipeline
    x_validation, y_validation = images_and_labels(validation, spec, scaled=False)
    return ShardTensors(
        shard=int(shards[0]),
        x_train=x_train,
        y_train=y_train,
        train_rows=train.column(ROW_COLUMN).to_numpy(zero_copy_only=False),
        x_validation=x_validation,
        y_validation=y_validation,
        validation_rows=validation.column(ROW_COLUMN).to_numpy(zero_copy_only=False),
    )


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
    arrays: tuple[Any, ...], batch_size: int, steps: int, shuffle: bool = False, seed: int = 0, replicas: int = 1,
    first_epoch: int = 0, preprocess: Callable[..., Any] | None = None, epochs: int | None = None,
) -> Any:
    """``steps`` batches of ``batch_size`` rows per replica of this rank's arrays per epoch, epoch after epoch.

    Shuffled, epoch ``e``'s order is a stateless function of ``(seed, e)``: the same in every run, and a
    run resumed at ``first_epoch`` sees exactly the batches an undisturbed one would have. ``epochs``: the
    dataset ends after that epoch (None: it never ends).
    """
    tf = keras_flavour.tensorflow()
    tensors = tuple(tf.constant(array) for array in arrays)
    rows = steps * batch_size * replicas
    count = len(arrays[0])

    def epoch_order(epoch: Any) -> Any:
        everything = tf.range(count, dtype=tf.int64)
        if shuffle:
            key = tf.stack([tf.constant(seed, tf.int64), epoch])
            everything = tf.random.experimental.stateless_shuffle(everything, seed=key)
        return everything[:rows]

    epoch_numbers = (tf.data.Dataset.counter(first_epoch) if epochs is None
                     else tf.data.Dataset.range(first_epoch, epochs, output_type=tf.int64))
    indices = epoch_numbers.map(epoch_order).unbatch().batch(batch_size, drop_remainder=True)
    gathered = indices.map(lambda index: tuple(tf.gather(tensor, index) for tensor in tensors))
    if preprocess is not None:
        gathered = gathered.map(preprocess)
    # A fixed prefetch, and no tf.data autotuning: a pipeline of three cheap maps has nothing to tune,
    # and an autotuned iterator's destructor waits for its model thread's next wake-up (seconds at the
    # end of a fit; see backends.tf.stop_device_prefetch_autotuning).
    options = tf.data.Options()
    options.autotune.enabled = False
    return gathered.prefetch(PREFETCH_BATCHES).with_options(options)


def distributed_dataset(
    context: RankContext, arrays: tuple[Any, ...], global_batch_size: int, steps: int,
    shuffle: bool = False, seed: int = 0, first_epoch: int = 0, preprocess: Callable[..., Any] | None = None,
    epochs: int | None = None,
) -> Any:
    """This rank's arrays as the backend's input: ``steps`` global batches per epoch, from ``first_epoch`` on
    (up to ``epochs``, when given: give it, ``fit`` then ends without waiting for unused batches)."""

    def make(per_replica_batch: int, replicas: int) -> Any:
        return rank_batches(arrays, per_replica_batch, steps, shuffle, seed, replicas, first_epoch, preprocess,
                            epochs)

    return context.distribute_dataset(make, global_batch_size, steps)
