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
is launched again (``FailurePolicy.max_retries`` times), and its ranks find the last checkpoint rank 0
reported (``context.report(key, metrics, checkpoint)`` / ``context.latest_checkpoint(key)``): in the
run's ``checkpoint_dir`` (a path or URI every rank reaches; rank 0 writes there directly), or, without
one, kept by the driver on its own disk after travelling over the run's channel. A failure that repeats
identically is not retried again, nor one no retry can fix: a pre-flight failure, or the driver
refusing what a rank sent (``ReportRefusedError``: its checkpoint folder failed, a cap was reached).
``run_all`` returns a ``RunResult``: every rank's record, every attempt, and what the ranks reported.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pyspark import cloudpickle
from pyspark.sql import DataFrame, SparkSession

from sparkml_mnist.errors import ConfigError, LaunchError
from sparkml_mnist.launcher.backends import DEFAULT_BACKEND
from sparkml_mnist.launcher.checkpoints import normalized, probe
from sparkml_mnist.launcher.driver import cluster
from sparkml_mnist.launcher.driver.attempt import Attempt, AttemptLauncher
from sparkml_mnist.launcher.driver.reports import ReportListener, RunReports
from sparkml_mnist.launcher.driver.store import CheckpointStore
from sparkml_mnist.launcher.failures import RankFailedError, RankRecord, RankStalledError, is_final
from sparkml_mnist.launcher.placement import Placement, parse_placement
from sparkml_mnist.launcher.policy import FailurePolicy

LOG_CALLBACK_ONLY = "log_callback_only"  # sparkdl's default: only log_to_driver / LogCallback lines
ALL_OUTPUT = "all"  # also every line the ranks print
VERBOSITIES = (LOG_CALLBACK_ONLY, ALL_OUTPUT)
LOCAL_DIRS_ENV, LOCAL_DIR_CONF = "SPARK_LOCAL_DIRS", "spark.local.dir"  # where the driver's own store goes
DRIVER_STORE_PREFIX = "sparkml-mnist-checkpoints-"

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a run left: every rank's record (return value, host, timings), every attempt, and what the
    ranks reported (``reports[key][rank]``: the last metrics each rank reported under each key)."""

    records: list[RankRecord]
    attempts: list[Attempt]
    reports: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)

    @property
    def value(self) -> Any:
        """Rank 0's return value (what ``run`` returns)."""
        return self.records[0].value

    @property
    def ranks(self) -> dict[str, Any]:
        """The last attempt's per-rank step rates and its straggler, if any."""
        return self.attempts[-1].ranks


class HorovodRunner:
    """Runs a function on ``np`` ranks with the ``tf``, ``horovod`` or ``jax`` backend; see the module docstring.

    ``np``: an int in sparkdl's convention, or a ``Placement`` already parsed. ``data``: a DataFrame
    with one partition per rank. ``policy``: timeouts and retries (``FailurePolicy``). ``checkpoint_dir``:
    where rank 0's checkpoints go: a local path (``/dbfs/...``, ``/Volumes/...``) or a ``file:``,
    ``hdfs:``, ``s3a:`` URI that the driver and every executor reach (rank 0 writes there directly;
    checked at once: a folder that cannot be created, written or read is a ``ConfigError``); or a
    ``CheckpointStore`` the driver keeps (the job's, in its state folder). Not given: the checkpoints
    travel to the driver, which keeps them in a folder under Spark's local dir for the run's retries.
    A ``checkpoint_dir`` belongs to one run: another run given it resumes from what it holds.
    ``on_report(key, rank, metrics, checkpoint)``: called on the driver as each rank's report is kept
    (``checkpoint.data`` reads a stored checkpoint and checks it; read it there: an older one is removed
    once a newer one checks out). ``spark``: the session (default: ``data``'s, or the active one).
    """

    def __init__(
        self,
        *,
        np: int | Placement,
        driver_log_verbosity: str = LOG_CALLBACK_ONLY,
        data: DataFrame | None = None,
        backend: str = DEFAULT_BACKEND,
        policy: FailurePolicy | None = None,
        checkpoint_dir: Path | str | CheckpointStore | None = None,
        on_report: ReportListener | None = None,
        spark: SparkSession | None = None,
    ) -> None:
        self.placement = parse_placement(np, backend)
        if driver_log_verbosity not in VERBOSITIES:
            raise ConfigError(
                f"driver_log_verbosity must be one of {', '.join(VERBOSITIES)}, got {driver_log_verbosity!r}"
            )
        self.driver_log_verbosity = driver_log_verbosity
        self.policy = policy if policy is not None else FailurePolicy()
        self.data = data
        if isinstance(checkpoint_dir, (str, Path)):
            checkpoint_dir = normalized(probe(checkpoint_dir))
        self.checkpoint_dir = checkpoint_dir
        self.on_report = on_report
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
        return self._launch(main, kwargs, keep_all_values=False).value

    def run_all(self, main: Callable[..., Any], **kwargs: Any) -> RunResult:
        """Run ``main(**kwargs)`` on every rank; return every rank's record, the attempts and the reports."""
        return self._launch(main, kwargs, keep_all_values=True)

    # ------------------------------------------------------------------------------------------

    def _launch(self, main: Callable[..., Any], kwargs: dict[str, Any], keep_all_values: bool) -> RunResult:
        if not callable(main):
            raise ConfigError(f"HorovodRunner.run needs a function, got {type(main).__name__}")
        if not self.placement.on_driver:
            risk = cluster.check_secured_cluster(self.spark, self.placement.backend)  # type: ignore[arg-type]
            if risk:
                logger.warning(risk)
        if isinstance(self.checkpoint_dir, CheckpointStore):
            return self._attempts(main, kwargs, keep_all_values, self.checkpoint_dir)
        if self.checkpoint_dir is not None:
            return self._attempts(main, kwargs, keep_all_values, CheckpointStore(self.checkpoint_dir, direct=True))
        folder = driver_store_folder(self.spark)  # only this run knows it: removed when the run ends
        try:
            return self._attempts(main, kwargs, keep_all_values, CheckpointStore(folder))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _attempts(self, main: Callable[..., Any], kwargs: dict[str, Any], keep_all_values: bool,
                  store: CheckpointStore) -> RunResult:
        reports = RunReports(store, self.on_report)
        launcher = AttemptLauncher(
            placement=self.placement, spark=self.spark, data=self.data, policy=self.policy,
            payload=cloudpickle.dumps((main, kwargs)), reports=reports, keep_all_values=keep_all_values,
            forward_output=self.driver_log_verbosity == ALL_OUTPUT,
        )
        attempts: list[Attempt] = []
        previous: tuple[Any, ...] | None = None
        retries = self.policy.max_retries
        for number in range(1, retries + 2):
            attempt = Attempt(number=number, started_at=time.time(), resumed_from=store.epochs())
            attempts.append(attempt)
            logger.debug("attempt %d: starting %d ranks (%s)", number, self.placement.size, self.placement.where)
            try:
                results = launcher.run(attempt)
            except LaunchError as error:
                attempt.ended_at, attempt.outcome = time.time(), "failed"
                attempt.cause = str(error).splitlines()[0]
                signature = failure_signature(error, tuple(sorted(attempt.resumed_from.items())))
                error.attempts = list(attempts)  # type: ignore[attr-defined]
                error.reports = reports.metrics  # type: ignore[attr-defined]
                if is_final(error) or number > retries or signature == previous:
                    if signature == previous:
                        logger.warning("attempt %d failed as attempt %d did; not retrying: %s",
                                       number, number - 1, attempt.cause)
                    raise
                previous = signature
                logger.warning("attempt %d of %d failed: %s; retrying%s", number, retries + 1,
                               attempt.cause, _resume_note(store))
                continue
            except BaseException:
                attempt.ended_at, attempt.outcome, attempt.cause = time.time(), "interrupted", "interrupted"
                raise
            finally:
                _note_retry_cost(attempts)
            attempt.ended_at, attempt.outcome = time.time(), "succeeded"
            return RunResult(records=_records(results, attempts), attempts=attempts, reports=reports.metrics)
        raise AssertionError("unreachable: the last attempt returns or raises")


def driver_store_folder(spark: SparkSession | None) -> Path:
    """A new folder for the driver's checkpoints: under Spark's local dir (``SPARK_LOCAL_DIRS``, else
    ``spark.local.dir``), else the temp dir."""
    configured = os.environ.get(LOCAL_DIRS_ENV) or (cluster.spark_conf(spark, LOCAL_DIR_CONF) if spark else None)
    for root in (configured.split(",")[0].strip() if configured else None, tempfile.gettempdir()):
        if not root:
            continue
        try:
            Path(root).mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix=DRIVER_STORE_PREFIX, dir=root))
        except OSError as error:
            logger.warning("cannot keep checkpoints in %s (%s); trying the temp dir", root, error.strerror or error)
    raise LaunchError(f"cannot create a folder for the run's checkpoints in {tempfile.gettempdir()}; "
                      f"set {LOCAL_DIRS_ENV} to a writable folder, or pass checkpoint_dir=")


def _records(results: list[tuple[RankRecord, bytes]], attempts: list[Attempt]) -> list[RankRecord]:
    records = []
    for record, value_bytes in results:
        record.value = cloudpickle.loads(value_bytes) if value_bytes else None
        record.timings["run_started_at"] = attempts[0].started_at
        record.timings["attempt_started_at"] = attempts[-1].started_at
        records.append(record)
    return records


def _note_retry_cost(attempts: list[Attempt]) -> None:
    """What the last retry cost: the previous attempt's failure to this one's first training step."""
    if len(attempts) < 2:
        return
    previous, current = attempts[-2], attempts[-1]
    if previous.ended_at is not None and current.first_step_at is not None:
        current.seconds_from_failure_to_first_step = current.first_step_at - previous.ended_at


def failure_signature(error: LaunchError, resumed_from_epoch: Any) -> tuple[Any, ...]:
    """What makes two failures "the same": the same rank failing the same way at the same point."""
    if isinstance(error, RankFailedError):
        failure = error.error
        return ("failed", resumed_from_epoch, error.rank, failure.kind, failure.error_type, failure.message,
                failure.exit_code, failure.steps, failure.progress)
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
