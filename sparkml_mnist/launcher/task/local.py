"""np < 0: ``-np`` training processes on the driver alone, for a quick check (no executors).

The same rank set-up, child processes, channel and watchdog as the barrier path; the driver plays
the barrier tasks' part: it chooses the ports, hands each rank its partition of the run's DataFrame,
and lets the processes exit only when all of them finished.
"""

from __future__ import annotations

import contextlib
import select
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from sparkml_mnist.launcher.channel import clean_line
from sparkml_mnist.launcher.driver.events import rank_line
from sparkml_mnist.launcher.driver.watchdog import Watchdog
from sparkml_mnist.launcher.failures import RankFailedError, RankRecord, RankStalledError
from sparkml_mnist.launcher.placement import RankDevices
from sparkml_mnist.launcher.spec import PARTITION_FILE, LaunchSpec
from sparkml_mnist.launcher.task.prepare import prepare_rank, write_partition
from sparkml_mnist.launcher.task.process import RankOutcome, RankProcess, free_port, rank_workdir

LOOPBACK = "127.0.0.1"
POLL_S = 0.2
PARTITION_ID_COLUMN = "__sparkml_mnist_partition"


def collect_partitions(frame: DataFrame, size: int) -> list[pa.Table]:
    """Partition ``r`` of ``frame`` as rank ``r``'s table, each in Spark's row order (one collect)."""
    table = frame.withColumn(PARTITION_ID_COLUMN, F.spark_partition_id()).toArrow()
    ids = table.column(PARTITION_ID_COLUMN)
    table = table.drop_columns([PARTITION_ID_COLUMN])
    return [table.filter(pc.equal(ids, rank)) for rank in range(size)]


def run_local(
    launch: LaunchSpec,
    payload: bytes,
    partitions: list[pa.Table] | None,
    devices: RankDevices,
    monitor: Watchdog,
) -> list[tuple[RankRecord, bytes]]:
    """Run every rank on this machine; raises RankFailedError or RankStalledError like the barrier path."""
    size = launch.size
    with contextlib.ExitStack() as stack:
        hosts = [LOOPBACK] * size
        ports = [free_port() for _ in range(size)]
        processes = []
        for rank in range(size):
            workdir = stack.enter_context(rank_workdir(rank))
            if partitions is not None:
                write_partition(partitions[rank].to_batches(), workdir / PARTITION_FILE)
            gpus = list(devices.driver_gpus[rank]) if devices.driver_gpus else []
            rows = [partition.num_rows for partition in partitions] if partitions is not None else None
            spec, env = prepare_rank(launch, rank, hosts, ports, gpus, rows)
            sink = _forward(rank) if launch.forward_output else _keep_nothing
            processes.append(stack.enter_context(RankProcess(spec, payload, env, sink, workdir)))
        for process in processes:
            process.start()

        outcomes: dict[int, RankOutcome] = {}
        while len(outcomes) < size:
            waiting = [p for p in processes if p.spec.rank not in outcomes]
            select.select([p.status_fd for p in waiting], [], [], POLL_S)
            for process in waiting:
                outcome = process.finished(0)
                if outcome is None:
                    continue
                error = outcome.record.error
                if error is not None:  # leaving the ExitStack kills the other ranks
                    raise RankFailedError(process.spec.rank, LOOPBACK, error)
                outcomes[process.spec.rank] = outcome
            verdict = monitor.check()
            if verdict is not None:
                raise RankStalledError(verdict.ranks, verdict.hosts, verdict.reason, verdict.limit_s, verdict.setting)
        for process in processes:  # all finished: the ranks may now exit together (jax leaves in step)
            process.let_go()
        for process in processes:
            process.release()
        return [(outcomes[rank].record, outcomes[rank].value_bytes) for rank in range(size)]


def _forward(rank: int) -> Callable[[str, str], None]:
    return lambda stream, line: rank_line(rank, stream, clean_line(line))


def _keep_nothing(stream: str, line: str) -> None:
    """driver_log_verbosity="log_callback_only": output lines are not shown (the crash tail keeps stderr)."""
