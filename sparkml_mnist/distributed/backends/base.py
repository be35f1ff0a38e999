"""The backend interface: a driver-side session, the environment before the framework is imported,
and the pieces a Keras training function needs (model scope, optimizer, callbacks, input pipeline)."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ContextManager, Iterator

from sparkml_mnist.distributed.spec import RankSpec

if TYPE_CHECKING:
    from sparkml_mnist.distributed.context import RankContext


class Backend(ABC):
    """How ranks join each other and all-reduce. One instance per process (driver, task or rank)."""

    name: str

    def check_available(self, where: str) -> None:
        """Raise a ``ConfigError`` (driver) or ``LaunchError`` (rank host) if the backend cannot run here."""

    @contextlib.contextmanager
    def driver_session(self, size: int) -> Iterator[dict[str, Any]]:
        """Driver-side services for one run (e.g. a rendezvous server); yields what each rank is told."""
        yield {}

    def finish(self) -> None:
        """In the rank's process, once every rank finished: let the framework leave in step (or nothing)."""

    @abstractmethod
    def environment(self, spec: RankSpec) -> dict[str, str]:
        """Variables the training process must have before it imports the framework (e.g. TF_CONFIG)."""

    @abstractmethod
    def strategy(self, spec: RankSpec) -> Any:
        """The tf.distribute strategy the rank trains under (made once per process, on demand)."""

    def model_scope(self, context: RankContext) -> ContextManager[Any]:
        """Where the model and its optimizer must be built."""
        return context.strategy.scope()

    def distributed_optimizer(self, optimizer: Any) -> Any:
        """The optimizer as the backend needs it (tf.distribute all-reduces inside the strategy)."""
        return optimizer

    def fit_callbacks(self, context: RankContext) -> list[Any]:
        """Callbacks every rank's ``fit`` needs for the backend to train correctly."""
        return []

    @abstractmethod
    def dataset(
        self, context: RankContext, arrays: tuple[Any, ...], global_batch_size: int, steps: int,
        shuffle: bool, seed: int,
    ) -> Any:
        """This rank's arrays as ``steps`` batches of ``global_batch_size / size`` rows per pass, repeated."""
