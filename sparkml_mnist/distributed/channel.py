"""A small TCP channel from every rank to the driver: log lines, heartbeats and progress.

Modelled on pyspark's ``pyspark.ml.torch.log_communication`` (length-prefixed messages, a
best-effort client that never fails the training), but carrying JSON events, because the
driver's stall watchdog needs each rank's heartbeat and progress counter, not only its text.
"""

from __future__ import annotations

import json
import socket
import socketserver
import struct
import sys
import threading
from typing import Any, Callable

from sparkml_mnist.tf_notices import is_native_notice, notices_wanted

_LENGTH = struct.Struct(">I")
SERVER_POLL_INTERVAL_S = 0.1
CONNECT_TIMEOUT_S = 10.0
MAX_LOG_LINE_CHARS = 4000
ALL_INTERFACES = "0.0.0.0"

Event = dict[str, Any]
LogSink = Callable[[int, str, str], None]


def print_log_line(rank: int, stream: str, line: str) -> None:
    """Default sink: the rank's line on the driver's stderr, prefixed so ranks can be told apart.

    TensorFlow's native start-up notices are left out unless asked for (``sparkml_mnist.tf_notices``).
    """
    if is_native_notice(line) and not notices_wanted():
        return
    sys.stderr.write(f"[rank {rank}] {line}\n")
    sys.stderr.flush()


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        while True:
            header = self.rfile.read(_LENGTH.size)
            if len(header) < _LENGTH.size:
                return
            body = self.rfile.read(_LENGTH.unpack(header)[0])
            try:
                self.server.on_event(json.loads(body.decode("utf-8")))  # type: ignore[attr-defined]
            except Exception as error:  # a bad message must not take the driver's run down
                sys.stderr.write(f"sparkml_mnist: ignored a malformed rank message ({error})\n")


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class ChannelServer:
    """Runs on the driver for the length of one run; hands every event to ``on_event``."""

    def __init__(self, on_event: Callable[[Event], None], bind_host: str = ALL_INTERFACES) -> None:
        self._server = _Server((bind_host, 0), _Handler)
        self._server.on_event = on_event  # type: ignore[attr-defined]
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": SERVER_POLL_INTERVAL_S}, daemon=True
        )

    def __enter__(self) -> ChannelServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class ChannelClient:
    """Sends events to the driver; if the driver cannot be reached it goes quiet instead of failing."""

    def __init__(self, host: str, port: int) -> None:
        self._address = (host, port)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self.failed = port <= 0

    def _connect(self) -> None:
        try:
            self._sock = socket.create_connection(self._address, timeout=CONNECT_TIMEOUT_S)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as error:
            self.failed = True
            sys.stderr.write(f"sparkml_mnist: cannot reach the driver at {self._address} ({error}); "
                             "logs and heartbeats will not be streamed\n")

    def local_to_driver(self) -> bool:
        """True when this process runs on the driver's machine (its stderr already reaches the console)."""
        with self._lock:
            if self._sock is None and not self.failed:
                self._connect()
            if self._sock is None:
                return False
            return self._sock.getsockname()[0] == self._sock.getpeername()[0]

    def send(self, event: Event) -> None:
        with self._lock:
            if self.failed:
                return
            if self._sock is None:
                self._connect()
                if self.failed:
                    return
            body = json.dumps(event).encode("utf-8")
            try:
                self._sock.sendall(_LENGTH.pack(len(body)) + body)  # type: ignore[union-attr]
            except OSError:
                self.failed = True

    def log(self, rank: int, stream: str, line: str) -> None:
        self.send({"type": "log", "rank": rank, "stream": stream, "line": line[:MAX_LOG_LINE_CHARS]})

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
