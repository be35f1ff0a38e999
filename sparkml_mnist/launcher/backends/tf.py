"""tf.distribute's MultiWorkerMirroredStrategy, told about its peers through TF_CONFIG.

TF_CONFIG is set in the training process's environment before anything imports TensorFlow,
so functions written for HorovodRunner or spark-tensorflow-distributor that build their own
``tf.distribute.MultiWorkerMirroredStrategy()`` work unchanged.
"""

from __future__ import annotations

import json
from typing import Any

from sparkml_mnist.launcher import keras_flavour
from sparkml_mnist.launcher.backends.base import FULL_PRECISION, DatasetMaker, DriverBackend, RankBackend
from sparkml_mnist.launcher.spec import RankSpec
from sparkml_mnist.errors import LaunchError

NAME = "tf"
TF_CONFIG_ENV = "TF_CONFIG"
WORKER_TASK = "worker"


def tf_config(addresses: list[str], rank: int) -> dict[str, Any]:
    return {"cluster": {WORKER_TASK: list(addresses)}, "task": {"type": WORKER_TASK, "index": rank}}


def half_precision_allreduce(optimizer: Any, dtype: str) -> Any:
    """The same optimizer, all-reducing its gradients in ``dtype``.

    ``aggregate_gradients`` is the documented place to change the aggregation of a Keras 2 optimizer
    ("Users can implement their own aggregation logic by overriding this method"); the subclass is made
    from the optimizer's own config, so every hyperparameter stays.
    """
    tf = keras_flavour.tensorflow()
    base = type(optimizer)

    class HalfPrecisionAllReduce(base):  # type: ignore[misc, valid-type]
        def aggregate_gradients(self, grads_and_vars: Any) -> list[tuple[Any, Any]]:
            pairs = list(grads_and_vars)
            present = [(gradient, variable) for gradient, variable in pairs if gradient is not None]
            narrow = [tf.cast(gradient, dtype) for gradient, _ in present]
            summed = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, narrow)
            reduced = iter(tf.cast(total, gradient.dtype) for total, (gradient, _) in zip(summed, present))
            return [(None, variable) if gradient is None else (next(reduced), variable) for gradient, variable in pairs]

    HalfPrecisionAllReduce.__name__ = base.__name__  # the model's config names the optimizer it is
    return HalfPrecisionAllReduce.from_config(optimizer.get_config())


def stop_device_prefetch_autotuning() -> None:
    """Build tf.distribute's per-device prefetch datasets with tf.data autotuning off.

    ``MultiDeviceIterator`` (what ``distribute_datasets_from_function`` iterates through under
    MultiWorkerMirroredStrategy) makes a new dataset per device that inherits none of the input's
    options, so it autotunes: its iterator starts a model thread, and the iterator's destructor waits
    for that thread's next wake-up, up to a minute later (its period doubles). Measured on 2 ranks:
    3-13 s at the end of 18 of 30 ``fit`` calls, each on the job's critical path; none of 18 with the
    option off (benchmarks/RESULTS.md, "Job overhead"). A one-element prefetch has nothing to tune.
    Idempotent.
    """
    from tensorflow.python.data.ops import multi_device_iterator_ops  # the factory has no public hook

    make_device_dataset = multi_device_iterator_ops._create_device_dataset
    if getattr(make_device_dataset, "autotuning_stopped", False):
        return
    tf = keras_flavour.tensorflow()

    def untuned_device_dataset(*args: Any, **kwargs: Any) -> Any:
        options = tf.data.Options()
        options.autotune.enabled = False
        return make_device_dataset(*args, **kwargs).with_options(options)

    untuned_device_dataset.autotuning_stopped = True  # type: ignore[attr-defined]
    multi_device_iterator_ops._create_device_dataset = untuned_device_dataset


class TfDriverBackend(DriverBackend):
    name = NAME

    def environment(self, spec: RankSpec) -> dict[str, str]:
        return {
            **keras_flavour.legacy_keras_environment(),
            TF_CONFIG_ENV: json.dumps(tf_config(spec.addresses, spec.rank)),
        }


class TfRankBackend(RankBackend):
    def make_strategy(self) -> Any:
        tf = keras_flavour.tensorflow()
        options = None
        if self.spec.policy.collective_limit_s:
            # Each collective then fails after this many seconds instead of waiting forever.
            options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=self.spec.policy.collective_limit_s)
        stop_device_prefetch_autotuning()
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)

    def wrap_optimizer(self, optimizer: Any, allreduce: str = FULL_PRECISION) -> Any:
        return optimizer if allreduce == FULL_PRECISION else half_precision_allreduce(optimizer, allreduce)

    def distribute(self, make_dataset: DatasetMaker, global_batch_size: int) -> Any:
        """One input pipeline per rank, each batching ``B / replicas`` rows per replica.

        The data is already split per rank, so tf.distribute must not shard it again and must not
        split one rank's batch across workers: ``distribute_datasets_from_function`` lets each
        pipeline batch by ``get_per_replica_batch_size(B)``. Feeding an already-sharded dataset to
        ``experimental_distribute_dataset`` instead trains each worker on half its shard, silently.
        """
        size = self.spec.size

        def dataset_fn(input_context: Any) -> Any:
            if input_context.num_input_pipelines != size:
                raise LaunchError(
                    f"expected one input pipeline per rank ({size}), tf.distribute has "
                    f"{input_context.num_input_pipelines}"
                )
            per_replica = input_context.get_per_replica_batch_size(global_batch_size)
            per_pipeline = global_batch_size // input_context.num_input_pipelines
            # A rank with several GPUs has several replicas: each step takes one batch per replica.
            return make_dataset(per_replica, per_pipeline // per_replica)

        return self.strategy.distribute_datasets_from_function(dataset_fn)
