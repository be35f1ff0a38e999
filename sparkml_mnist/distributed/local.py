"""np < 0: ``-np`` training processes on the driver alone, for a quick check (no executors).

The same child processes, channel and watchdog as the barrier path; the driver plays the
barrier tasks' part: it chooses the ports, hands each rank its shard (collected from the
hand-off frame), and lets the processes exit only when all of them finished.
"""

from __future__ import annotations

import contextlib
import select
import tempfile
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import functions as F

from sparkml_mnist.data.shards import SHARD_COLUMN, VALIDATION_COLUMN, ShardedFrame
from sparkml_mnist.distributed.backends import get_backend
from sparkml_mnist.distributed.channel import LogSink
from sparkml_mnist.distributed.monitor import ProgressMonitor
from sparkml_mnist.distributed.process import RankOutcome, RankProcess, child_environment, free_port
from sparkml_mnist.distributed.records import RankFailedError, RankRecord, RankStalledError
from sparkml_mnist.distributed.spec import SHARD_FILE, RankSpec

LOOPBACK = "127.0.0.1"
POLL_S = 0.2


def _write_shard(data: ShardedFrame, shard: int, path: Path) -> tuple[int, int]:
    table = data.frame.where(F.col(SHARD_COLUMN) == shard).toArrow()
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    validation = int(pc.sum(table.column(VALIDATION_COLUMN).cast(pa.int64())).as_py() or 0)
    return table.num_rows - validation, validation


def run_local(
    size: int,
    payload: bytes,
    backend: str,
    data: ShardedFrame | None,
    keep_all_values: bool,
    driver_port: int,
    monitor: ProgressMonitor,
    log_sink: LogSink,
    threads: int,
    gpus: list[str],
    heartbeat_interval_s: float,
    collective_timeout_s: float | None,
    backend_options: dict[str, Any],
) -> list[tuple[RankRecord, bytes]]:
    """Run every rank on this machine; raises RankFailedError or RankStalledError like the barrier path."""
    with contextlib.ExitStack() as stack:
        ports = [free_port() for _ in range(size)]
        workdirs = [Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"sparkml-mnist-rank{r}-")))
                    for r in range(size)]
        rows = [_write_shard(data, rank, workdirs[rank] / SHARD_FILE) for rank in range(size)] if data else []
        backend_impl = get_backend(backend)
        processes = []
        for rank in range(size):
            spec = RankSpec(
                rank=rank, size=size, local_rank=rank, local_size=size, host=LOOPBACK,
                addresses=[f"{LOOPBACK}:{port}" for port in ports],
                backend=backend, driver_host=LOOPBACK, driver_port=driver_port,
                min_train_rows=min(r[0] for r in rows) if rows else None,
                min_validation_rows=min(r[1] for r in rows) if rows else None,
                heartbeat_interval_s=heartbeat_interval_s, collective_timeout_s=collective_timeout_s,
                keep_value=keep_all_values or rank == 0,
                # One GPU each when there are enough; else all ranks on CPU.
                gpus=[gpus[rank]] if len(gpus) >= size else [],
                threads=threads, backend_options=backend_options,
            )
            env = child_environment(spec, backend_impl.environment(spec))
            process = stack.enter_context(RankProcess(spec, payload, env, _sink_for(log_sink, rank), workdirs[rank]))
            processes.append(process)
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
                raise RankStalledError(verdict.ranks, verdict.hosts, verdict.reason, monitor.timeout_s)
        for process in processes:  # all finished: the ranks may now exit together
            process.release()
        return [(outcomes[rank].record, outcomes[rank].value_bytes) for rank in range(size)]


def _sink_for(log_sink: LogSink, rank: int) -> Callable[[str, str], None]:
    return lambda stream, line: log_sink(rank, stream, line)
