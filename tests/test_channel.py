"""The driver's channel on its own: framing, reconnects with backoff, giving up only on a sustained loss,
and a rank's reports (metrics, rank 0's checkpoints in chunks) both ways (no Spark, no TensorFlow)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from sparkml_mnist.errors import LaunchError
from sparkml_mnist.launcher.channel import ChannelClient, ChannelServer, rank_token
from sparkml_mnist.launcher.driver.reports import RunReports
from sparkml_mnist.launcher.driver.store import CheckpointStore
from sparkml_mnist.launcher.policy import FailurePolicy
from sparkml_mnist.launcher.protocol import CHUNK_BYTES, FETCH, REPORT, Checkpoint
from sparkml_mnist.launcher.rank.context import RankContext
from sparkml_mnist.launcher.spec import LaunchSpec

LOOPBACK = "127.0.0.1"
SECRET = "s" * 64
WAIT_S = 10.0  # events arrive well within this (polled; not a timing assertion)


class Collector:
    def __init__(self, reports: RunReports | None = None) -> None:
        self.events: list[tuple[int, dict]] = []
        self.reports = reports or RunReports(CheckpointStore())
        self.lock = threading.Lock()

    def __call__(self, rank: int, event: dict):
        with self.lock:
            self.events.append((rank, event))
        if event["type"] == REPORT:
            return self.reports.receive(rank, event)
        if event["type"] == FETCH:
            return self.reports.fetch(event)
        return None

    def wait_for(self, count: int) -> list[tuple[int, dict]]:
        deadline = time.monotonic() + WAIT_S
        while len(self.events) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.events)


def client_for(server: ChannelServer, rank: int, **options) -> ChannelClient:
    return ChannelClient(LOOPBACK, server.port, rank, rank_token(SECRET, rank), **options)


def test_events_arrive_as_the_authenticated_rank() -> None:
    collector = Collector()
    with ChannelServer(2, SECRET, collector, LOOPBACK) as server:
        client = client_for(server, 1)
        assert client.send({"type": "log", "stream": "stdout", "line": "hello", "rank": 0})
        (rank, event), = collector.wait_for(1)
        assert rank == 1 and event["line"] == "hello"  # the frame's own "rank" does not count
        client.close()


def test_a_broken_connection_is_reopened_after_a_backoff() -> None:
    collector = Collector()
    with ChannelServer(1, SECRET, collector, LOOPBACK) as server:
        client = client_for(server, 0)
        assert client.send({"type": "log", "stream": "stdout", "line": "one"})
        client._sock.close()  # the connection breaks under the client  # type: ignore[union-attr]
        sent = [client.send({"type": "log", "stream": "stdout", "line": f"again {i}"}) for i in range(3)]
        assert sent[0] is False  # this one was lost with the connection
        deadline = time.monotonic() + WAIT_S
        while not client.send({"type": "log", "stream": "stdout", "line": "back"}) and time.monotonic() < deadline:
            time.sleep(0.1)  # the client retries once the backoff passed
        lines = [event["line"] for _, event in collector.wait_for(2)]
        assert lines[0] == "one" and lines[-1] == "back" and not client.lost
        client.close()


def test_only_a_sustained_loss_is_reported_once() -> None:
    losses: list[str] = []
    with ChannelServer(1, SECRET, Collector(), LOOPBACK) as server:
        port = server.port
    client = ChannelClient(LOOPBACK, port, 0, rank_token(SECRET, 0), give_up_after_s=1.0, on_lost=losses.append)
    deadline = time.monotonic() + WAIT_S
    while not losses and time.monotonic() < deadline:
        client.send({"type": "heartbeat", "progress": 1})
        time.sleep(0.1)
    assert len(losses) == 1 and "unreachable for more than 1 s" in losses[0] and client.lost
    client.send({"type": "heartbeat", "progress": 2})
    assert len(losses) == 1


def context_for(server: ChannelServer, rank: int) -> RankContext:
    """A rank's context talking to ``server``, as the launcher makes it in the rank's process."""
    launch = LaunchSpec(size=2, backend="tf", policy=FailurePolicy(), driver_host=LOOPBACK, driver_port=server.port,
                        secret=SECRET)
    spec = launch.for_rank(rank, [LOOPBACK, LOOPBACK], [0, 0], [])
    return RankContext(spec=spec, channel=ChannelClient(LOOPBACK, server.port, rank, spec.channel_token))


def test_a_report_carries_metrics_and_rank_zeros_checkpoint_in_chunks_kept_on_disk(tmp_path: Path) -> None:
    heard: list[tuple[str, int, dict, int | None]] = []
    reports = RunReports(CheckpointStore(tmp_path / "checkpoints"),
                         on_report=lambda key, rank, metrics, ckpt: heard.append((key, rank, metrics, ckpt and ckpt.epoch)))
    data = bytes(range(256)) * (3 * CHUNK_BYTES // 256 + 7)  # four chunks
    with ChannelServer(2, SECRET, Collector(reports), LOOPBACK) as server:
        chief, other = context_for(server, 0), context_for(server, 1)
        assert other.latest_checkpoint() is None
        chief.report("", {"epoch": 1}, Checkpoint(1, b"first"))
        chief.report("", {"epoch": 2}, Checkpoint(2, data))
        other.report("", {"done": True})
        latest = other.latest_checkpoint()
        assert latest is not None and latest.epoch == 2 and latest.data == data
        assert other.heartbeat.progress == 1 and chief.heartbeat.progress == 2  # a report is progress
        chief.channel.close()  # type: ignore[union-attr]
        other.channel.close()  # type: ignore[union-attr]
    assert reports.metrics == {"": {0: {"epoch": 2}, 1: {"done": True}}}
    assert heard == [("", 0, {"epoch": 1}, 1), ("", 0, {"epoch": 2}, 2), ("", 1, {"done": True}, None)]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-000002.ckpt", "epoch-000002.json"]
    again = CheckpointStore(tmp_path / "checkpoints").latest()  # a new driver (--resume) finds it
    assert again is not None and again.epoch == 2 and again.data == data


def test_only_rank_zero_stores_checkpoints(tmp_path: Path) -> None:
    store = CheckpointStore()
    collector = Collector(RunReports(store))
    with ChannelServer(2, SECRET, collector, LOOPBACK) as server:
        with pytest.raises(LaunchError, match="only rank 0 reports checkpoints; rank 1 attached one"):
            context_for(server, 1).report("", {}, Checkpoint(5, b"x"))
        client = client_for(server, 1)  # a forged frame, past the rank-side check: dropped by the driver
        client.send({"type": REPORT, "key": "", "epoch": 5, "seq": 0, "total": 1, "data": "", "metrics": {}})
        collector.wait_for(1)
        client.close()
    assert store.latest() is None and collector.reports.metrics == {}


@pytest.mark.parametrize("epochs", [[1, 2, 3]])
def test_the_store_keeps_only_the_latest_file(tmp_path: Path, epochs: list[int]) -> None:
    store = CheckpointStore(tmp_path)
    for epoch in epochs:
        store.put(epoch, f"after {epoch}".encode())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-000003.ckpt", "epoch-000003.json"]
    assert store.latest().data == b"after 3"  # type: ignore[union-attr]
