"""One attempt of a run: the driver's channel, the backend's session, the watchdog, and the ranks.

A run is one or more attempts (``runner.HorovodRunner`` retries a failed one). Every attempt has its
own channel server (a fresh secret and port, bound to the address the ranks use to reach the driver),
its own backend session, its own watchdog, armed at launch, and its own receiver of the ranks' reports
and fetches (closed when it ends: nothing of it completes in the next attempt); what survives between
attempts is what the ranks reported (``RunReports``: metrics and the checkpoint store).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from pyspark.sql import DataFrame, SparkSession

from sparkml_mnist.errors import LaunchError
from sparkml_mnist.launcher.backends import driver_backend
from sparkml_mnist.launcher.channel import ChannelServer
from sparkml_mnist.launcher.driver import cluster
from sparkml_mnist.launcher.driver.board import LiveBoard
from sparkml_mnist.launcher.driver.events import AttemptEvents
from sparkml_mnist.launcher.driver.reports import AttemptReceiver, RunReports
from sparkml_mnist.launcher.driver.watchdog import Watchdog
from sparkml_mnist.launcher.failures import (
    CRASH, PreflightError, RankFailedError, RankRecord, RankStalledError, ReportRefusedError, find_failure, is_final,
)
from sparkml_mnist.launcher.placement import Placement, rank_devices
from sparkml_mnist.launcher.policy import FailurePolicy
from sparkml_mnist.launcher.spec import LaunchSpec
from sparkml_mnist.launcher.task import barrier, local

DRIVER_HOST_CONF = "spark.driver.host"
DRIVER_BIND_CONF = "spark.driver.bindAddress"
SECRET_BYTES = 32
_SPARK_ERROR_LINES = 3


@dataclass
class Attempt:
    """What one attempt did: when, from which checkpoints, what ended it, how its ranks ran."""

    number: int
    started_at: float
    resumed_from: dict[str, int] = field(default_factory=dict)  # every key's checkpoint epoch at launch
    ended_at: float | None = None
    outcome: str = "running"  # "succeeded", "failed" or "interrupted"
    cause: str | None = None  # the first line of the failure
    first_step_at: float | None = None  # the earliest first training step of its ranks, when known
    seconds_from_failure_to_first_step: float | None = None  # the previous attempt's failure to this one's first step
    ranks: dict[str, Any] = field(default_factory=dict)  # per-rank step rates and the straggler, if any

    @property
    def resumed_from_epoch(self) -> int | None:
        """The run's own checkpoint (the default key) this attempt started from."""
        return self.resumed_from.get("")


@dataclass(frozen=True)
class AttemptLauncher:
    """Everything an attempt needs that does not change between attempts; ``run`` launches one."""

    placement: Placement
    spark: SparkSession | None
    data: DataFrame | None
    policy: FailurePolicy
    payload: bytes  # the pickled (function, kwargs)
    reports: RunReports
    keep_all_values: bool = False
    forward_output: bool = False

    def run(self, attempt: Attempt) -> list[tuple[RankRecord, bytes]]:
        """Launch every rank once; raise the rank's (or the watchdog's) ``LaunchError`` when the attempt fails."""
        placement, policy = self.placement, self.policy
        devices = rank_devices(placement, self.spark)
        connect_host, bind_host = driver_addresses(placement, self.spark)
        watchdog = Watchdog(placement.size, policy.progress_timeout_s, startup_timeout_s=policy.startup_limit_s)
        board = LiveBoard(placement.size)
        receiver = self.reports.attempt_receiver(placement.size, attempt.number)
        events = AttemptEvents(watchdog, board, receiver)
        secret = secrets.token_hex(SECRET_BYTES)
        try:
            server = ChannelServer(placement.size, secret, events.on_event, bind_host,
                                   idle_timeout_s=max(policy.progress_timeout_s, policy.startup_limit_s))
        except OSError as error:  # a setting to change, not something a retry fixes
            raise PreflightError(
                f"cannot listen for the ranks on {bind_host} ({error.strerror or error}); set {DRIVER_BIND_CONF} "
                f"to an address of this machine that the executors reach as {DRIVER_HOST_CONF}={connect_host}"
            ) from None
        stop_board = board.start()  # after the server: nothing may leave its thread drawing
        try:
            with server, driver_backend(placement.backend).driver_session(placement.size, bind_host, secret) as options:
                watchdog.driver_address = f"{connect_host}:{server.port}"
                launch = LaunchSpec(
                    size=placement.size, backend=placement.backend, policy=policy, driver_host=connect_host,
                    driver_port=server.port, attempt=attempt.number, has_data=self.data is not None,
                    keep_all_values=self.keep_all_values, forward_output=self.forward_output,
                    threads=devices.threads, pin_cores=devices.pin_cores, backend_options=options,
                    checkpoint_dir=self.reports.store.rank_location, secret=secret,
                )
                if placement.on_driver:
                    partitions = local.collect_partitions(self.data, placement.size) if self.data is not None else None
                    return local.run_local(launch, self.payload, partitions, devices, watchdog)
                return self._run_barrier(launch, watchdog, events)
        except LaunchError as error:
            final = _final_if_refused(error, receiver)
            if final is error:
                raise
            raise final from error
        finally:
            receiver.close()
            stop_board()
            attempt.first_step_at = events.first_step_at
            attempt.ranks = board.summary()

    def _run_barrier(self, launch: LaunchSpec, watchdog: Watchdog,
                     events: AttemptEvents) -> list[tuple[RankRecord, bytes]]:
        spark = self.spark
        assert spark is not None  # the runner refuses np > 0 without a session
        cluster.check_barrier_run(spark, launch.size, self.policy.executor_wait_s)
        frame = self.data if self.data is not None else spark.range(0, launch.size, 1, launch.size)
        group = f"sparkml-mnist-{uuid.uuid4().hex}"
        # The watchdog ends a stalled attempt by cancelling its job: Spark then kills every task.
        with _cancellable(spark, group) as cancel:
            stop_watching = watchdog.watch(lambda verdict: cancel())
            try:
                task = barrier.make_task(launch, self.payload)
                rows = frame.mapInArrow(task, barrier.RESULT_SCHEMA, barrier=True).collect()
            except Exception as error:
                interrupt = _interrupt_behind(error)
                if interrupt is not None:  # pyspark's clean-up call failed while Ctrl-C/SIGTERM unwound collect()
                    with contextlib.suppress(Exception):
                        cancel()
                    raise interrupt from None
                raise _translate(error, watchdog, events.first_failure) from None
            except BaseException:  # Ctrl-C, SIGTERM: stop the ranks before leaving
                with contextlib.suppress(Exception):  # the interrupt, not a failed cancel, is what must leave
                    cancel()
                raise
            finally:
                stop_watching()
        return barrier.assemble_results(rows)


def driver_addresses(placement: Placement, spark: SparkSession | None) -> tuple[str, str]:
    """(the address ranks connect to, the address the channel binds): never every interface.

    Ranks on this machine (np < 0, or a local master's tasks) reach it on loopback, so nothing else
    may. On a cluster a wildcard ``spark.driver.bindAddress`` (0.0.0.0, ::, empty: right for Spark's
    own servers in a container) would open the channel to every network: the host's address instead.
    """
    if placement.on_driver or spark is None or cluster.is_local_master(spark):
        return local.LOOPBACK, local.LOOPBACK
    host = cluster.spark_conf(spark, DRIVER_HOST_CONF) or socket.gethostname()
    given = cluster.spark_conf(spark, DRIVER_BIND_CONF)
    if given is not None and not cluster.means_every_interface(given):
        return host, given
    try:
        bind = socket.gethostbyname(host)
    except OSError as error:
        raise LaunchError(
            f"cannot resolve {DRIVER_HOST_CONF}={host!r} ({error}); set {DRIVER_BIND_CONF} to the driver's "
            "address the executors reach"
        ) from None
    if given is not None:
        logging.getLogger(__name__).warning(
            "%s=%r means every interface; the ranks' channel listens on %s (the address of %s=%s) instead",
            DRIVER_BIND_CONF, given, bind, DRIVER_HOST_CONF, host,
        )
    return host, bind


_JOB_PROPERTIES = ("spark.jobGroup.id", "spark.job.description", "spark.job.interruptOnCancel")


@contextlib.contextmanager
def _cancellable(spark: SparkSession, group: str) -> Iterator[Callable[[], None]]:
    """Jobs started in this block (on this thread) can be cancelled from another thread.

    Classic Spark: a job group with interruptOnCancel (cancels within a fraction of a second);
    the thread's previous job properties are restored afterwards. Spark Connect has no
    SparkContext: an operation tag instead.
    """
    try:
        sc = spark.sparkContext
    except Exception:
        sc = None
    if sc is None:
        spark.addTag(group)
        try:
            yield lambda: spark.interruptTag(group) and None
        finally:
            spark.removeTag(group)
        return
    saved = {key: sc.getLocalProperty(key) for key in _JOB_PROPERTIES}
    sc.setJobGroup(group, "sparkml_mnist distributed training", interruptOnCancel=True)
    try:
        yield lambda: sc.cancelJobGroup(group)
    finally:
        for key, value in saved.items():
            sc.setLocalProperty(key, value)  # type: ignore[arg-type] - None removes the property


def _interrupt_behind(error: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C/SIGTERM an error was raised while handling, if any.

    py4j re-raises a KeyboardInterrupt that lands in a call to the JVM, after shutting that call's
    connection down; a pyspark clean-up call on the way out (e.g. ``SCCallSiteSync.__exit__``) then
    fails with a Py4JError that replaces it. Taken for a rank failure, that would start a retry.
    """
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return cause
        seen.add(id(cause))
        cause = cause.__context__
    return None


def _translate(error: Exception, monitor: Watchdog, first_failure: RankFailedError | None = None) -> LaunchError:
    """Spark's stage failure -> the rank's own error (or the watchdog's), without Py4J's wall of text.

    When a rank reported its exception over the channel, the first to do so is named: Spark reports
    whichever task's failure it handled first, often a rank that failed only because that one left.
    A crashed rank cannot report: when Spark's failure is a crash, it is the cause.
    """
    verdict = monitor.verdict
    if verdict is not None:
        failure: LaunchError = RankStalledError(verdict.ranks, verdict.hosts, verdict.reason, verdict.limit_s,
                                                verdict.setting)
    else:
        reported = find_failure(str(error))
        if first_failure is not None and (reported is None or reported.error.kind != CRASH):
            reported = first_failure
        failure = reported or LaunchError(
            "the barrier stage failed before any rank reported: "
            + " ".join(str(error).strip().splitlines()[:_SPARK_ERROR_LINES])
        )
    failure.spark_error = error  # type: ignore[attr-defined] - kept for debugging, not shown
    return failure


def _final_if_refused(error: LaunchError, receiver: AttemptReceiver) -> LaunchError:
    """The attempt's failure, final when the driver refused a rank something no retry changes (its disk
    failed, a cap): the rank's own ``REFUSED`` failure as it is, else the driver's reason (a function may
    have caught the rank-side error and failed otherwise)."""
    if receiver.refusal is None or is_final(error):
        return error
    return ReportRefusedError(f"{receiver.refusal} (the attempt then failed: {(str(error).splitlines() or [type(error).__name__])[0]})")
