"""The driver's channel to the ranks: authenticated, bounded, length-prefixed JSON frames, both ways.

Modelled on pyspark's ``pyspark.ml.torch.log_communication`` (length-prefixed messages from the
workers to the driver), with what a shared cluster needs on top:

- every accepted connection first gets a challenge (a fresh random nonce); the client's hello names
  its rank and answers with an HMAC of the nonce under that rank's token (itself an HMAC of the run's
  secret, which only the run's tasks receive), compared in constant time. A hello recorded on one
  connection is therefore useless on another. A connection without a valid hello is dropped before
  any other frame is read, and every later frame counts for that rank only (``rank`` fields in frames
  are ignored);
- the hello is hostile input until it is verified: it must be complete within ``HELLO_TIMEOUT_S`` of
  the accept (one fixed deadline, not a timeout per byte), its header may announce at most
  ``MAX_HELLO_BYTES``, and anything malformed (not JSON, nested too deep, bad UTF-8, wrong types) is
  dropped quietly;
- connections still owing their hello sit in a pending pool capped per peer address and in total;
  a new connection that finds it full closes the oldest pending one. A rank's hello takes
  milliseconds, so slow or idle strangers cannot hold the ranks out. Authenticated connections never
  count against that pool: each rank may hold ``MAX_CONNECTIONS_PER_RANK`` at once (a further one
  closes that rank's oldest, e.g. one a dead peer left half-open);
- any later frame header announcing more than ``MAX_FRAME_BYTES`` is refused before anything is
  allocated; an idle connection is closed; control characters are stripped from forwarded log lines;
  nothing is unpickled;
- when the server's ``with`` block ends (the end of a launch attempt) every open connection is shut
  down and closed, and ``on_event`` is never called again: an ended attempt's ranks feed nothing;
- the client reconnects with backoff, and tells its owner only when the driver stayed unreachable
  for ``give_up_after_s`` (a sustained loss, not one broken connection);
- requests with replies (the checkpoint a rank stores on the driver, or fetches from it).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import socket
import socketserver
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from sparkml_mnist.errors import LaunchError

logger = logging.getLogger(__name__)

_LENGTH = struct.Struct(">I")
MAX_FRAME_BYTES = 1 << 20  # a checkpoint travels in chunks well below this
MAX_HELLO_BYTES = 1024  # a hello or a challenge is about 100 bytes
NONCE_BYTES = 32
SERVER_POLL_INTERVAL_S = 0.1
CONNECT_TIMEOUT_S = 10.0
HELLO_TIMEOUT_S = 10.0  # from the accept to the whole hello (and for the client: to the whole challenge)
DEFAULT_IDLE_TIMEOUT_S = 600.0
REPLY_TIMEOUT_S = 120.0
EXIT_DRAIN_TIMEOUT_S = 30.0  # how long the end of an attempt waits for a running on_event call to return
MAX_LOG_LINE_CHARS = 4000
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 8.0
# A rank's process, its heartbeat connection, its barrier task and one reconnect overlapping.
MAX_CONNECTIONS_PER_RANK = 4
# Pending hellos per peer address: at least this many, and enough for every rank's connections to
# arrive at once from one host (all ranks on one executor) without evicting each other.
MIN_PENDING_PER_PEER = 8
# The whole pending pool holds this many peers' worth: a stranger on one address cannot fill it.
PENDING_PEERS = 4
LISTEN_BACKLOG = 128  # a launch's ranks connect in one burst
HELLO = "hello"
CHALLENGE = "challenge"
_HELLO_MAC_LABEL = b"sparkml_mnist channel hello:"
_HEX_DIGEST = re.compile(r"[0-9a-f]{%d}" % (2 * hashlib.sha256().digest_size))
_HEX_NONCE = re.compile(r"[0-9a-f]{%d}" % (2 * NONCE_BYTES))
# C0 controls but tab, DEL and C1 controls: enough to move a terminal's cursor or recolour it.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")

Event = dict[str, Any]
# on_event(rank, event) -> reply frames (a frame, a list of them, or None); on the connection's own thread.
EventHandler = Callable[[int, Event], "Event | list[Event] | None"]


class ChannelError(LaunchError):
    """The driver cannot be reached, or did not answer a request."""


def rank_token(secret: str, rank: int) -> str:
    """What rank ``rank`` proves itself with: an HMAC of the run's secret, useless for any other rank."""
    return hmac.new(secret.encode(), f"rank:{rank}".encode(), hashlib.sha256).hexdigest()


def hello_mac(token: str, nonce: bytes) -> str:
    """A hello's answer to one connection's challenge: the token itself never crosses the network."""
    return hmac.new(token.encode(), _HELLO_MAC_LABEL + nonce, hashlib.sha256).hexdigest()


def clean_line(line: str) -> str:
    """A rank's log line as it may reach a terminal: no control characters, bounded length."""
    return _CONTROL.sub("", line)[:MAX_LOG_LINE_CHARS]


def _read_exactly(sock: socket.socket, count: int, deadline: float | None) -> bytes | None:
    """``count`` bytes, or None at end of stream; with a deadline, a slow sender cannot stretch it."""
    chunks, missing = [], count
    while missing:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("the deadline passed")
            sock.settimeout(left)
        chunk = sock.recv(min(missing, 1 << 16))
        if not chunk:
            return None
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket, max_bytes: int = MAX_FRAME_BYTES, deadline: float | None = None) -> Event | None:
    """The next frame as a JSON object; None at end of stream or for anything malformed or too large.

    With ``deadline`` (a ``time.monotonic()`` value) the whole frame must arrive by then, else
    ``socket.timeout``; without it the socket's own timeout applies to each read."""
    header = _read_exactly(sock, _LENGTH.size, deadline)
    if header is None:
        return None
    (length,) = _LENGTH.unpack(header)
    if length > max_bytes:  # refused before a byte of the body is read or allocated
        return None
    body = _read_exactly(sock, length, deadline)
    if body is None:
        return None
    try:
        frame = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nested too deep
        return None
    return frame if isinstance(frame, dict) and isinstance(frame.get("type"), str) else None


def write_frame(sock: socket.socket, frame: Event) -> None:
    body = json.dumps(frame).encode("utf-8")
    if len(body) > MAX_FRAME_BYTES:
        raise ChannelError(f"a {frame.get('type')!r} frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    sock.sendall(_LENGTH.pack(len(body)) + body)


def _shut(sock: socket.socket) -> None:
    """Wake whichever thread reads ``sock`` and tell the peer we are done; the owning thread closes it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed or reset
        pass


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    peer: str
    rank: int | None = None  # set once its hello is verified
    nonce: bytes = field(default_factory=lambda: secrets.token_bytes(NONCE_BYTES))


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: _Server = self.server  # type: ignore[assignment]
        sock = self.request
        connection = server.admit(sock, str(self.client_address[0]))
        if connection is None:  # the server is closing
            return
        try:
            rank = self._hello(server, connection)
            if rank is None:
                return
            sock.settimeout(server.idle_timeout_s)
            while True:
                frame = read_frame(sock)
                if frame is None:
                    return
                delivered, reply = server.dispatch(rank, frame)
                if not delivered:  # the attempt ended
                    return
                for frame_out in reply if isinstance(reply, list) else [reply] if reply is not None else []:
                    write_frame(sock, frame_out)
        except (OSError, ChannelError):  # timeouts, resets: the client reconnects if it still needs to
            return
        finally:
            sock.close()
            server.forget(connection)

    @staticmethod
    def _hello(server: _Server, connection: _Connection) -> int | None:
        """The rank this connection proves it speaks for, or None: whatever a stranger sends, nothing is
        raised (a traceback per connection would be a way to flood the driver's log)."""
        sock = connection.sock
        deadline = time.monotonic() + server.hello_timeout_s
        try:
            sock.settimeout(server.hello_timeout_s)  # the first step after the accept: all the time is left
            write_frame(sock, {"type": CHALLENGE, "nonce": connection.nonce.hex()})
            hello = read_frame(sock, MAX_HELLO_BYTES, deadline)
            rank = server.authenticate(hello, connection.nonce)
        except Exception as error:  # hostile input by definition: dropped, never a traceback
            logger.debug("dropped a connection from %s before its hello (%s)", connection.peer, type(error).__name__)
            return None
        if rank is None:
            logger.debug("dropped a connection from %s: no valid hello", connection.peer)
            return None
        return rank if server.promote(connection, rank) else None


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], size: int, secret: str, on_event: EventHandler,
                 pending_per_peer: int, pending_total: int, per_rank: int, idle_timeout_s: float,
                 hello_timeout_s: float) -> None:
        super().__init__(address, _Handler)
        self.size = size
        self.tokens = {rank: rank_token(secret, rank) for rank in range(size)}
        self.on_event = on_event
        self.pending_per_peer = pending_per_peer
        self.pending_total = pending_total
        self.per_rank = per_rank
        self.idle_timeout_s = idle_timeout_s
        self.hello_timeout_s = hello_timeout_s
        self.closing = False
        self._pending: list[_Connection] = []  # oldest first
        self._ranks: dict[int, list[_Connection]] = {}  # oldest first
        self._in_flight = 0  # on_event calls running
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    def admit(self, sock: socket.socket, peer: str) -> _Connection | None:
        """Register a new connection as pending, closing the oldest pending one where the pool is full."""
        connection = _Connection(sock, peer)
        with self._lock:
            if self.closing:
                return None
            same_peer = [c for c in self._pending if c.peer == peer]
            if len(same_peer) >= self.pending_per_peer:
                self._evict_pending(same_peer[0])
            elif len(self._pending) >= self.pending_total:
                self._evict_pending(self._pending[0])
            self._pending.append(connection)
        return connection

    def _evict_pending(self, connection: _Connection) -> None:
        self._pending.remove(connection)
        logger.debug("closed the oldest pending connection from %s: the pending pool is full", connection.peer)
        _shut(connection.sock)

    def promote(self, connection: _Connection, rank: int) -> bool:
        """Move a verified connection out of the pending pool into its rank's (False if it was evicted)."""
        with self._lock:
            if self.closing or connection not in self._pending:
                return False
            self._pending.remove(connection)
            held = self._ranks.setdefault(rank, [])
            if len(held) >= self.per_rank:
                oldest = held.pop(0)
                logger.debug("rank %d holds %d connections: closed its oldest", rank, self.per_rank)
                _shut(oldest.sock)
            connection.rank = rank
            held.append(connection)
            return True

    def forget(self, connection: _Connection) -> None:
        with self._lock:
            if connection in self._pending:
                self._pending.remove(connection)
            held = self._ranks.get(connection.rank) if connection.rank is not None else None
            if held is not None and connection in held:
                held.remove(connection)
            self._changed.notify_all()

    def dispatch(self, rank: int, frame: Event) -> tuple[bool, Event | list[Event] | None]:
        """(False, None) once the server closed; else (True, on_event's reply)."""
        with self._lock:
            if self.closing:
                return False, None
            self._in_flight += 1
        try:
            return True, self.on_event(rank, frame)
        except Exception as error:  # a bad message must not take the driver's run down
            logger.warning("ignored a message of rank %d (%s: %s)", rank, type(error).__name__, error)
            return True, None
        finally:
            with self._lock:
                self._in_flight -= 1
                self._changed.notify_all()

    def authenticate(self, hello: Event | None, nonce: bytes) -> int | None:
        """The rank a hello speaks for, if it answers this connection's nonce with that rank's token; else None."""
        if hello is None or hello.get("type") != HELLO:
            return None
        rank, mac = hello.get("rank"), hello.get("mac")
        if isinstance(rank, bool) or not isinstance(rank, int) or not isinstance(mac, str):
            return None
        token = self.tokens.get(rank)
        if token is None or not _HEX_DIGEST.fullmatch(mac):  # ASCII only: compare_digest refuses other str
            return None
        return rank if hmac.compare_digest(hello_mac(token, nonce), mac) else None

    def stop_delivering(self) -> None:
        """From now on no frame reaches ``on_event`` and no connection is admitted."""
        with self._lock:
            self.closing = True

    def close_connections(self, drain_timeout_s: float) -> None:
        """Shut every open connection and wait (boundedly) for their threads to close them and leave ``on_event``."""
        self.stop_delivering()
        with self._lock:
            open_now = [*self._pending, *(c for held in self._ranks.values() for c in held)]
        for connection in open_now:
            _shut(connection.sock)
        deadline = time.monotonic() + drain_timeout_s
        with self._lock:
            while self._pending or any(self._ranks.values()) or self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    logger.warning("%d connection(s) of the channel still busy at its end", self._in_flight)
                    return
                self._changed.wait(left)


class ChannelServer:
    """Runs on the driver for the length of one launch attempt, on the address the ranks use to reach it."""

    def __init__(self, size: int, secret: str, on_event: EventHandler, bind_host: str,
                 idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S, hello_timeout_s: float = HELLO_TIMEOUT_S,
                 pending_per_peer: int | None = None, pending_total: int | None = None,
                 per_rank: int = MAX_CONNECTIONS_PER_RANK) -> None:
        per_peer = pending_per_peer if pending_per_peer is not None else max(MIN_PENDING_PER_PEER, per_rank * size)
        total = pending_total if pending_total is not None else PENDING_PEERS * per_peer
        self._server = _Server((bind_host, 0), size, secret, on_event, per_peer, total, per_rank,
                               idle_timeout_s, hello_timeout_s)
        self.host: str = self._server.server_address[0]
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": SERVER_POLL_INTERVAL_S}, daemon=True
        )

    def __enter__(self) -> ChannelServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """The attempt ended: no connection of it stays open, and ``on_event`` is not called again."""
        self._server.stop_delivering()  # first: a frame arriving from here on is not delivered
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server.close_connections(EXIT_DRAIN_TIMEOUT_S)


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

    def _hello(self, sock: socket.socket) -> None:
        """Answer the driver's challenge; the challenge must come within one fixed deadline."""
        challenge = read_frame(sock, MAX_HELLO_BYTES, time.monotonic() + HELLO_TIMEOUT_S)
        nonce = challenge.get("nonce") if challenge is not None and challenge.get("type") == CHALLENGE else None
        if not isinstance(nonce, str) or not _HEX_NONCE.fullmatch(nonce):
            raise OSError("the driver sent no challenge")
        write_frame(sock, {"type": HELLO, "rank": self._rank, "mac": hello_mac(self._token, bytes.fromhex(nonce))})

    def _connect(self) -> bool:
        now = time.monotonic()
        if now < self._next_try:
            return False
        try:
            sock = socket.create_connection(self._address, timeout=CONNECT_TIMEOUT_S)
        except OSError as error:
            self._broken(now, f"cannot reach the driver at {self._address[0]}:{self._address[1]} ({error})")
            return False
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._hello(sock)
        except OSError as error:
            sock.close()
            self._broken(now, f"no hello with the driver at {self._address[0]}:{self._address[1]} ({error})")
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
