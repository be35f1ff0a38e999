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

from sparkml_mnist.launcher.backends import rank_backend
from sparkml_mnist.launcher.spec import RankSpec
from sparkml_mnist.errors import ConfigError, LaunchError

if TYPE_CHECKING:
    import pyarrow as pa

    from sparkml_mnist.launcher.backends.base import DatasetMaker, RankBackend
    from sparkml_mnist.launcher.channel import ChannelClient
    from sparkml_mnist.launcher.driver.store import Checkpoint

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
    _current.channel.log(DRIVER_LOG_STREAM, str(message))


@dataclass
class Progress:
    """Counters the heartbeat thread sends to the driver: every change is progress."""

    events: int = 0
    steps: int = 0
    examples: int | None = None
    examples_per_step: int | None = None  # this rank's rows per step, once a dataset was distributed
    first_step_at: float | None = None
    label: str | None = None  # what the rank is training now (the job: a variant), for the driver's live lines
    fit_first_step_at: float | None = None  # the current ``fit``'s first step and examples: its images/s
    fit_examples: int = 0
    fit_steps: int = 0
    epoch: int | None = None  # what the rank's progress callback last reported, for the driver's live lines
    epochs: int | None = None
    loss: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def advance(self, steps: int = 0, examples: int | None = None) -> None:
        with self.lock:
            self.events += 1
            self.steps += steps
            self.fit_steps += steps
            if examples is not None:
                self.examples = (self.examples or 0) + examples
                self.fit_examples += examples


@dataclass
class RankContext:
    """One rank of a run: its spec, its partition (when the run was given a DataFrame), its backend."""

    spec: RankSpec
    partition_file: Path | None = None
    channel: ChannelClient | None = None
    progress: Progress = field(default_factory=Progress)
    _backend: RankBackend | None = None
    _partition: pa.Table | None = None

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
        """This rank's partition of the run's DataFrame as an Arrow table (memory-mapped, no copy).

        The file is unlinked once mapped: its space is freed when the rank ends, however it ends.
        """
        import pyarrow as pa

        if self._partition is None:
            if self.partition_file is None:
                raise LaunchError("this run was given no data: pass HorovodRunner(np=..., data=<a DataFrame>)")
            with pa.memory_map(str(self.partition_file)) as source:
                self._partition = pa.ipc.open_file(source).read_all()
            self.partition_file.unlink(missing_ok=True)
        return self._partition

    # -- checkpoints, kept by the driver ----------------------------------------------------------

    @property
    def attempt(self) -> int:
        """Which attempt of the run this is (1 for the first; retries count up)."""
        return self.spec.attempt

    def save_checkpoint(self, data: bytes, epoch: int, key: str = "") -> None:
        """Rank 0: hand the driver a checkpoint (after ``epoch`` epochs) and wait until it is kept.

        The next attempt's ranks get it from ``latest_checkpoint()``; no shared filesystem is needed.
        ``key`` separates the checkpoints of several things one run trains (letters, digits, ``_.-``).
        """
        from sparkml_mnist.launcher.driver.store import CHIEF_RANK, send_checkpoint, valid_key

        if self.rank != CHIEF_RANK:
            raise LaunchError(f"save_checkpoint is for rank {CHIEF_RANK}; rank {self.rank} called it")
        if not valid_key(key):
            raise LaunchError(f"checkpoint key {key!r}: use up to 100 letters, digits, '_', '.' or '-'")
        send_checkpoint(self._channel(), epoch, data, key)

    def latest_checkpoint(self, key: str = "") -> Checkpoint | None:
        """The last checkpoint rank 0 handed the driver for ``key`` in this run (an earlier attempt's), or None."""
        from sparkml_mnist.launcher.driver.store import fetch_checkpoint

        return fetch_checkpoint(self._channel(), key)

    def report_result(self, key: str, data: dict[str, Any]) -> None:
        """Tell the driver what this rank finished (small, JSON): ``HorovodRunner.results[key][rank]``,
        kept even when a later part of the run fails."""
        from sparkml_mnist.launcher.driver.store import RESULT, RESULT_STORED, valid_key

        if not valid_key(key) or not isinstance(data, dict):  # the driver would refuse it without a reply
            raise LaunchError(f"report_result({key!r}, ...): the key takes up to 100 letters, digits, '_', '.' or "
                              f"'-', and the data is a dict (got {type(data).__name__})")
        self._channel().request({"type": RESULT, "key": key, "data": data},
                                lambda reply: reply.get("type") == RESULT_STORED)

    def _channel(self) -> ChannelClient:
        if self.channel is None or self.channel.disabled:
            raise LaunchError("this rank has no connection to the driver (it was not started by HorovodRunner)")
        return self.channel

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

    def distributed_optimizer(self, optimizer: Any, allreduce: str = "float32") -> Any:
        """The optimizer wrapped as the backend needs (Horovod's DistributedOptimizer; tf: unchanged);
        ``allreduce="float16"`` all-reduces the gradients in half precision."""
        from sparkml_mnist.launcher.backends.base import FULL_PRECISION, HALF_PRECISION

        if allreduce not in (FULL_PRECISION, HALF_PRECISION):
            raise ConfigError(f"allreduce={allreduce!r}: use {FULL_PRECISION!r} or {HALF_PRECISION!r}")
        return self.backend.wrap_optimizer(optimizer, allreduce)

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
