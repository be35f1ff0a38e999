"""np > 0: one Spark barrier task per rank, through ``DataFrame.mapInArrow(..., barrier=True)``.

The DataFrame barrier API (rather than ``rdd.barrier()``) also runs over Spark Connect. Task
``s`` receives partition ``s`` of the run's DataFrame and streams it, batch by batch, into its rank's
file; it learns its peers' addresses and partition sizes from ``BarrierTaskContext`` and runs the rank
in a fresh child process; the ranks meet once more (``barrier()``) after training, before any of them
lets its process exit. Results come back as
rows: a JSON record per rank, and the pickled return value in chunks.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterator

import pyarrow as pa

from sparkml_mnist.errors import LaunchError
from sparkml_mnist.launcher.backends import driver_backend
from sparkml_mnist.launcher.failures import EXCEPTION, RankError, RankFailedError, RankRecord, failure_marker
from sparkml_mnist.launcher.protocol import TASK_STARTED
from sparkml_mnist.launcher.spec import PARTITION_FILE, LaunchSpec
from sparkml_mnist.launcher.task.prepare import channel_client, prepare_rank, write_partition
from sparkml_mnist.launcher.task.process import RankOutcome, RankProcess, free_port, rank_workdir

RESULT_SCHEMA = "rank int, kind string, seq int, chunk binary"
RECORD_ROW = "record"
VALUE_ROW = "value"
RESULT_CHUNK_BYTES = 1 << 20  # Arrow binary cells stay well below their 2 GiB limit
GPU_RESOURCE = "gpu"


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


def _rank_failure(rank: int, host: str, error: Exception) -> LaunchError:
    """A set-up error of this task, marked so the driver names the rank instead of showing Spark's noise."""
    problem = RankError(kind=EXCEPTION, error_type=type(error).__name__, message=str(error), traceback="")
    return LaunchError(f"{error}\n{failure_marker(rank, host, problem)}")


def _drain(batches: Iterator[pa.RecordBatch]) -> int:
    """Without data the stage runs over ``spark.range``: its placeholder row is read and dropped."""
    for _ in batches:
        pass
    return 0


def make_task(launch: LaunchSpec, payload: bytes) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The function each barrier task runs: set up the rank, run its process, send its record back."""

    def run_rank(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import BarrierTaskContext

        task = BarrierTaskContext.get()
        rank = task.partitionId()
        infos = task.getTaskInfos()
        # Spark gives each task's executor address; in local mode that is the machine's external one.
        hosts = [info.address.rsplit(":", 1)[0] for info in infos]
        if len(infos) != launch.size:
            raise _rank_failure(rank, hosts[rank], LaunchError(
                f"the run's DataFrame has {len(infos)} partitions but np={launch.size}: give it exactly one "
                f"partition per rank (df.repartition({launch.size}))"
            ))
        with rank_workdir(rank) as workdir:
            client = channel_client(launch, rank)
            client.send({"type": TASK_STARTED, "host": hosts[rank]})  # the watchdog: this task is alive
            try:
                # The partition streams to the rank's file first; then the tasks share ports and row counts.
                rows = write_partition(batches, workdir / PARTITION_FILE) if launch.has_data else _drain(batches)
                peers = [peer.split() for peer in task.allGather(f"{free_port()} {rows}")]
                ports, partition_rows = [int(port) for port, _ in peers], [int(count) for _, count in peers]
                try:
                    driver_backend(launch.backend).check_available(f"executor host {hosts[rank]}")
                except LaunchError as error:  # reaches the driver as this rank's failure
                    raise _rank_failure(rank, hosts[rank], error) from None
                gpu = task.resources().get(GPU_RESOURCE)
                gpus = list(gpu.addresses) if gpu is not None else []
                spec, env = prepare_rank(launch, rank, hosts, ports, gpus, partition_rows if launch.has_data else None)

                local_to_driver = client.local_to_driver()  # the executor's stderr is the driver's console

                def on_line(stream: str, line: str) -> None:
                    forwarded = launch.forward_output and not client.failed
                    if forwarded:
                        client.log(stream, line)
                    if not local_to_driver or (launch.forward_output and not forwarded):
                        sys.stderr.write(f"[rank {rank}] {line}\n")  # the executor's log keeps every line

                with RankProcess(spec, payload, env, on_line, workdir) as process:
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

    return run_rank
