"""A rank's own arrays -> its tf.data input (global batch semantics: B / n rows per rank and step).

The data is already split per rank, so tf.distribute must not shard it again and must not
split one rank's batch across workers: ``distribute_datasets_from_function`` lets each input
pipeline batch by ``get_per_replica_batch_size(B)``. Feeding an already-sharded dataset to
``experimental_distribute_dataset`` instead trains each worker on half its shard, silently.
Horovod needs no distribution: each rank's plain pipeline (``rank_batches``) is its input.
"""

from __future__ import annotations

from typing import Any

from sparkml_mnist import keras_flavour
from sparkml_mnist.errors import LaunchError


def rank_batches(
    arrays: tuple[Any, ...], batch_size: int, steps: int, shuffle: bool = False, seed: int = 0, replicas: int = 1
) -> Any:
    """``steps`` batches of ``batch_size`` rows per replica of this rank's arrays per pass, over and over."""
    tf = keras_flavour.tensorflow()
    dataset = tf.data.Dataset.from_tensor_slices(arrays)
    if shuffle:
        dataset = dataset.shuffle(len(arrays[0]), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.take(steps * batch_size * replicas).batch(batch_size, drop_remainder=True)
    return dataset.repeat().prefetch(tf.data.AUTOTUNE)


def distribute_arrays(
    strategy: Any,
    arrays: tuple[Any, ...],
    global_batch_size: int,
    steps: int,
    num_ranks: int,
    shuffle: bool = False,
    seed: int = 0,
) -> Any:
    """``steps`` batches of ``B / replicas`` rows per replica per pass, over and over (use steps_per_epoch)."""

    def dataset_fn(input_context: Any) -> Any:
        if input_context.num_input_pipelines != num_ranks:
            raise LaunchError(
                f"expected one input pipeline per rank ({num_ranks}), tf.distribute has "
                f"{input_context.num_input_pipelines}"
            )
        per_replica = input_context.get_per_replica_batch_size(global_batch_size)
        per_pipeline = global_batch_size // input_context.num_input_pipelines
        # A rank with several GPUs has several replicas: each step takes one batch per replica.
        return rank_batches(arrays, per_replica, steps, shuffle, seed, replicas=per_pipeline // per_replica)

    return strategy.distribute_datasets_from_function(dataset_fn)
