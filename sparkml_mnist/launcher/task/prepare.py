"""The one path that prepares a rank, shared by barrier tasks and driver processes.

The driver fills one ``RankSettings`` per run; whoever starts rank ``r`` (its barrier task, or the
driver for ``np < 0``) calls ``prepare_rank`` with what only it knows (every rank's host and port,
this rank's GPUs, its partition) and gets the spec and environment for ``RankProcess``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa

from sparkml_mnist.launcher.backends import driver_backend
from sparkml_mnist.launcher.channel import ChannelClient, rank_token
from sparkml_mnist.launcher.task.process import child_environment
from sparkml_mnist.launcher.spec import PARTITION_FILE, RankSpec, local_ranks


@dataclass(frozen=True)
class RankSettings:
    """Everything a rank's starter needs from the driver (pickled into the barrier task's closure)."""

    size: int
    backend: str
    payload: bytes  # the pickled (function, kwargs)
    has_data: bool  # the run was given a DataFrame: each rank gets its partition as an Arrow file
    keep_all_values: bool  # run_all(): every rank's return value comes back, not only rank 0's
    driver_host: str
    driver_port: int
    secret: str  # the run's channel secret: only the run's tasks receive it
    attempt: int
    threads: int | None
    heartbeat_interval_s: float
    collective_timeout_s: float | None
    driver_loss_timeout_s: float
    forward_output: bool  # the ranks' stdout/stderr lines go to the driver (driver_log_verbosity="all")
    backend_options: dict[str, Any] = field(default_factory=dict)


def channel_client(settings: RankSettings, rank: int) -> ChannelClient:
    """The barrier task's own connection to the driver (for its rank's forwarded lines)."""
    return ChannelClient(settings.driver_host, settings.driver_port, rank, rank_token(settings.secret, rank))


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
    settings: RankSettings,
    rank: int,
    hosts: list[str],
    ports: list[int],
    gpus: list[str],
    workdir: Path,
    partition: Iterable[pa.RecordBatch] | None,
) -> tuple[RankSpec, dict[str, str]]:
    """Write the rank's partition into ``workdir``; return its spec and its process's environment."""
    if settings.has_data and partition is not None:
        write_partition(partition, workdir / PARTITION_FILE)
    local_rank, local_size = local_ranks(hosts, rank)
    spec = RankSpec(
        rank=rank, size=settings.size, local_rank=local_rank, local_size=local_size, host=hosts[rank],
        addresses=[f"{host}:{port}" for host, port in zip(hosts, ports)],
        backend=settings.backend, driver_host=settings.driver_host, driver_port=settings.driver_port,
        channel_token=rank_token(settings.secret, rank), attempt=settings.attempt,
        driver_loss_timeout_s=settings.driver_loss_timeout_s,
        heartbeat_interval_s=settings.heartbeat_interval_s, collective_timeout_s=settings.collective_timeout_s,
        keep_value=settings.keep_all_values or rank == 0, gpus=list(gpus), threads=settings.threads,
        backend_options=settings.backend_options,
    )
    return spec, child_environment(spec, driver_backend(settings.backend).environment(spec))
