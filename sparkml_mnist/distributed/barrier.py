"""np > 0: one Spark barrier task per rank, through ``DataFrame.mapInArrow(..., barrier=True)``.

The DataFrame barrier API (rather than ``rdd.barrier()``) also runs over Spark Connect. Task
``s`` receives partition ``s`` of the hand-off frame (its shard), learns its peers' addresses
from ``BarrierTaskContext``, and runs the rank in a fresh child process; the ranks meet once
more (``barrier()``) after training, before any of them lets its process exit. Results come
back as rows: a JSON record per rank, and the pickled return value in chunks.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from sparkml_mnist.data.shards import VALIDATION_COLUMN
from sparkml_mnist.distributed.backends import get_backend
from sparkml_mnist.distributed.channel import ChannelClient
from sparkml_mnist.distributed.process import RankOutcome, RankProcess, child_environment, free_port
from sparkml_mnist.distributed.records import EXCEPTION, RankError, RankFailedError, RankRecord, failure_marker
from sparkml_mnist.distributed.spec import SHARD_FILE, RankSpec, local_ranks
from sparkml_mnist.errors import DataError, LaunchError

RESULT_SCHEMA = "rank int, kind string, seq int, chunk binary"
RECORD_ROW = "record"
VALUE_ROW = "value"
RESULT_CHUNK_BYTES = 1 << 20  # Arrow binary cells stay well below their 2 GiB limit
GPU_RESOURCE = "gpu"


@dataclass(frozen=True)
class StageSettings:
    """Everything a barrier task needs from the driver (pickled into the task's closure)."""

    size: int
    backend: str
    payload: bytes
    has_data: bool
    keep_all_values: bool
    driver_host: str
    driver_port: int
    threads: int | None
    heartbeat_interval_s: float
    collective_timeout_s: float | None
    backend_options: dict[str, Any]


def write_shard(batches: Iterator[pa.RecordBatch], path: Path) -> tuple[int, int]:
    """Save this task's hand-off partition for the child; returns its (train, validation) row counts."""
    batches = list(batches)
    if not batches or sum(batch.num_rows for batch in batches) == 0:
        raise DataError("<shard>", "this rank's partition of the hand-off frame is empty",
                        hint="Pass the ShardedFrame made by shard_frame(data, np) for the same np")
    table = pa.Table.from_batches(batches)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    validation = int(pc.sum(table.column(VALIDATION_COLUMN).cast(pa.int64())).as_py() or 0)
    return table.num_rows - validation, validation


def result_batches(rank: int, outcome: RankOutcome, keep_value: bool) -> Iterator[pa.RecordBatch]:
    rows: list[tuple[str, bytes]] = [(RECORD_ROW, outcome.record.to_json().encode("utf-8"))]
    if keep_value:
        value = outcome.value_bytes
        rows += [(VALUE_ROW, value[i : i + RESULT_CHUNK_BYTES]) for i in range(0, len(value), RESULT_CHUNK_BYTES)]
    yield pa.RecordBatch.from_pydict({
        "rank": pa.array([rank] * len(rows), pa.int32()),
        "kind": pa.array([kind for kind, _ in rows], pa.string()),
        "seq": pa.array(list(range(len(rows))), pa.int32()),
        "chunk": pa.array([chunk for _, chunk in rows], pa.binary()),
    })


def assemble_results(rows: list[Any]) -> list[tuple[RankRecord, bytes]]:
    """Driver side: collected rows -> (record, pickled value) per rank, in rank order."""
    by_rank: dict[int, dict[str, list[tuple[int, bytes]]]] = {}
    for row in rows:
        by_rank.setdefault(row["rank"], {RECORD_ROW: [], VALUE_ROW: []})[row["kind"]].append((row["seq"], row["chunk"]))
    results = []
    for rank in sorted(by_rank):
        parts = by_rank[rank]
        record = RankRecord.from_json(parts[RECORD_ROW][0][1].decode("utf-8"))
        results.append((record, b"".join(bytes(chunk) for _, chunk in sorted(parts[VALUE_ROW]))))
    return results


def make_task(settings: StageSettings) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The function each barrier task runs: set up the rank, run its process, send its record back."""

    def run_rank(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import BarrierTaskContext

        task = BarrierTaskContext.get()
        rank = task.partitionId()
        if rank >= settings.size:
            raise LaunchError(f"barrier stage has more partitions than np={settings.size}")
        # Spark gives each task's executor address; in local mode that is the machine's external one.
        hosts = [info.address.rsplit(":", 1)[0] for info in task.getTaskInfos()]
        workdir = Path(tempfile.mkdtemp(prefix=f"sparkml-mnist-rank{rank}-"))
        client = ChannelClient(settings.driver_host, settings.driver_port)
        try:
            rows = (None, None)
            if settings.has_data:
                rows = write_shard(batches, workdir / SHARD_FILE)
            else:
                for _ in batches:  # the placeholder row of spark.range
                    pass
            mine = {"port": free_port(), "train_rows": rows[0], "validation_rows": rows[1]}
            peers = [json.loads(message) for message in task.allGather(json.dumps(mine))]
            local_rank, local_size = local_ranks(hosts, rank)
            backend = get_backend(settings.backend)
            try:
                backend.check_available(f"executor host {hosts[rank]}")
            except LaunchError as error:  # reaches the driver as this rank's failure, not Spark's noise
                problem = RankError(kind=EXCEPTION, error_type=type(error).__name__, message=str(error), traceback="")
                raise LaunchError(f"{error}\n{failure_marker(rank, hosts[rank], problem)}") from None
            gpu = task.resources().get(GPU_RESOURCE)
            spec = RankSpec(
                rank=rank, size=settings.size, local_rank=local_rank, local_size=local_size, host=hosts[rank],
                addresses=[f"{host}:{peer['port']}" for host, peer in zip(hosts, peers)],
                backend=settings.backend, driver_host=settings.driver_host, driver_port=settings.driver_port,
                min_train_rows=min(p["train_rows"] for p in peers) if settings.has_data else None,
                min_validation_rows=min(p["validation_rows"] for p in peers) if settings.has_data else None,
                heartbeat_interval_s=settings.heartbeat_interval_s,
                collective_timeout_s=settings.collective_timeout_s,
                keep_value=settings.keep_all_values or rank == 0,
                gpus=list(gpu.addresses) if gpu is not None else [],
                threads=settings.threads, backend_options=settings.backend_options,
            )
            env = child_environment(spec, backend.environment(spec))

            def on_line(stream: str, line: str) -> None:
                client.log(rank, stream, line)
                if client.failed or not client.local_to_driver:  # keep it in the executor's log too
                    sys.stderr.write(f"[rank {rank}] {line}\n")

            with RankProcess(spec, settings.payload, env, on_line, workdir) as process:
                process.start()
                outcome = process.finished()
                error = outcome.record.error
                if error is not None:
                    failure = RankFailedError(rank, spec.host, error)
                    raise LaunchError(f"{failure}\n{failure_marker(rank, spec.host, error)}")
                task.barrier()  # every rank finished training: now each may let its process exit
                process.release()
            yield from result_batches(rank, outcome, spec.keep_value)
        finally:
            client.close()
            shutil.rmtree(workdir, ignore_errors=True)

    return run_rank
