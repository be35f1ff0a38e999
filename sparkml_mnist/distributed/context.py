"""What a rank's function sees: who it is, its strategy, its shard, and a way to report progress.

The context is handed to the user function when it has a ``context`` parameter, and is always
available through ``get_context()`` (functions written for HorovodRunner take only their own
keyword arguments).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sparkml_mnist.errors import ConfigError, LaunchError

if TYPE_CHECKING:
    from sparkml_mnist.data.shards import ShardTensors
    from sparkml_mnist.distributed.backends.base import Backend
    from sparkml_mnist.distributed.spec import RankSpec

CONTEXT_PARAMETER = "context"

_current: RankContext | None = None


def get_context() -> RankContext:
    """This rank's context; only inside a function that a ``HorovodRunner`` runs."""
    if _current is None:
        raise LaunchError("get_context() is only available inside a function run by HorovodRunner.run()")
    return _current


def set_context(context: RankContext | None) -> None:
    global _current
    _current = context


@dataclass
class Progress:
    """Counters the heartbeat thread sends to the driver: every change is progress."""

    events: int = 0
    steps: int = 0
    examples: int | None = None
    first_step_at: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def advance(self, steps: int = 0, examples: int | None = None) -> None:
        with self.lock:
            self.events += 1
            self.steps += steps
            if examples is not None:
                self.examples = (self.examples or 0) + examples


@dataclass
class RankContext:
    """One rank of a run. ``shard`` is set when the run was given a ShardedFrame."""

    spec: RankSpec
    backend: Backend
    shard: ShardTensors | None = None
    progress: Progress = field(default_factory=Progress)
    examples_per_step: int | None = None  # set by the dataset helpers; used to count examples seen
    _strategy: Any = None

    @property
    def rank(self) -> int:
        return self.spec.rank

    @property
    def size(self) -> int:
        return self.spec.size

    @property
    def local_rank(self) -> int:
        return self.spec.local_rank

    @property
    def local_size(self) -> int:
        return self.spec.local_size

    @property
    def host(self) -> str:
        return self.spec.host

    @property
    def strategy(self) -> Any:
        """The backend's tf.distribute strategy, made on first use (so a function may build its own instead).

        Horovod all-reduces in its optimizer, so under it this is TF's default strategy.
        """
        if self._strategy is None:
            self._strategy = self.backend.strategy(self.spec)
        return self._strategy

    def report_progress(self, steps: int = 1, examples: int | None = None) -> None:
        """Tell the driver's watchdog this rank is moving (Keras ``fit`` batches are counted already)."""
        self.progress.advance(steps=steps, examples=examples)

    # -- equal steps, global batch -------------------------------------------------------------

    def per_worker_batch(self, global_batch_size: int) -> int:
        if global_batch_size <= 0 or global_batch_size % self.size:
            raise ConfigError(
                f"global batch size {global_batch_size} must be a positive multiple of the {self.size} ranks "
                f"(each takes batch/{self.size}); use e.g. {max(1, global_batch_size // self.size) * self.size}"
            )
        return global_batch_size // self.size

    def steps_per_epoch(self, global_batch_size: int, validation: bool = False) -> int:
        """Steps every rank can take on its shard: the same on all ranks (the smallest shard decides).

        With equal shards of ``N / n`` rows and ``B / n`` rows per rank and step, this is ``N // B``:
        np=1 and np=2 take the same number of steps over the same data.
        """
        rows = self.spec.min_validation_rows if validation else self.spec.min_train_rows
        if rows is None:
            raise LaunchError("this run was given no data (HorovodRunner(data=...)); pass steps explicitly")
        steps = rows // self.per_worker_batch(global_batch_size)
        if steps == 0:
            part = "validation" if validation else "training"
            raise ConfigError(
                f"the smallest {part} shard has {rows} rows, fewer than one step of "
                f"{self.per_worker_batch(global_batch_size)} rows per rank (global batch {global_batch_size}); "
                "use a smaller batch, fewer ranks or more data"
            )
        return steps

    def train_dataset(self, global_batch_size: int, shuffle: bool = True, seed: int = 0) -> Any:
        """This rank's training shard as a distributed dataset: batch/n per replica, equal steps, repeats."""
        shard = self._require_shard()
        return self.dataset(
            (shard.x_train, shard.y_train), global_batch_size, self.steps_per_epoch(global_batch_size), shuffle, seed
        )

    def validation_dataset(self, global_batch_size: int) -> Any:
        shard = self._require_shard()
        steps = self.steps_per_epoch(global_batch_size, validation=True)
        return self.dataset((shard.x_validation, shard.y_validation), global_batch_size, steps, shuffle=False)

    def dataset(
        self, arrays: tuple[Any, ...], global_batch_size: int, steps: int, shuffle: bool = False, seed: int = 0
    ) -> Any:
        """Any per-rank arrays as the backend's input of ``steps`` global batches per pass (repeated)."""
        self.examples_per_step = self.per_worker_batch(global_batch_size)
        return self.backend.dataset(self, arrays, global_batch_size, steps, shuffle, seed)

    # -- what a Keras training function needs from the backend ---------------------------------

    def model_scope(self) -> Any:
        """Build the model and its optimizer inside this (the strategy's scope, or Horovod's init)."""
        return self.backend.model_scope(self)

    def distributed_optimizer(self, optimizer: Any) -> Any:
        """The optimizer wrapped as the backend needs (Horovod's DistributedOptimizer; tf: unchanged)."""
        return self.backend.distributed_optimizer(optimizer)

    def fit_callbacks(self) -> list[Any]:
        """Callbacks ``fit`` needs on every rank (Horovod: broadcast of rank 0's weights, metric averaging)."""
        return self.backend.fit_callbacks(self)

    def _require_shard(self) -> ShardTensors:
        if self.shard is None:
            raise LaunchError("this run was given no data: pass HorovodRunner(data=shard_frame(...))")
        return self.shard
