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
from typing import TYPE_CHECKING, Any, ContextManager, Iterator

from sparkml_mnist.errors import ConfigError, LaunchError
from sparkml_mnist.launcher.backends import rank_backend
from sparkml_mnist.launcher.checkpoints import CheckpointFiles
from sparkml_mnist.launcher.failures import ReportRefusedError
from sparkml_mnist.launcher.protocol import (
    CHIEF_RANK, FETCH, FETCH_FAILED, MAX_CHECKPOINT_BYTES, REPORT_FAILED, Checkpoint, Heartbeat, Message,
    checkpoint_from_frames, fetch_answered, new_transfer_id, report_answered, report_frames, valid_key,
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


def _whose(key: str) -> str:
    return repr(key) if key else "the run"


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
    _file_reader: pa.ipc.RecordBatchFileReader | None = None
    _said_unequal: bool = False
    _files: CheckpointFiles | None = None  # the run's checkpoint_dir, opened on first use

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
        """This rank's partition of the run's DataFrame as an Arrow table, memory-mapped: nothing is copied.

        Its pages are read from the file as they are touched; the file is unlinked once mapped, so its
        space is freed when the rank ends, however it ends.
        """
        if self._partition is None:
            self._partition = self._reader().read_all()
        return self._partition

    def record_batches(self) -> Iterator[pa.RecordBatch]:
        """This rank's partition batch by batch, as Spark sent them (memory-mapped, one batch at a time)."""
        reader = self._reader()
        for index in range(reader.num_record_batches):
            yield reader.get_batch(index)

    @property
    def partition_rows(self) -> list[int]:
        """Every rank's partition size, in rank order (known before any rank started: no collective)."""
        return list(self.spec.partition_rows)

    def equal_steps(self, global_batch_size: int) -> int:
        """Steps an epoch that every rank can take at ``global_batch_size / size`` rows a step: the same on all.

        Collectives need the same number of steps on every rank, or they hang. All ranks compute this
        from the partition sizes the tasks shared before starting, so they agree without talking. With
        unequal partitions the larger ones leave rows out of each epoch: rank 0 says how many, once.
        """
        rows = self.partition_rows
        if not rows:
            raise LaunchError("this run was given no data: pass HorovodRunner(np=..., data=<a DataFrame>)")
        if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int) or global_batch_size < self.size:
            raise ConfigError(f"equal_steps({global_batch_size!r}): the global batch must be at least the number "
                              f"of ranks ({self.size})")
        per_rank = global_batch_size // self.size
        steps = min(rows) // per_rank
        if steps == 0:
            raise ConfigError(f"rank {rows.index(min(rows))}'s partition has {min(rows)} rows, fewer than one step "
                              f"of {per_rank} rows per rank: use a smaller batch, fewer ranks or more data")
        unused = max(rows) - steps * per_rank
        if self.rank == CHIEF_RANK and len(set(rows)) > 1 and not self._said_unequal:
            self._said_unequal = True
            log_to_driver(f"partitions hold {min(rows)} to {max(rows)} rows: every rank takes {steps} steps of "
                          f"{per_rank} rows an epoch, up to {unused} rows a rank are left out of each epoch")
        return steps

    def _reader(self) -> pa.ipc.RecordBatchFileReader:
        import pyarrow as pa

        if self._file_reader is None:
            if self.partition_file is None:
                raise LaunchError("this run was given no data: pass HorovodRunner(np=..., data=<a DataFrame>)")
            self._file_reader = pa.ipc.open_file(pa.memory_map(str(self.partition_file)))
            self.partition_file.unlink(missing_ok=True)
        return self._file_reader

    @property
    def attempt(self) -> int:
        """Which attempt of the run this is (1 for the first; retries count up)."""
        return self.spec.attempt

    # -- reporting ------------------------------------------------------------------------------

    def report(self, key: str = "", metrics: dict[str, Any] | None = None, checkpoint: Checkpoint | None = None) -> None:
        """Tell the driver what this rank reached, and wait until it is kept; counts as progress.

        ``metrics`` (small, JSON) land in ``RunResult.reports[key][rank]`` (the last one under each key),
        kept even when a later part of the run fails. Rank 0 may attach a ``Checkpoint``: a retried
        attempt's ranks get it back from ``latest_checkpoint(key)``. With the run's ``checkpoint_dir``
        rank 0 writes it there (checked, with its sha256) and the driver is told only where; without,
        its bytes go to the driver (no shared filesystem is needed). ``key`` separates the things one
        run trains (up to 100 letters, digits, ``_.-``). Called with nothing, it only tells the watchdog
        this rank moved (no message is sent).

        When the driver does not keep it, this raises: a ``ReportRefusedError`` (not retried) when no
        retry can help (the driver's folder failed: full, not writable; a cap was reached), naming the
        folder or the cap; else a ``LaunchError`` saying why (the attempt is retried).
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
        files = self._checkpoint_files()
        if checkpoint is not None and files is not None and checkpoint.location is None:
            checkpoint = files.write(key, checkpoint.epoch, checkpoint.data)
        if checkpoint is not None and checkpoint.location is None and len(checkpoint.data) > MAX_CHECKPOINT_BYTES:
            raise ReportRefusedError(
                f"rank {self.rank}: the checkpoint of {_whose(key)} after epoch {checkpoint.epoch} holds "
                f"{len(checkpoint.data)} bytes, over the MAX_CHECKPOINT_BYTES={MAX_CHECKPOINT_BYTES} the driver "
                "takes over the channel: give the run a checkpoint_dir (rank 0 then writes it to storage itself) "
                "or make the checkpoint smaller")
        for frame in report_frames(key, metrics, checkpoint, new_transfer_id()):
            if frame["seq"] + 1 < frame["total"]:
                channel.send(frame)  # a chunk that does not leave is named in the driver's answer to the last
                continue
            answer = channel.request(frame, report_answered)[-1]
            if answer.get("type") == REPORT_FAILED:
                raise self._refused(f"the driver did not keep the report of {_whose(key)}", answer)

    def latest_checkpoint(self, key: str = "") -> Checkpoint | None:
        """The last checkpoint rank 0 reported under ``key`` in this run (an earlier attempt's), or None:
        read from the run's ``checkpoint_dir`` when it has one (the newest that matches its sha256), else
        from the driver."""
        files = self._checkpoint_files()
        if files is not None:
            if not valid_key(key):
                raise LaunchError(f"latest_checkpoint({key!r}): the key takes up to 100 letters, digits, '_', '.' "
                                  "or '-'")
            return files.latest(key)
        frames = self._channel().request({"type": FETCH, "key": key}, fetch_answered)
        if frames[-1].get("type") == FETCH_FAILED:
            raise self._refused(f"the driver did not send the checkpoint of {_whose(key)}", frames[-1])
        return checkpoint_from_frames(frames)

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

    def _refused(self, what: str, answer: Message) -> LaunchError:
        """The error for a driver's failure answer: ``ReportRefusedError`` (final) or ``LaunchError``."""
        reason = str(answer.get("reason") or "no reason given")
        error = ReportRefusedError if answer.get("final") is True else LaunchError
        return error(f"rank {self.rank}: {what}: {reason}")

    def _checkpoint_files(self) -> CheckpointFiles | None:
        location = self.spec.launch.checkpoint_dir
        if location is None:
            return None
        if self._files is None:
            self._files = CheckpointFiles(location)
        return self._files

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
