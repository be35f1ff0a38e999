"""The one path that prepares a rank, shared by barrier tasks and driver processes.

Whoever starts rank ``r`` (its barrier task, or the driver for ``np < 0``) streams the rank's partition
into its work folder (``write_partition``), then calls ``prepare_rank`` with the attempt's ``LaunchSpec``
and what only it knows (every rank's host, port and partition size, this rank's GPUs) and gets the
rank's spec and environment for ``RankProcess``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pyarrow as pa

from sparkml_mnist.launcher.backends import driver_backend
from sparkml_mnist.launcher.channel import ChannelClient, rank_token
from sparkml_mnist.launcher.spec import LaunchSpec, RankSpec
from sparkml_mnist.launcher.task.process import child_environment


def channel_client(launch: LaunchSpec, rank: int) -> ChannelClient:
    """The barrier task's own connection to the driver (for its rank's forwarded lines)."""
    return ChannelClient(launch.driver_host, launch.driver_port, rank, rank_token(launch.secret, rank))


def write_partition(batches: Iterable[pa.RecordBatch], path: Path) -> int:
    """Stream this rank's partition into an Arrow IPC file (memory-mapped by the rank); returns its rows.

    Each batch is written as it arrives from Spark and then dropped: the task never holds more than one
    batch, however large the partition. An empty partition still gets a file (with no columns if Spark
    sent no batch at all): what a rank does with too little data is the training side's decision.
    """
    rows = 0
    with pa.OSFile(str(path), "wb") as sink:
        writer: pa.ipc.RecordBatchFileWriter | None = None
        try:
            for batch in batches:
                if writer is None:
                    writer = pa.ipc.new_file(sink, batch.schema)
                writer.write_batch(batch)
                rows += batch.num_rows
            if writer is None:
                writer = pa.ipc.new_file(sink, pa.schema([]))
        finally:
            if writer is not None:
                writer.close()
    return rows


def prepare_rank(
    launch: LaunchSpec,
    rank: int,
    hosts: list[str],
    ports: list[int],
    gpus: list[str],
    partition_rows: list[int] | None = None,
) -> tuple[RankSpec, dict[str, str]]:
    """The rank's spec and its process's environment (its partition is already in its work folder)."""
    spec = launch.for_rank(rank, hosts, ports, gpus, partition_rows)
    return spec, child_environment(spec, driver_backend(launch.backend).environment(spec))
