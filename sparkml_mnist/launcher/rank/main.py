"""Entry point of one rank's training process: ``python -m sparkml_mnist.launcher.rank.main WORKDIR``.

A fresh process per rank and run, because TensorFlow's collective runtime cannot be set up
twice in one process (a reused Spark Python worker hangs on the second run). The process is
tied to its parent with ``PR_SET_PDEATHSIG``, so it dies with the Spark task that started it.
It keeps its imports light until the user function runs: TensorFlow is imported only by the
function (or the context's strategy), after the parent put the backend's variables and
TF_USE_LEGACY_KERAS in this process's environment.

Protocol with the parent: when the function returned or raised, write ``record.json`` (and
``value.pkl``), write one byte to the status pipe, then wait until the parent closes stdin (all
ranks finished: nobody leaves while others still drain collectives) and exit.

Heartbeats go over a connection of their own: a report waiting for the driver's answer (a checkpoint
being written on the driver) holds the function's connection, never the heartbeats, so the watchdog
keeps hearing from the rank. That connection is also the one that notices a lost driver.
"""

from __future__ import annotations

import ctypes
import inspect
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

PARENT_PID_ENV = "SPARKML_MNIST_PARENT_PID"
STATUS_FD_ENV = "SPARKML_MNIST_STATUS_FD"
RANK_CORES_ENV = "SPARKML_MNIST_RANK_CORES"  # "0,1": the cores this rank keeps to (task.process.rank_cores)
_PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
_LIBC = "libc.so.6"
DONE_BYTE = b"1"


def die_with_parent(expected_parent: int | None) -> None:
    """Ask Linux to SIGKILL this process when its parent dies; exit now if it already has."""
    try:
        ctypes.CDLL(_LIBC, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the parent still kills this process on its way out
        pass
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)


def keep_to_cores(cores: str | None) -> None:
    """Pin this process to ``cores`` ("0,1") before any thread starts: TensorFlow's and gRPC's inherit it.

    A speed-up only: a value the machine refuses (a cpuset that changed) leaves one line and the scheduler.
    """
    if not cores:
        return
    try:
        os.sched_setaffinity(0, {int(core) for core in cores.split(",")})
    except (ValueError, OSError) as error:
        sys.stderr.write(f"{RANK_CORES_ENV}={cores!r} not applied ({error}); the scheduler places this rank\n")


def _heartbeats(client: Any, context: Any, interval_s: float, finished: threading.Event) -> None:
    """Beat every ``interval_s`` with the rank's counters; a last beat says done."""
    while True:
        done = finished.is_set()
        client.send(context.heartbeat_message(done))
        if done:
            return
        finished.wait(interval_s)


def _abort(workdir: Path, record: Any, reason: str) -> None:
    """The driver is gone for good: report why (the task tells Spark) and leave now, wherever training is."""
    from sparkml_mnist.launcher.failures import EXCEPTION, RankError
    from sparkml_mnist.launcher.spec import RECORD_FILE, VALUE_FILE

    record.error = RankError(kind=EXCEPTION, error_type="DriverLost", message=f"rank {record.rank}: {reason}")
    record.ended_at = time.time()
    try:
        (workdir / VALUE_FILE).write_bytes(b"")
        (workdir / RECORD_FILE).write_text(record.to_json())
        os.write(int(os.environ[STATUS_FD_ENV]), DONE_BYTE)
    finally:
        os._exit(1)


def main(workdir: Path) -> None:
    parent = os.environ.get(PARENT_PID_ENV)
    die_with_parent(int(parent) if parent else None)
    keep_to_cores(os.environ.get(RANK_CORES_ENV))
    started_at = time.time()

    from sparkml_mnist.launcher import keras_flavour  # sets TF_USE_LEGACY_KERAS before anything imports TF
    from sparkml_mnist.launcher.rank import context as context_module
    from sparkml_mnist.launcher.channel import ChannelClient
    from sparkml_mnist.launcher.failures import RankError, RankRecord, error_kind, failure_event
    from sparkml_mnist.launcher.protocol import Heartbeat
    from sparkml_mnist.launcher.spec import PARTITION_FILE, PAYLOAD_FILE, RECORD_FILE, VALUE_FILE, RankSpec

    spec = RankSpec.read(workdir)
    record = RankRecord(rank=spec.rank, host=spec.host, pid=os.getpid(), started_at=started_at)
    client = ChannelClient(spec.launch.driver_host, spec.launch.driver_port, spec.rank, spec.channel_token)
    beats = ChannelClient(  # its own connection: never waits behind a request of the function's
        spec.launch.driver_host, spec.launch.driver_port, spec.rank, spec.channel_token,
        give_up_after_s=spec.policy.driver_loss_timeout_s, on_lost=lambda reason: _abort(workdir, record, reason),
    )
    partition = workdir / PARTITION_FILE
    context = context_module.RankContext(
        spec=spec, partition_file=partition if partition.exists() else None, channel=client,
        heartbeat=Heartbeat(host=spec.host, pid=os.getpid()),
    )
    context_module.set_context(context)
    finished = threading.Event()
    threading.Thread(
        target=_heartbeats, args=(beats, context, spec.policy.heartbeat_interval_s, finished), daemon=True
    ).start()

    value_bytes = b""
    try:
        from pyspark import cloudpickle

        function, kwargs = cloudpickle.loads((workdir / PAYLOAD_FILE).read_bytes())
        if wants_context(function, kwargs):
            kwargs = {**kwargs, context_module.CONTEXT_PARAMETER: context}
        context.backend.start()  # e.g. Keras's distribution under jax, before the user's code
        value = function(**kwargs)
        value_bytes = cloudpickle.dumps(value) if spec.keep_value else cloudpickle.dumps(None)
    except BaseException as error:  # noqa: BLE001 - every failure must reach the driver with its traceback
        record.error = RankError(  # REFUSED (not retried) when the driver refused what no retry changes
            kind=error_kind(error), error_type=type(error).__name__, message=str(error), traceback=traceback.format_exc(),
            steps=context.heartbeat.steps, progress=context.heartbeat.progress,
        )
        client.send(failure_event(spec.host, record.error))  # before the other ranks see this one go
    record.ended_at = time.time()
    record.steps = context.heartbeat.steps
    record.examples_seen = context.heartbeat.examples
    record.timings = {"process_started_at": started_at}
    if keras_flavour.import_seconds() is not None:
        record.timings["tf_import_s"] = keras_flavour.import_seconds()
    if context.heartbeat.first_step_at is not None:
        record.timings["first_step_at"] = context.heartbeat.first_step_at

    (workdir / VALUE_FILE).write_bytes(value_bytes)
    (workdir / RECORD_FILE).write_text(record.to_json())
    sys.stdout.flush()
    sys.stderr.flush()
    finished.set()
    status_fd = int(os.environ[STATUS_FD_ENV])
    os.write(status_fd, DONE_BYTE)
    os.close(status_fd)
    sys.stdin.buffer.read()  # released by the parent (EOF) once every rank has finished
    if record.error is None:
        context.backend.shutdown()
    client.close()
    beats.close()
    # Skip interpreter teardown: TensorFlow's runtime threads can make a normal exit slow or hang.
    os._exit(0)


def wants_context(function: Callable[..., Any], kwargs: dict[str, Any]) -> bool:
    """Pass the context only to functions that declare a ``context`` parameter (HorovodRunner's do not)."""
    from sparkml_mnist.launcher.rank.context import CONTEXT_PARAMETER

    if CONTEXT_PARAMETER in kwargs:
        return False
    try:
        return CONTEXT_PARAMETER in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


if __name__ == "__main__":
    main(Path(sys.argv[1]))
