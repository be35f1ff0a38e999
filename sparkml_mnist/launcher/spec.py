"""The one launch contract: what the runner decides for a run (``LaunchSpec``), and the rank's view of it.

The driver makes one ``LaunchSpec`` per attempt; whoever starts rank ``r`` (its barrier task, or the
driver for ``np < 0``) adds only what it alone knows (every rank's address, this rank's GPUs) with
``for_rank``. The rank reads the result from its work folder as JSON, so it needs nothing from Spark.
The run's channel secret travels to the task side only: a rank gets its own token, never the secret.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sparkml_mnist.launcher.channel import rank_token
from sparkml_mnist.launcher.policy import FailurePolicy

SPEC_FILE = "spec.json"
PAYLOAD_FILE = "payload.pkl"  # the pickled (function, kwargs)
PARTITION_FILE = "partition.arrow"  # this rank's partition of the run's DataFrame, Arrow IPC
RECORD_FILE = "record.json"  # written by the rank when the function returned or raised
VALUE_FILE = "value.pkl"  # the function's pickled return value


@dataclass(frozen=True)
class LaunchSpec:
    """One attempt of a run, as every rank's starter receives it (pickled into the barrier task)."""

    size: int
    backend: str
    policy: FailurePolicy
    driver_host: str
    driver_port: int
    attempt: int = 1
    has_data: bool = False  # the run was given a DataFrame: each rank gets its partition as an Arrow file
    keep_all_values: bool = False  # run_all(): every rank's return value comes back, not only rank 0's
    forward_output: bool = False  # the ranks' stdout/stderr lines go to the driver (driver_log_verbosity="all")
    threads: int | None = None
    pin_cores: bool = False  # each CPU rank on ``threads`` cores of its own (placement.RankDevices.pin_cores)
    backend_options: dict[str, Any] = field(default_factory=dict)  # from the backend's driver session
    checkpoint_dir: str | None = None  # where rank 0 writes checkpoints and every rank reads them; None: the driver's
    secret: str = field(default="", repr=False)  # the run's channel secret; "" once it reached the task

    def for_rank(self, rank: int, hosts: list[str], ports: list[int], gpus: list[str],
                 partition_rows: list[int] | None = None) -> RankSpec:
        local_rank, local_size = local_ranks(hosts, rank)
        return RankSpec(
            launch=replace(self, secret=""), rank=rank, host=hosts[rank],
            addresses=[f"{host}:{port}" for host, port in zip(hosts, ports)],
            local_rank=local_rank, local_size=local_size, gpus=list(gpus),
            partition_rows=list(partition_rows) if partition_rows is not None else [],
            channel_token=rank_token(self.secret, rank),
        )


@dataclass(frozen=True)
class RankSpec:
    """One rank of an attempt: the launch, and who and where this rank is."""

    launch: LaunchSpec
    rank: int
    host: str
    addresses: list[str]  # "host:port" of every rank, in rank order (the backend's rendezvous)
    local_rank: int = 0
    local_size: int = 1
    gpus: list[str] = field(default_factory=list)
    partition_rows: list[int] = field(default_factory=list)  # every rank's partition size, in rank order
    channel_token: str = ""  # this rank's token for the driver's channel (channel.rank_token)

    @property
    def size(self) -> int:
        return self.launch.size

    @property
    def backend(self) -> str:
        return self.launch.backend

    @property
    def policy(self) -> FailurePolicy:
        return self.launch.policy

    @property
    def attempt(self) -> int:
        return self.launch.attempt

    @property
    def threads(self) -> int | None:
        return self.launch.threads

    @property
    def backend_options(self) -> dict[str, Any]:
        return self.launch.backend_options

    @property
    def keep_value(self) -> bool:
        """False: the return value is not needed (not rank 0, and run() rather than run_all())."""
        return self.launch.keep_all_values or self.rank == 0

    def write(self, workdir: Path) -> None:
        (workdir / SPEC_FILE).write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, workdir: Path) -> RankSpec:
        data = json.loads((workdir / SPEC_FILE).read_text())
        launch = data.pop("launch")
        launch["policy"] = FailurePolicy(**launch["policy"])
        return cls(launch=LaunchSpec(**launch), **data)


def local_ranks(hosts: list[str], rank: int) -> tuple[int, int]:
    """(local rank, local size): this rank's position among the ranks on its own host."""
    same_host = [other for other, host in enumerate(hosts) if host == hosts[rank]]
    return same_host.index(rank), len(same_host)
