"""HorovodRunner-compatible launcher: ``HorovodRunner(np=2).run(main, **kwargs)``.

As sparkdl's HorovodRunner: ``np > 0`` runs ``np`` ranks as Spark barrier tasks on executors,
``np < 0`` runs ``-np`` processes on the driver alone (a quick check), ``run`` returns rank 0's
return value, and ``driver_log_verbosity`` says what reaches the driver's output. Every rank runs
in a fresh process with the backend's variables (TF_CONFIG, or Horovod's) and TF_USE_LEGACY_KERAS=1
set before TensorFlow is imported, so functions written for HorovodRunner or
spark-tensorflow-distributor run unchanged. Given ``data`` (a DataFrame with ``np`` partitions),
rank ``r`` gets partition ``r`` as Arrow (``get_context().partition()``); the launcher knows
nothing of its columns.

Spark never retries a failed barrier stage, so the runner does: a failed, stalled or lost attempt
is launched again (``max_retries`` times), and its ranks find the last checkpoint rank 0 handed the
driver (``context.save_checkpoint`` / ``latest_checkpoint``). A failure that repeats identically is
not retried again.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from pyspark import cloudpickle
from pyspark.sql import DataFrame, SparkSession

from sparkml_mnist.launcher.driver import cluster as resources
from sparkml_mnist.launcher.driver.attempt import AttemptRecord, LaunchOptions, run_attempt
from sparkml_mnist.launcher.backends import DEFAULT_BACKEND
from sparkml_mnist.launcher.channel import LogSink, print_log_line
from sparkml_mnist.launcher.driver.store import CheckpointReceiver, CheckpointStore
from sparkml_mnist.launcher.placement import Placement, parse_placement
from sparkml_mnist.launcher.failures import PreflightError, RankFailedError, RankRecord, RankStalledError
from sparkml_mnist.errors import ConfigError, LaunchError

NO_COLLECTIVE_TIMEOUT = 0.0

DEFAULT_PROGRESS_TIMEOUT_S = 600.0  # must exceed the slowest step and any rank-0-only work
DEFAULT_HEARTBEAT_INTERVAL_S = 1.0
DEFAULT_MAX_RETRIES = 2
LOG_CALLBACK_ONLY = "log_callback_only"  # sparkdl's default: only log_to_driver / LogCallback lines
ALL_OUTPUT = "all"  # also every line the ranks print
VERBOSITIES = (LOG_CALLBACK_ONLY, ALL_OUTPUT)

logger = logging.getLogger(__name__)


class HorovodRunner:
    """Runs a function on ``np`` ranks with the ``tf`` or ``horovod`` backend; see the module docstring.

    ``np``: an int in sparkdl's convention, or a ``Placement`` already parsed. ``data``: a DataFrame
    with one partition per rank. ``progress_timeout_s``: a rank that sends no heartbeat for this long,
    or an attempt whose ranks report progress but none moved for this long, is ended with a
    ``RankStalledError`` naming the rank(s); ``startup_timeout_s`` (default: the same) bounds the time
    until every rank's first heartbeat. ``collective_timeout_s`` (default: ``progress_timeout_s``) bounds
    each collective of the backend's strategy; ``NO_COLLECTIVE_TIMEOUT`` turns that off for a function
    that reports progress every step (the watchdog then ends a hung collective), since under tf each
    timed collective keeps a sleeping thread for the whole timeout. ``max_retries``: attempts after the
    first, each resuming from the checkpoint store (``checkpoints``; in memory when not given).
    """

    def __init__(
        self,
        *,
        np: int | Placement,
        driver_log_verbosity: str = LOG_CALLBACK_ONLY,
        spark: SparkSession | None = None,
        data: DataFrame | None = None,
        backend: str = DEFAULT_BACKEND,
        progress_timeout_s: float = DEFAULT_PROGRESS_TIMEOUT_S,
        startup_timeout_s: float | None = None,
        collective_timeout_s: float | None = None,
        heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        checkpoints: CheckpointStore | None = None,
        log_sink: LogSink | None = print_log_line,
        executor_wait_s: float = resources.EXECUTOR_WAIT_S,
        name: str = "",
    ) -> None:
        self.placement = parse_placement(np, backend)
        if driver_log_verbosity not in VERBOSITIES:
            raise ConfigError(
                f"driver_log_verbosity must be one of {', '.join(VERBOSITIES)}, got {driver_log_verbosity!r}"
            )
        if progress_timeout_s <= heartbeat_interval_s:
            raise ConfigError(
                f"progress_timeout_s ({progress_timeout_s}) must exceed heartbeat_interval_s ({heartbeat_interval_s})"
            )
        if startup_timeout_s is not None and startup_timeout_s <= heartbeat_interval_s:
            raise ConfigError(
                f"startup_timeout_s ({startup_timeout_s}) must exceed heartbeat_interval_s ({heartbeat_interval_s})"
            )
        if collective_timeout_s is not None and collective_timeout_s < 0:
            raise ConfigError(
                f"collective_timeout_s must be >= 0 (0: no per-collective timeout), got {collective_timeout_s}"
            )
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ConfigError(f"max_retries must be a whole number >= 0, got {max_retries!r}")
        self.driver_log_verbosity = driver_log_verbosity
        self.data = data
        self.max_retries = max_retries
        self.checkpoints = checkpoints if checkpoints is not None else CheckpointStore()
        self.options = LaunchOptions(
            progress_timeout_s=progress_timeout_s,
            startup_timeout_s=startup_timeout_s if startup_timeout_s is not None else progress_timeout_s,
            collective_timeout_s=collective_timeout_s if collective_timeout_s is not None else progress_timeout_s,
            heartbeat_interval_s=heartbeat_interval_s,
            forward_output=driver_log_verbosity == ALL_OUTPUT,
            executor_wait_s=executor_wait_s,
            title=name,
        )
        self.log_sink = log_sink
        self.attempts: list[AttemptRecord] = []
        # key -> rank -> what the rank reported finishing (context.report_result); kept across attempts
        self.results: dict[str, dict[int, Any]] = {}
        self.spark = spark or (data.sparkSession if data is not None else SparkSession.getActiveSession())
        if not self.placement.on_driver and self.spark is None:
            raise ConfigError("np>0 runs on Spark executors: pass spark=SparkSession, or create one first")
        if data is not None:
            _check_partitions(data, self.placement.size)

    @property
    def np(self) -> int:
        return self.placement.np

    def run(self, main: Callable[..., Any], **kwargs: Any) -> Any:
        """Run ``main(**kwargs)`` on every rank; return rank 0's return value (as sparkdl's HorovodRunner)."""
        return self._launch(main, kwargs, keep_all_values=False)[0].value

    def run_all(self, main: Callable[..., Any], **kwargs: Any) -> list[RankRecord]:
        """Run ``main(**kwargs)`` on every rank; return every rank's record (value, host, pid, timings...)."""
        return self._launch(main, kwargs, keep_all_values=True)

    # ------------------------------------------------------------------------------------------

    def _launch(self, main: Callable[..., Any], kwargs: dict[str, Any], keep_all_values: bool) -> list[RankRecord]:
        if not callable(main):
            raise ConfigError(f"HorovodRunner.run needs a function, got {type(main).__name__}")
        if not self.placement.on_driver:
            risk = resources.check_secured_cluster(self.spark)  # type: ignore[arg-type]
            if risk:
                logger.warning(risk)
        payload = cloudpickle.dumps((main, kwargs))
        receiver = CheckpointReceiver(self.checkpoints)
        self.attempts = []
        self.results = {}
        previous: tuple[Any, ...] | None = None
        for number in range(1, self.max_retries + 2):
            resumed_from = self.checkpoints.epochs()
            attempt = AttemptRecord(number=number, started_at=time.time(),
                                    resumed_from_epoch=resumed_from.get(""), resumed_from=resumed_from)
            self.attempts.append(attempt)
            logger.debug("attempt %d: starting %d ranks (%s)", number, self.placement.size, self.placement.where)
            try:
                results = run_attempt(number, self.placement, self.spark, self.data, self.options, payload,
                                      keep_all_values, self.log_sink, receiver, attempt, self.results)
            except LaunchError as error:
                attempt.ended_at, attempt.outcome = time.time(), "failed"
                attempt.cause = str(error).splitlines()[0]
                signature = failure_signature(error, tuple(sorted(attempt.resumed_from.items())))
                error.attempts = list(self.attempts)  # type: ignore[attr-defined]
                if isinstance(error, PreflightError) or number > self.max_retries or signature == previous:
                    if signature == previous:
                        logger.warning("attempt %d failed as attempt %d did; not retrying: %s",
                                       number, number - 1, attempt.cause)
                    raise
                previous = signature
                logger.warning("attempt %d of %d failed: %s; retrying%s", number, self.max_retries + 1,
                               attempt.cause, _resume_note(self.checkpoints))
                continue
            except BaseException:
                attempt.ended_at, attempt.outcome, attempt.cause = time.time(), "interrupted", "interrupted"
                raise
            attempt.ended_at, attempt.outcome = time.time(), "succeeded"
            return self._records(results, attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _records(self, results: list[tuple[RankRecord, bytes]], attempt: AttemptRecord) -> list[RankRecord]:
        records = []
        for record, value_bytes in results:
            record.value = cloudpickle.loads(value_bytes) if value_bytes else None
            record.timings["run_started_at"] = self.attempts[0].started_at
            record.timings["attempt_started_at"] = attempt.started_at
            records.append(record)
        return records


def failure_signature(error: LaunchError, resumed_from_epoch: Any) -> tuple[Any, ...]:
    """What makes two failures "the same": the same rank failing the same way at the same point."""
    if isinstance(error, RankFailedError):
        failure = error.error
        return ("failed", resumed_from_epoch, error.rank, failure.kind, failure.error_type, failure.message,
                failure.exit_code, failure.steps)
    if isinstance(error, RankStalledError):
        return ("stalled", resumed_from_epoch, tuple(error.ranks), error.reason)
    return ("launch", resumed_from_epoch, str(error))


def _resume_note(store: CheckpointStore) -> str:
    epochs = store.epochs()
    if not epochs:
        return " from the start (no checkpoint yet)"
    where = ", ".join(f"{key or 'the run'} after epoch {epoch}" for key, epoch in epochs.items())
    return f" from the last checkpoints ({where})"


def _check_partitions(data: DataFrame, size: int) -> None:
    """One partition per rank, checked before anything runs where Spark can tell (not over Connect)."""
    try:
        partitions = data.rdd.getNumPartitions()
    except Exception:  # Spark Connect has no RDDs: the barrier tasks check their count instead
        return
    if partitions != size:
        raise ConfigError(
            f"the run's DataFrame has {partitions} partitions but np={size}: give it exactly one partition per "
            f"rank (df.repartition({size}), or shard_frame(data, {size}) for the MNIST data stage)"
        )
