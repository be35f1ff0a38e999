"""What a rank's training process is told by whoever starts it (a barrier task, or the driver)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SPEC_FILE = "spec.json"
PAYLOAD_FILE = "payload.pkl"  # the pickled (function, kwargs)
PARTITION_FILE = "partition.arrow"  # this rank's partition of the run's DataFrame, Arrow IPC
RECORD_FILE = "record.json"  # written by the child when the function returned or raised
VALUE_FILE = "value.pkl"  # the function's pickled return value


@dataclass
class RankSpec:
    """One rank's identity, peers and settings; JSON, so the child needs nothing from Spark to read it."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    host: str
    addresses: list[str]  # "host:port" of every rank, in rank order (the backend's rendezvous)
    backend: str
    driver_host: str
    driver_port: int
    channel_token: str = ""  # this rank's token for the driver's channel (channel.rank_token)
    attempt: int = 1
    driver_loss_timeout_s: float | None = None  # the driver unreachable this long: the rank gives up
    heartbeat_interval_s: float = 1.0
    collective_timeout_s: float | None = None
    keep_value: bool = True  # False: the return value is not needed (not rank 0, run() not run_all())
    gpus: list[str] = field(default_factory=list)
    threads: int | None = None
    backend_options: dict[str, Any] = field(default_factory=dict)  # from the backend's driver session

    def write(self, workdir: Path) -> None:
        (workdir / SPEC_FILE).write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, workdir: Path) -> RankSpec:
        return cls(**json.loads((workdir / SPEC_FILE).read_text()))


def local_ranks(hosts: list[str], rank: int) -> tuple[int, int]:
    """(local rank, local size): this rank's position among the ranks on its own host."""
    same_host = [other for other, host in enumerate(hosts) if host == hosts[rank]]
    return same_host.index(rank), len(same_host)
