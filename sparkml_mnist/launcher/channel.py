"""The driver's channel to the ranks: authenticated, bounded, length-prefixed JSON frames, both ways.

Modelled on pyspark's ``pyspark.ml.torch.log_communication`` (length-prefixed messages from the
workers to the driver), with what a shared cluster needs on top:

- every connection opens with a hello naming its rank and carrying that rank's token (an HMAC of
  the run's secret, which only the run's tasks receive), compared in constant time; a connection
  without it is dropped before any other frame is read, and every later frame counts for that rank
  only (``rank`` fields in frames are ignored);
- a frame header announcing more than ``MAX_FRAME_BYTES`` is refused before anything is allocated;
  connections are capped, a hello must come within ``HELLO_TIMEOUT_S`` and an idle connection is
  closed; control characters are stripped from forwarded log lines; nothing is unpickled;
- the client reconnects with backoff, and tells its owner only when the driver stayed unreachable
  for ``give_up_after_s`` (a sustained loss, not one broken connection);
- requests with replies (the checkpoint a rank stores on the driver, or fetches from it).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import socket
import socketserver
import logging
import struct
import threading
import time
from typing import Any, Callable

logger = logging.getLogger(__name__)

_LENGTH = struct.Struct(">I")
MAX_FRAME_BYTES = 1 << 20  # a checkpoint travels in chunks well below this
SERVER_POLL_INTERVAL_S = 0.1
CONNECT_TIMEOUT_S = 10.0
HELLO_TIMEOUT_S = 10.0
DEFAULT_IDLE_TIMEOUT_S = 600.0
REPLY_TIMEOUT_S = 120.0
MAX_LOG_LINE_CHARS = 4000
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 8.0
HELLO = "hello"
# C0 controls but tab, DEL and C1 controls: enough to move a terminal's cursor or recolour it.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")

Event = dict[str, Any]
# on_event(rank, event) -> reply frames (a frame, a list of them, or None); on the connection's own thread.
EventHandler = Callable[[int, Event], "Event | list[Event] | None"]


class ChannelError(Exception):
    """The driver cannot be reached, or did not answer a request."""


def rank_token(secret: str, rank: int) -> str:
    """What rank ``rank`` shows in its hello: an HMAC of the run's secret, useless for any other rank."""
    return hmac.new(secret.encode(), f"rank:{rank}".encode(), hashlib.sha256).hexdigest()


def clean_line(line: str) -> str:
    """A rank's log line as it may reach a terminal: no control characters, bounded length."""
    return _CONTROL.sub("", line)[:MAX_LOG_LINE_CHARS]


def _read_exactly(sock: socket.socket, count: int) -> bytes | None:
    chunks, missing = [], count
    while missing:
        chunk = sock.recv(min(missing, 1 << 16))
        if not chunk:
            return None
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket) -> Event | None:
    """The next frame as a JSON object; None at end of stream or for anything malformed or too large."""
    header = _read_exactly(sock, _LENGTH.size)
    if header is None:
        return None
    (length,) = _LENGTH.unpack(header)
    if length > MAX_FRAME_BYTES:  # refused before a byte of the body is read or allocated
        return None
    body = _read_exactly(sock, length)
    if body is None:
        return None
    try:
        frame = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return frame if isinstance(frame, dict) and isinstance(frame.get("type"), str) else None


def write_frame(sock: socket.socket, frame: Event) -> None:
    body = json.dumps(frame).encode("utf-8")
    if len(body) > MAX_FRAME_BYTES:
        raise ChannelError(f"a {frame.get('type')!r} frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    sock.sendall(_LENGTH.pack(len(body)) + body)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: _Server = self.server  # type: ignore[assignment]
        sock = self.request
        if not server.admit():
            return
        try:
            sock.settimeout(HELLO_TIMEOUT_S)
            rank = server.authenticate(read_frame(sock))
            if rank is None:
                return
            sock.settimeout(server.idle_timeout_s)
            while True:
                frame = read_frame(sock)
                if frame is None:
                    return
                try:
                    reply = server.on_event(rank, frame)
                except Exception as error:  # a bad message must not take the driver's run down
                    logger.warning("ignored a message of rank %d (%s: %s)", rank, type(error).__name__, error)
                    continue
                for frame_out in reply if isinstance(reply, list) else [reply] if reply is not None else []:
                    write_frame(sock, frame_out)
        except (OSError, ChannelError):  # timeouts, resets: the client reconnects if it still needs to
            return
        finally:
            server.release()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], size: int, secret: str, on_event: EventHandler,
                 max_connections: int, idle_timeout_s: float) -> None:
        super().__init__(address, _Handler)
        self.size = size
        self.tokens = {rank: rank_token(secret, rank) for rank in range(size)}
        self.on_event = on_event
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.open_connections = 0
        self._lock = threading.Lock()

    def admit(self) -> bool:
        with self._lock:
            if self.open_connections >= self.max_connections:
                return False
            self.open_connections += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.open_connections -= 1

    def authenticate(self, hello: Event | None) -> int | None:
        """The rank a hello speaks for, if its token is that rank's; else None."""
        if hello is None or hello.get("type") != HELLO:
            return None
        rank, token = hello.get("rank"), hello.get("token")
        if isinstance(rank, bool) or not isinstance(rank, int) or not isinstance(token, str):
            return None
        expected = self.tokens.get(rank)
        if expected is None or not hmac.compare_digest(expected.encode(), token.encode()):
            return None
        return rank


class ChannelServer:
    """Runs on the driver for the length of one run, on the address the ranks use to reach it."""

    def __init__(self, size: int, secret: str, on_event: EventHandler, bind_host: str,
                 max_connections: int | None = None, idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S) -> None:
        # Each rank holds two connections (its process and its barrier task), a reconnect may overlap.
        limit = max_connections if max_connections is not None else 4 * size + 4
        self._server = _Server((bind_host, 0), size, secret, on_event, limit, idle_timeout_s)
        self.host: str = self._server.server_address[0]
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
    """Sends events to the driver as one rank. Never fails the training by itself: a broken connection is
    retried with backoff; ``on_lost`` is called once when the driver stayed unreachable ``give_up_after_s``."""

    def __init__(self, host: str, port: int, rank: int, token: str, give_up_after_s: float | None = None,
                 on_lost: Callable[[str], None] | None = None) -> None:
        self._address = (host, port)
        self._rank = rank
        self._token = token
        self._give_up_after_s = give_up_after_s
        self._on_lost = on_lost
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._backoff_s = BACKOFF_FIRST_S
        self._next_try = 0.0
        self._unreachable_since: float | None = None
        self.lost = False
        self.disabled = port <= 0  # no driver to talk to (e.g. a rank started by hand)

    @property
    def failed(self) -> bool:
        """True while the driver cannot be reached (so lines are kept elsewhere)."""
        return self.disabled or self._sock is None and self._unreachable_since is not None

    def _connect(self) -> bool:
        now = time.monotonic()
        if now < self._next_try:
            return False
        try:
            sock = socket.create_connection(self._address, timeout=CONNECT_TIMEOUT_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            write_frame(sock, {"type": HELLO, "rank": self._rank, "token": self._token})
        except OSError as error:
            self._broken(now, f"cannot reach the driver at {self._address[0]}:{self._address[1]} ({error})")
            return False
        sock.settimeout(REPLY_TIMEOUT_S)
        self._sock = sock
        self._backoff_s = BACKOFF_FIRST_S
        self._unreachable_since = None
        return True

    def _broken(self, now: float, reason: str) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._unreachable_since is None:
            self._unreachable_since = now
        self._next_try = now + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, BACKOFF_MAX_S)
        limit = self._give_up_after_s
        if limit is not None and not self.lost and now - self._unreachable_since > limit:
            self.lost = True
            if self._on_lost is not None:
                self._on_lost(f"{reason}; unreachable for more than {limit:g} s")

    def _send_locked(self, event: Event) -> bool:
        if self.disabled or (self._sock is None and not self._connect()):
            return False
        try:
            write_frame(self._sock, event)  # type: ignore[arg-type]
            return True
        except OSError as error:
            self._broken(time.monotonic(), f"the connection to the driver broke ({error})")
            return False

    def send(self, event: Event) -> bool:
        """Best effort: True when the frame left; a failure is retried on the next send, after a backoff."""
        with self._lock:
            return self._send_locked(event)

    def request(self, event: Event, replies: Callable[[Event], bool]) -> list[Event]:
        """Send ``event`` and collect reply frames until ``replies(frame)`` says the last one came."""
        with self._lock:
            for _ in range(2):  # one reconnect: the first connection may have been idle-closed
                if not self._send_locked(event):
                    self._next_try = 0.0
                    continue
                frames: list[Event] = []
                try:
                    while True:
                        frame = read_frame(self._sock)  # type: ignore[arg-type]
                        if frame is None:
                            raise OSError("the driver closed the connection")
                        frames.append(frame)
                        if replies(frame):
                            return frames
                except OSError as error:
                    self._broken(time.monotonic(), f"no reply from the driver ({error})")
                    self._next_try = 0.0
            raise ChannelError(f"the driver at {self._address[0]}:{self._address[1]} did not answer a "
                               f"{event.get('type')!r} request")

    def log(self, stream: str, line: str) -> bool:
        return self.send({"type": "log", "stream": stream, "line": line[:MAX_LOG_LINE_CHARS]})

    def local_to_driver(self) -> bool:
        """True when this process runs on the driver's machine (its stderr already reaches the console)."""
        with self._lock:
            if self._sock is None and not self._connect():
                return False
            sock = self._sock
            assert sock is not None
            return sock.getsockname()[0] == sock.getpeername()[0]

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
