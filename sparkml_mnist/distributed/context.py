"""What a rank's function sees: who it is, its partition, its backend's pieces, and ways to report.

The context is handed to the user function when it has a ``context`` parameter, and is always
available through ``get_context()`` (functions written for HorovodRunner take only their own
keyword arguments). ``log_to_driver`` works in any function a ``HorovodRunner`` runs.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager

from sparkml_mnist.distributed.backends import rank_backend
from sparkml_mnist.distributed.spec import RankSpec
from sparkml_mnist.errors import LaunchError

if TYPE_CHECKING:
    import pyarrow as pa

    from sparkml_mnist.distributed.backends.base import DatasetMaker, RankBackend
    from sparkml_mnist.distributed.channel import ChannelClient

CONTEXT_PARAMETER = "context"
DRIVER_LOG_STREAM = "log"  # log_to_driver's lines: shown at every driver_log_verbosity

_current: RankContext | None = None


def get_context() -> RankContext:
    """This rank's context; only inside a function that a ``HorovodRunner`` runs."""
    if _current is None:
        raise LaunchError("get_context() is only available inside a function run by HorovodRunner.run()")
    return _current


def set_context(context: RankContext | None) -> None:
    global _current
    _current = context


def log_to_driver(message: str) -> None:
    """Send one line to the driver's output (sparkdl's ``log_to_driver``); outside a run, print it."""
    if _current is None or _current.channel is None:
        print(message, file=sys.stderr, flush=True)
        return
    _current.channel.log(_current.rank, DRIVER_LOG_STREAM, str(message))


@dataclass
class Progress:
    """Counters the heartbeat thread sends to the driver: every change is progress."""

    events: int = 0
    steps: int = 0
    examples: int | None = None
    examples_per_step: int | None = None  # this rank's rows per step, once a dataset was distributed
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
    """One rank of a run: its spec, its partition (when the run was given a DataFrame), its backend."""

    spec: RankSpec
    partition_file: Path | None = None
    channel: ChannelClient | None = None
    progress: Progress = field(default_factory=Progress)
    _backend: RankBackend | None = None

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
    def gpus(self) -> list[str]:
        return list(self.spec.gpus)

    # -- data -----------------------------------------------------------------------------------

    def partition(self) -> pa.Table:
        """This rank's partition of the run's DataFrame as an Arrow table (memory-mapped, no copy)."""
        import pyarrow as pa

        if self.partition_file is None:
            raise LaunchError("this run was given no data: pass HorovodRunner(np=..., data=<a DataFrame>)")
        with pa.memory_map(str(self.partition_file)) as source:
            return pa.ipc.open_file(source).read_all()

    # -- the backend's pieces -------------------------------------------------------------------

    @property
    def backend(self) -> RankBackend:
        if self._backend is None:
            self._backend = rank_backend(self.spec)
        return self._backend

    @property
    def strategy(self) -> Any:
        """The backend's tf.distribute strategy, made on first use (so a function may build its own instead).

        Horovod all-reduces in its optimizer, so under it this is TF's default strategy; under jax it
        is the Keras 3 distribution in force (``keras.distribution.DataParallel``).
        """
        return self.backend.strategy

    def model_scope(self) -> ContextManager[Any]:
        """Build the model and its optimizer inside this (the strategy's scope, or Horovod's init)."""
        return self.backend.model_scope()

    def distributed_optimizer(self, optimizer: Any) -> Any:
        """The optimizer wrapped as the backend needs (Horovod's DistributedOptimizer; tf: unchanged)."""
        return self.backend.wrap_optimizer(optimizer)

    def fit_callbacks(self) -> list[Any]:
        """Callbacks ``fit`` needs on every rank (Horovod: broadcast of rank 0's weights, metric averaging)."""
        return self.backend.fit_callbacks()

    def distribute_dataset(self, make_dataset: DatasetMaker, global_batch_size: int, steps: int | None = None) -> Any:
        """``make_dataset(per_replica_batch, replicas)`` as the backend's input with global-batch semantics.

        Each rank takes ``global_batch_size / size`` rows a step (checked where the run was planned).
        ``steps``: the steps this rank will take over it; a backend that deadlocks on unequal steps (jax)
        compares them across the ranks now (every rank must then call this in the same order).
        """
        if steps is not None:
            self.backend.check_steps(steps)
        self.progress.examples_per_step = global_batch_size // self.size
        return self.backend.distribute(make_dataset, global_batch_size)

    # -- reporting ------------------------------------------------------------------------------

    def report_progress(self, steps: int = 1, examples: int | None = None) -> None:
        """Tell the driver's watchdog this rank is moving.

        A rank that never reports progress is judged by its heartbeats alone; once it reports, a run
        in which no rank moves for ``progress_timeout_s`` is ended. Keras functions pass
        ``callbacks.ProgressCallback`` (or sparkdl's ``LogCallback``) to ``fit`` instead.
        """
        self.progress.advance(steps=steps, examples=examples)

    def log(self, message: str) -> None:
        log_to_driver(message)
