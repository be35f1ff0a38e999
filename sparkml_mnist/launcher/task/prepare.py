"""The one path that prepares a rank, shared by barrier tasks and driver processes.

Whoever starts rank ``r`` (its barrier task, or the driver for ``np < 0``) calls ``prepare_rank`` with
the attempt's ``LaunchSpec`` and what only it knows (every rank's host and port, this rank's GPUs, its
partition) and gets the rank's spec and environment for ``RankProcess``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pyarrow as pa

from sparkml_mnist.launcher.backends import driver_backend
from sparkml_mnist.launcher.channel import ChannelClient, rank_token
from sparkml_mnist.launcher.spec import PARTITION_FILE, LaunchSpec, RankSpec
from sparkml_mnist.launcher.task.process import child_environment


def channel_client(launch: LaunchSpec, rank: int) -> ChannelClient:
    """The barrier task's own connection to the driver (for its rank's forwarded lines)."""
    return ChannelClient(launch.driver_host, launch.driver_port, rank, rank_token(launch.secret, rank))


def write_partition(batches: Iterable[pa.RecordBatch], path: Path) -> int:
    """This rank's partition as an Arrow IPC file (memory-mapped by the rank); returns its row count.

    An empty partition still gets a file (with no columns if Spark sent no batch at all): what a rank
    does with too little data is the training side's decision, not the launcher's.
    """
    batches = list(batches)
    table = pa.Table.from_batches(batches) if batches else pa.table({})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return table.num_rows


def prepare_rank(
    launch: LaunchSpec,
    rank: int,
    hosts: list[str],
    ports: list[int],
    gpus: list[str],
    workdir: Path,
    partition: Iterable[pa.RecordBatch] | None,
) -> tuple[RankSpec, dict[str, str]]:
    """Write the rank's partition into ``workdir``; return its spec and its process's environment."""
    if launch.has_data and partition is not None:
        write_partition(partition, workdir / PARTITION_FILE)
    spec = launch.for_rank(rank, hosts, ports, gpus)
    return spec, child_environment(spec, driver_backend(launch.backend).environment(spec))
