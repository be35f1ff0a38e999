"""One attempt of a run: the driver's channel, the backend's session, the watchdog, and the ranks.

A run is one or more attempts (``runner.HorovodRunner`` retries a failed one). Every attempt has its
own channel server (a fresh secret and port, bound to the address the ranks use to reach the driver),
its own backend session and its own watchdog, armed at launch; what survives between attempts is the
checkpoint store.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from pyspark.sql import DataFrame, SparkSession

from sparkml_mnist.launcher.task import barrier

from sparkml_mnist.launcher.task import local

from sparkml_mnist.launcher.driver import cluster as resources
from sparkml_mnist.launcher.backends import driver_backend
from sparkml_mnist.launcher.channel import ChannelServer, Event, LogSink, clean_line
from sparkml_mnist.launcher.driver.store import GET, PUT, RESULT, RESULT_STORED, CheckpointReceiver, valid_key
from sparkml_mnist.launcher.driver.watchdog import ProgressMonitor
from sparkml_mnist.launcher.placement import Placement, rank_devices
from sparkml_mnist.launcher.driver.board import DEFAULT_INTERVAL_S, ProgressBoard
from sparkml_mnist.launcher.task.prepare import RankSettings
from sparkml_mnist.launcher.failures import (
    CRASH, RANK_FAILED, PreflightError, RankFailedError, RankRecord, RankStalledError, failure_from_event, find_failure,
)
from sparkml_mnist.errors import LaunchError

DRIVER_HOST_CONF = "spark.driver.host"
DRIVER_BIND_CONF = "spark.driver.bindAddress"
STREAMS = ("stdout", "stderr", "log")
SECRET_BYTES = 32
_SPARK_ERROR_LINES = 3


@dataclass(frozen=True)
class LaunchOptions:
    """The runner's settings that every attempt uses."""

    progress_timeout_s: float
    startup_timeout_s: float
    collective_timeout_s: float | None
    heartbeat_interval_s: float
    forward_output: bool
    executor_wait_s: float
    title: str = ""  # what the live progress lines call the run (the job: the variant's name)
    progress_interval_s: float = DEFAULT_INTERVAL_S


@dataclass
class AttemptRecord:
    """What one attempt did: when, from which checkpoint, and what ended it."""

    number: int
    started_at: float
    resumed_from_epoch: int | None  # the run's checkpoint (the default key) it started from
    resumed_from: dict[str, int] = field(default_factory=dict)  # every key's checkpoint epoch at launch
    ended_at: float | None = None
    outcome: str = "running"  # "succeeded" or "failed"
    cause: str | None = None  # the first line of the failure
    first_step_at: float | None = None  # the earliest first training step of its ranks, when known
    progress: dict[str, Any] | None = None  # per-rank step rates and the straggler, if any


class AttemptEvents:
    """The driver's side of the channel for one attempt: heartbeats to the watchdog, lines to the sink,
    checkpoints to the store."""

    def __init__(self, monitor: ProgressMonitor, log_sink: LogSink | None, receiver: CheckpointReceiver,
                 board: ProgressBoard, results: dict[str, dict[int, Any]] | None = None) -> None:
        self.monitor = monitor
        self.log_sink = log_sink
        self.receiver = receiver
        self.board = board
        self.results = results if results is not None else {}
        self.first_step_at: float | None = None
        self.first_failure: RankFailedError | None = None  # the first rank to report its own exception

    def on_event(self, rank: int, event: Event) -> Event | list[Event] | None:
        kind = event["type"]
        if kind == "heartbeat":
            progress = event.get("progress")
            if isinstance(progress, int) and not isinstance(progress, bool):
                self.monitor.heartbeat(rank, progress, event.get("done") is True, _text(event.get("host")))
            self.board.update(rank, {**event, "host": _text(event.get("host"))})
            first = event.get("first_step_at")
            if isinstance(first, (int, float)) and (self.first_step_at is None or first < self.first_step_at):
                self.first_step_at = float(first)
        elif kind == "task_started":
            self.monitor.task_started(rank, _text(event.get("host")))
        elif kind == "log" and self.log_sink is not None and event.get("stream") in STREAMS:
            self.log_sink(rank, event["stream"], clean_line(str(event.get("line", ""))))
        elif kind == PUT:
            return self.receiver.handle(rank, event)
        elif kind == GET:
            return self.receiver.replies(event)
        elif kind == RANK_FAILED and self.first_failure is None:
            self.first_failure = failure_from_event(rank, event)
        elif kind == RESULT and valid_key(event.get("key")) and isinstance(event.get("data"), dict):
            self.results.setdefault(event["key"], {})[rank] = event["data"]
            return {"type": RESULT_STORED}
        return None


def _text(value: Any) -> str | None:
    return clean_line(value)[:255] if isinstance(value, str) else None


def driver_addresses(placement: Placement, spark: SparkSession | None) -> tuple[str, str]:
    """(the address ranks connect to, the address the channel binds): never every interface."""
    if placement.on_driver or spark is None:
        return local.LOOPBACK, local.LOOPBACK
    host = resources.spark_conf(spark, DRIVER_HOST_CONF) or socket.gethostname()
    bind = resources.spark_conf(spark, DRIVER_BIND_CONF)
    if not bind:
        try:
            bind = socket.gethostbyname(host)
        except OSError as error:
            raise LaunchError(
                f"cannot resolve {DRIVER_HOST_CONF}={host!r} ({error}); set {DRIVER_BIND_CONF} to the driver's "
                "address the executors reach"
            ) from None
    return host, bind


def run_attempt(
    number: int, placement: Placement, spark: SparkSession | None, data: DataFrame | None, options: LaunchOptions,
    payload: bytes, keep_all_values: bool, log_sink: LogSink | None, receiver: CheckpointReceiver,
    record: AttemptRecord, results: dict[str, dict[int, Any]] | None = None,
) -> list[tuple[RankRecord, bytes]]:
    """Launch every rank once; raise the rank's (or the watchdog's) ``LaunchError`` when the attempt fails."""
    devices = rank_devices(placement, spark)
    connect_host, bind_host = driver_addresses(placement, spark)
    monitor = ProgressMonitor(placement.size, options.progress_timeout_s, startup_timeout_s=options.startup_timeout_s)
    board = ProgressBoard(placement.size, title=options.title, interval_s=options.progress_interval_s)
    events = AttemptEvents(monitor, log_sink, receiver, board, results)
    secret = secrets.token_hex(SECRET_BYTES)
    try:
        server = ChannelServer(placement.size, secret, events.on_event, bind_host,
                               idle_timeout_s=max(options.progress_timeout_s, options.startup_timeout_s))
    except OSError as error:  # a setting to change, not something a retry fixes
        raise PreflightError(
            f"cannot listen for the ranks on {bind_host} ({error.strerror or error}); set {DRIVER_BIND_CONF} "
            f"to an address of this machine that the executors reach as {DRIVER_HOST_CONF}={connect_host}"
        ) from None
    stop_board = board.start()  # after the server: nothing may leave its thread drawing
    try:
        with server, driver_backend(placement.backend).driver_session(placement.size, bind_host) as backend_options:
            monitor.driver_address = f"{connect_host}:{server.port}"
            settings = RankSettings(
                size=placement.size, backend=placement.backend, payload=payload, has_data=data is not None,
                keep_all_values=keep_all_values, driver_host=connect_host, driver_port=server.port, secret=secret,
                attempt=number, threads=devices.threads, heartbeat_interval_s=options.heartbeat_interval_s,
                collective_timeout_s=options.collective_timeout_s,
                driver_loss_timeout_s=options.progress_timeout_s, forward_output=options.forward_output,
                backend_options=backend_options,
            )
            if placement.on_driver:
                partitions = local.collect_partitions(data, placement.size) if data is not None else None
                return local.run_local(settings, partitions, devices, monitor, log_sink or _drop)
            return _run_barrier(spark, data, settings, monitor, events, options)  # type: ignore[arg-type]
    finally:
        stop_board()
        record.first_step_at = events.first_step_at
        record.progress = board.summary()


def _run_barrier(
    spark: SparkSession, data: DataFrame | None, settings: RankSettings, monitor: ProgressMonitor,
    events: AttemptEvents, options: LaunchOptions,
) -> list[tuple[RankRecord, bytes]]:
    resources.check_barrier_run(spark, settings.size, options.executor_wait_s)
    frame = data if data is not None else spark.range(0, settings.size, 1, settings.size)
    group = f"sparkml-mnist-{uuid.uuid4().hex}"
    # The watchdog ends a stalled attempt by cancelling its job: Spark then kills every task.
    with _cancellable(spark, group) as cancel:
        stop_watching = monitor.watch(lambda verdict: cancel())
        try:
            rows = frame.mapInArrow(barrier.make_task(settings), barrier.RESULT_SCHEMA, barrier=True).collect()
        except Exception as error:
            interrupt = _interrupt_behind(error)
            if interrupt is not None:  # pyspark's clean-up call failed while Ctrl-C/SIGTERM unwound collect()
                with contextlib.suppress(Exception):
                    cancel()
                raise interrupt from None
            raise _translate(error, monitor, events.first_failure) from None
        except BaseException:  # Ctrl-C, SIGTERM: stop the ranks before leaving
            with contextlib.suppress(Exception):  # the interrupt, not a failed cancel, is what must leave
                cancel()
            raise
        finally:
            stop_watching()
    return barrier.assemble_results(rows)


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


def _translate(error: Exception, monitor: ProgressMonitor, first_failure: RankFailedError | None = None) -> LaunchError:
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


def _drop(rank: int, stream: str, line: str) -> None:
    """A log sink that discards lines (``log_sink=None``)."""

