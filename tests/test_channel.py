"""The driver's channel on its own: framing, reconnects with backoff, giving up only on a sustained loss,
and a rank's reports (metrics, rank 0's checkpoints in chunks) both ways (no Spark, no TensorFlow)."""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from sparkml_mnist.errors import LaunchError
from sparkml_mnist.launcher.channel import (
    CHALLENGE, MAX_HELLO_BYTES, NONCE_BYTES, ChannelClient, ChannelServer, rank_token,
)
from sparkml_mnist.launcher.driver.reports import RunReports
from sparkml_mnist.launcher.driver.store import CheckpointStore
from sparkml_mnist.launcher.policy import FailurePolicy
from sparkml_mnist.launcher.protocol import CHUNK_BYTES, FETCH, REPORT, Checkpoint
from sparkml_mnist.launcher.rank.context import RankContext
from sparkml_mnist.launcher.spec import LaunchSpec

LOOPBACK = "127.0.0.1"
SECRET = "s" * 64
WAIT_S = 10.0  # events arrive well within this (polled; not a timing assertion)
COLLECTED_RANKS = 2  # the most ranks a test's server has


class Collector:
    def __init__(self, reports: RunReports | None = None) -> None:
        self.events: list[tuple[int, dict]] = []
        self.reports = reports or RunReports(CheckpointStore())
        self.receiver = self.reports.attempt_receiver(COLLECTED_RANKS)  # as one attempt's
        self.lock = threading.Lock()

    def __call__(self, rank: int, event: dict):
        with self.lock:
            self.events.append((rank, event))
        if event["type"] == REPORT:
            return self.receiver.receive(rank, event)
        if event["type"] == FETCH:
            return self.receiver.fetch(rank, event)
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


# --- the hello against strangers: slow clients, replays, malformed hellos, an ended attempt -------------

LIVENESS_S = 30.0  # a guard against a hang, never a timing assertion
DRIPPERS = 20  # more than the old shared cap (4 * np + 4) for two ranks
DRIP_INTERVAL_S = 0.5
LONG_HELLO_S = 600.0  # the dripper test does not rely on the hello deadline
SHORT_HELLO_S = 1.0
FORGED = "FORGED-LINE"


def frame_bytes(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        assert chunk, "the connection closed mid-frame"
        data += chunk
    return data


def raw_frame(sock: socket.socket) -> bytes:
    """One whole frame as it crossed the network (header and body)."""
    header = recv_exactly(sock, 4)
    return header + recv_exactly(sock, struct.unpack(">I", header)[0])


def stranger(server: ChannelServer) -> socket.socket:
    """A raw connection that has read the server's challenge (so the server has admitted it)."""
    sock = socket.create_connection((LOOPBACK, server.port), timeout=LIVENESS_S)
    challenge = json.loads(raw_frame(sock)[4:])
    assert challenge["type"] == CHALLENGE and len(bytes.fromhex(challenge["nonce"])) == NONCE_BYTES
    return sock


def closed_by_server(sock: socket.socket, within_s: float = LIVENESS_S) -> bool:
    """True once the server closed ``sock`` (whatever it sent before is read past)."""
    sock.settimeout(within_s)
    try:
        while sock.recv(1 << 16):
            pass
        return True
    except socket.timeout:
        return False
    except OSError:
        return True


def still_open(sock: socket.socket) -> bool:
    """Whether the server still holds ``sock`` open (asked without waiting; nothing is expected to read)."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(timeout)


def send_line(client: ChannelClient, line: str) -> bool:
    return client.send({"type": "log", "stream": "stdout", "line": line})


def test_slow_strangers_cannot_hold_the_ranks_out() -> None:
    """Sockets that announce a hello and send a byte every half second, from the ranks' own address,
    hold pending slots only: two ranks still connect while they hold on, and their events arrive."""
    collector = Collector()
    with ChannelServer(2, SECRET, collector, LOOPBACK, hello_timeout_s=LONG_HELLO_S) as server:
        drippers = [stranger(server) for _ in range(DRIPPERS)]
        stop = threading.Event()

        def drip() -> None:
            for sock in drippers:
                try:
                    sock.sendall(struct.pack(">I", MAX_HELLO_BYTES))
                except OSError:
                    pass
            while not stop.wait(DRIP_INTERVAL_S):
                for sock in drippers:
                    try:
                        sock.sendall(b"[")
                    except OSError:
                        pass

        dripping = threading.Thread(target=drip, daemon=True)
        dripping.start()
        try:
            clients = [client_for(server, rank) for rank in (0, 1)]
            assert all(send_line(client, f"rank {rank} is in") for rank, client in enumerate(clients))
            events = collector.wait_for(2)
            assert sorted((rank, event["line"]) for rank, event in events) == [(0, "rank 0 is in"), (1, "rank 1 is in")]
            assert any(still_open(sock) for sock in drippers)  # they got in while strangers held on
            for client in clients:
                client.close()
        finally:
            stop.set()
            dripping.join(LIVENESS_S)
            for sock in drippers:
                sock.close()


def test_a_hello_must_be_complete_by_one_fixed_deadline() -> None:
    """A byte every 0.2 s would keep a timeout per read alive forever; the deadline counts from the accept."""
    with ChannelServer(1, SECRET, Collector(), LOOPBACK, hello_timeout_s=SHORT_HELLO_S) as server:
        sock = stranger(server)
        sock.sendall(struct.pack(">I", MAX_HELLO_BYTES))  # the whole hello would take 200 s at this pace
        closed = threading.Event()

        def drip() -> None:
            while not closed.wait(0.2):
                try:
                    sock.send(b"[")
                except OSError:
                    return

        threading.Thread(target=drip, daemon=True).start()
        assert closed_by_server(sock)
        closed.set()
        sock.close()


def test_authenticated_connections_are_capped_per_rank_never_against_the_pending_pool() -> None:
    collector = Collector()
    with ChannelServer(2, SECRET, collector, LOOPBACK, pending_per_peer=1, pending_total=1) as server:
        clients = []
        for rank in (0, 0, 0, 0, 0, 1, 1, 1, 1):  # rank 0: one more than it may hold
            clients.append(client_for(server, rank))
            assert send_line(clients[-1], f"client {len(clients)}")
            collector.wait_for(len(clients))  # in order: the oldest is the first
        assert len(collector.events) == len(clients)
        assert closed_by_server(clients[0]._sock)  # rank 0's oldest  # type: ignore[arg-type]
        assert all(still_open(client._sock) for client in clients[1:])  # type: ignore[arg-type]
        for client in clients:
            client.close()


def test_a_recorded_hello_replayed_on_another_connection_is_refused() -> None:
    """An eavesdropper relays a real rank's connection and keeps its hello: useless on a new connection,
    whose challenge differs."""
    collector = Collector()
    recorded: dict[str, bytes] = {}
    with ChannelServer(1, SECRET, collector, LOOPBACK) as server, socket.create_server((LOOPBACK, 0)) as relay:

        def eavesdrop() -> None:
            downstream, _ = relay.accept()
            with downstream, socket.create_connection((LOOPBACK, server.port), timeout=LIVENESS_S) as upstream:
                downstream.settimeout(LIVENESS_S)
                downstream.sendall(raw_frame(upstream))  # the challenge
                recorded["hello"] = raw_frame(downstream)
                upstream.sendall(recorded["hello"])
                while data := downstream.recv(1 << 16):
                    upstream.sendall(data)

        relaying = threading.Thread(target=eavesdrop, daemon=True)
        relaying.start()
        client = ChannelClient(LOOPBACK, relay.getsockname()[1], 0, rank_token(SECRET, 0))
        assert send_line(client, "through the relay")
        assert [event["line"] for _, event in collector.wait_for(1)] == ["through the relay"]  # a valid hello
        assert rank_token(SECRET, 0).encode() not in recorded["hello"]  # the token itself never crossed

        replay = stranger(server)
        forged = frame_bytes(json.dumps({"type": "log", "stream": "stdout", "line": FORGED}).encode())
        replay.sendall(recorded["hello"] + forged)
        assert closed_by_server(replay)
        replay.close()
        client.close()
        relaying.join(LIVENESS_S)
    assert [event["line"] for _, event in collector.events] == ["through the relay"]


MALFORMED_HELLOS = {
    "too big": struct.pack(">I", MAX_HELLO_BYTES + 1) + b"{" * 64,
    "not JSON": frame_bytes(b"hello, driver"),
    "nested 100000 deep": frame_bytes(b"[" * 100_000 + b"]" * 100_000),
    "nested deep within the size cap": frame_bytes(b"[" * MAX_HELLO_BYTES),  # past Python's recursion limit
    "invalid UTF-8": frame_bytes(b'{"type": "hello", "rank": 0, "mac": "\xff\xfe"}'),
    "a lone surrogate": frame_bytes(b'{"type": "hello", "rank": 0, "mac": "\\ud800", "token": "\\udfff"}'),
    "not an object": frame_bytes(b'["hello", 0]'),
    "rank not an int": frame_bytes(b'{"type": "hello", "rank": "0", "mac": "00"}'),
    "rank a bool": frame_bytes(b'{"type": "hello", "rank": true, "mac": "00"}'),
    "rank huge": frame_bytes(b'{"type": "hello", "rank": 100000000000000000000000000000, "mac": "00"}'),
    "mac an object": frame_bytes(b'{"type": "hello", "rank": 0, "mac": {"a": [1]}}'),
    "type missing": frame_bytes(b'{"rank": 0, "mac": "00"}'),
}


@pytest.mark.parametrize("payload", MALFORMED_HELLOS.values(), ids=MALFORMED_HELLOS.keys())
def test_a_malformed_hello_is_dropped_quietly_and_the_ranks_still_get_in(payload: bytes, capfd, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    collector = Collector()
    with ChannelServer(1, SECRET, collector, LOOPBACK) as server:
        sock = stranger(server)
        sock.sendall(payload)
        assert closed_by_server(sock)
        sock.close()
        client = client_for(server, 0)
        assert send_line(client, "still served")
        assert [event["line"] for _, event in collector.wait_for(1)] == ["still served"]
        client.close()
    assert "Traceback" not in capfd.readouterr().err
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []


def test_an_ended_attempts_connections_are_closed_and_feed_nothing() -> None:
    collector = Collector()
    with ChannelServer(1, SECRET, collector, LOOPBACK) as server:
        client = client_for(server, 0)
        assert send_line(client, "during the attempt")
        collector.wait_for(1)
    sock = client._sock
    assert sock is not None and closed_by_server(sock)  # the server's side is gone
    deadline = time.monotonic() + LIVENESS_S
    while send_line(client, "after the attempt") and time.monotonic() < deadline:
        time.sleep(0.05)  # the first sends may still leave; the connection breaks under them
    assert [event["line"] for _, event in collector.events] == ["during the attempt"]
    client.close()
