"""The two halves of a backend, apart: what the driver and the barrier task do, and what runs in the rank.

``DriverBackend`` (driver and barrier task): can the backend run here, the run's driver-side
services, and the variables the rank's process needs before it imports the framework.
``RankBackend`` (inside the rank's process only): built from the rank's ``RankSpec`` alone, it makes
the strategy and gives a Keras training function the model scope, the optimizer wrapper, the
callbacks and the dataset distribution the backend needs.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, ContextManager, Iterator

from sparkml_mnist.launcher.spec import RankSpec

FULL_PRECISION, HALF_PRECISION = "float32", "float16"  # what the gradients' all-reduce sends
# make_dataset(per_replica_batch, replicas_in_this_pipeline) -> a tf.data.Dataset of this rank's batches
DatasetMaker = Callable[[int, int], Any]


class DriverBackend(ABC):
    """How a run is set up from the driver and the barrier tasks; never imports the framework."""

    name: ClassVar[str]

    def check_available(self, where: str) -> None:
        """Raise ``ConfigError`` (``where="driver"``) or ``LaunchError`` (a rank's host) if it cannot run there."""

    @contextlib.contextmanager
    def driver_session(self, size: int, bind_host: str, secret: str) -> Iterator[dict[str, Any]]:
        """Driver-side services for one attempt (e.g. a rendezvous server, bound to ``bind_host``, the
        address the ranks reach the driver at, serving only holders of the attempt's ``secret``'s rank
        tokens); yields what each rank is told (never a secret: it reaches the rank's process)."""
        yield {}

    @abstractmethod
    def environment(self, spec: RankSpec) -> dict[str, str]:
        """Variables the training process must have before it imports the framework (e.g. TF_CONFIG)."""


class RankBackend(ABC):
    """What the backend does inside one rank's process, made from that rank's spec."""

    def __init__(self, spec: RankSpec) -> None:
        self.spec = spec
        self._strategy: Any = None

    def start(self) -> None:
        """What must happen in the rank's process before the user's function runs (jax: Keras's initialize).

        Nothing for tf and horovod, whose functions may build their own strategy or call ``hvd.init()``.
        """

    @abstractmethod
    def make_strategy(self) -> Any:
        """The tf.distribute strategy the rank trains under (called once, on first use)."""

    @property
    def strategy(self) -> Any:
        if self._strategy is None:
            self._strategy = self.make_strategy()
        return self._strategy

    def model_scope(self) -> ContextManager[Any]:
        """Where the model and its optimizer must be built."""
        return self.strategy.scope()

    def wrap_optimizer(self, optimizer: Any, allreduce: str = FULL_PRECISION) -> Any:
        """The optimizer as the backend needs it; ``allreduce="float16"`` sends the gradients in half
        precision (half the bytes a step; the sum is cast back to the variables' precision)."""
        return optimizer

    def fit_callbacks(self) -> list[Any]:
        """Callbacks every rank's ``fit`` needs for the backend to train correctly."""
        return []

    @abstractmethod
    def distribute(self, make_dataset: DatasetMaker, global_batch_size: int) -> Any:
        """This rank's input for ``fit``: global-batch semantics, ``global_batch_size / size`` rows per rank."""

    def check_steps(self, steps: int) -> None:
        """Refuse, before training, steps that differ between ranks where that would deadlock (jax)."""

    def shutdown(self) -> None:
        """Once every rank finished: let the framework leave in step (or nothing)."""
