"""tf.distribute's MultiWorkerMirroredStrategy, told about its peers through TF_CONFIG.

TF_CONFIG is set in the training process's environment before anything imports TensorFlow,
so functions written for HorovodRunner or spark-tensorflow-distributor that build their own
``tf.distribute.MultiWorkerMirroredStrategy()`` work unchanged.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from sparkml_mnist import keras_flavour
from sparkml_mnist.distributed.backends.base import Backend
from sparkml_mnist.distributed.spec import RankSpec

if TYPE_CHECKING:
    from sparkml_mnist.distributed.context import RankContext

TF_CONFIG_ENV = "TF_CONFIG"
WORKER_TASK = "worker"


def tf_config(addresses: list[str], rank: int) -> dict[str, Any]:
    return {"cluster": {WORKER_TASK: list(addresses)}, "task": {"type": WORKER_TASK, "index": rank}}


class TensorFlowBackend(Backend):
    name = "tf"

    def environment(self, spec: RankSpec) -> dict[str, str]:
        return {
            **keras_flavour.legacy_keras_environment(),
            TF_CONFIG_ENV: json.dumps(tf_config(spec.addresses, spec.rank)),
        }

    def strategy(self, spec: RankSpec) -> Any:
        tf = keras_flavour.tensorflow()
        options = None
        if spec.collective_timeout_s:
            # Each collective then fails after this many seconds instead of waiting forever.
            options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=spec.collective_timeout_s)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)

    def dataset(
        self, context: RankContext, arrays: tuple[Any, ...], global_batch_size: int, steps: int,
        shuffle: bool, seed: int,
    ) -> Any:
        from sparkml_mnist.distributed.dataset import distribute_arrays

        return distribute_arrays(context.strategy, arrays, global_batch_size, steps, context.size, shuffle, seed)
