"""What a rank's function sees: who it is, its partition, its backend's pieces, and one way to report.

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

from sparkml_mnist.errors import ConfigError, LaunchError
from sparkml_mnist.launcher.backends import rank_backend
from sparkml_mnist.launcher.protocol import (
    CHIEF_RANK, FETCH, REPORTED, Checkpoint, Heartbeat, checkpoint_from_frames, last_checkpoint_frame,
    report_frames, valid_key,
)
from sparkml_mnist.launcher.spec import RankSpec

if TYPE_CHECKING:
    import pyarrow as pa

    from sparkml_mnist.launcher.backends.base import DatasetMaker, RankBackend
    from sparkml_mnist.launcher.channel import ChannelClient

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
class RankContext:
    """One rank of a run: its spec, its partition (when the run was given a DataFrame), its backend."""

    spec: RankSpec
    partition_file: Path | None = None
    channel: ChannelClient | None = None
    heartbeat: Heartbeat = field(default_factory=Heartbeat)  # what the next heartbeat sends
    examples_per_step: int | None = None  # this rank's rows a step, once a dataset was distributed
    _lock: threading.Lock = field(default_factory=threading.Lock)
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

    @property
    def attempt(self) -> int:
        """Which attempt of the run this is (1 for the first; retries count up)."""
        return self.spec.attempt

    # -- reporting ------------------------------------------------------------------------------

    def report(self, key: str = "", metrics: dict[str, Any] | None = None, checkpoint: Checkpoint | None = None) -> None:
        """Tell the driver what this rank reached, and wait until it is kept; counts as progress.

        ``metrics`` (small, JSON) land in ``RunResult.reports[key][rank]`` (the last one under each key),
        kept even when a later part of the run fails. Rank 0 may attach a ``Checkpoint``: a retried
        attempt's ranks get it back from ``latest_checkpoint(key)``; no shared filesystem is needed.
        ``key`` separates the things one run trains (up to 100 letters, digits, ``_.-``). Called with
        nothing, it only tells the watchdog this rank moved (no message is sent).
        """
        with self._lock:
            self.heartbeat.progress += 1
        if metrics is None and checkpoint is None:
            return
        metrics = {} if metrics is None else metrics
        if not valid_key(key) or not isinstance(metrics, dict):
            raise LaunchError(f"report({key!r}, ...): the key takes up to 100 letters, digits, '_', '.' or '-', "
                              f"and the metrics are a dict (got {type(metrics).__name__})")
        if checkpoint is not None and self.rank != CHIEF_RANK:
            raise LaunchError(f"only rank {CHIEF_RANK} reports checkpoints; rank {self.rank} attached one")
        channel = self._channel()
        frames = list(report_frames(key, metrics, checkpoint))
        for frame in frames[:-1]:
            channel.send(frame)
        channel.request(frames[-1], lambda reply: reply.get("type") == REPORTED)

    def latest_checkpoint(self, key: str = "") -> Checkpoint | None:
        """The last checkpoint rank 0 reported under ``key`` in this run (an earlier attempt's), or None."""
        return checkpoint_from_frames(self._channel().request({"type": FETCH, "key": key}, last_checkpoint_frame))

    def count_steps(self, steps: int = 1, examples: int | None = None) -> None:
        """Training steps taken (the launcher's Keras callbacks call this every batch): progress and rates."""
        with self._lock:
            beat = self.heartbeat
            beat.progress += 1
            beat.steps += steps
            beat.fit_steps += steps
            if examples is not None:
                beat.examples += examples
                beat.fit_examples += examples

    def heartbeat_message(self, done: bool = False) -> dict[str, Any]:
        """The heartbeat as it leaves now (the heartbeat thread; a consistent copy of the counters)."""
        with self._lock:
            self.heartbeat.done = done
            return self.heartbeat.to_message()

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
        self.examples_per_step = global_batch_size // self.size
        return self.backend.distribute(make_dataset, global_batch_size)
