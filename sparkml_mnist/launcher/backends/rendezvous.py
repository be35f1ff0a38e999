"""Horovod's rendezvous, authenticated and bounded: a key-value server on the driver, a signing proxy per rank.

Gloo's HTTP store client in Horovod (``horovod/common/gloo/http_store.cc``, with elnormous/HTTPRequest)
opens one connection per request and sends ``PUT``/``GET``/``DELETE /<scope>/<key> HTTP/1.1`` with a
``Content-Length`` and no credentials; it takes 200 (and 404: no such key, for ``GET``) and retries anything
else. Horovod's own server (``RendezvousHTTPServer``) lets anyone overwrite the peers' addresses (redirecting
Gloo), keeps a body of any declared length in memory, restarts its timeout with every byte and waits for its
request threads when closed. Here instead:

- the driver's ``RendezvousServer`` answers only requests signed with one rank's key (``rendezvous_key``: an
  HMAC of the rank's channel token, so of the run's secret, which only the run's tasks receive), each with a
  counter above the last one that rank used, so a captured request cannot be replayed; its replies are signed
  too, so no one else can answer Gloo in its place;
- each rank's process runs a ``RendezvousProxy`` on loopback, the address Gloo is given: it admits connections
  from its own process only (Linux: the client socket's inode is among the process's descriptors), signs each
  request and forwards it to the driver;
- both read a request's line, headers and body under one deadline (not one per byte), refuse a declared body
  above ``MAX_BODY_BYTES`` before reading it, cap their connections, and serve on daemon threads that closing
  never waits for (it shuts the open connections instead).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http
import os
import socket
import socketserver
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from sparkml_mnist.errors import LaunchError
from sparkml_mnist.launcher.channel import rank_token

LOOPBACK = "127.0.0.1"
MAX_BODY_BYTES = 1 << 20  # Gloo stores ~150 bytes of addresses per peer: room for thousands of ranks
MAX_HEAD_BYTES = 16 << 10  # request (or status) line and headers together
MAX_HEADERS = 32
MAX_PATH_CHARS = 1024
RECV_CHUNK_BYTES = 1 << 16
REQUEST_DEADLINE_S = 10.0  # a whole request must arrive within this, however it trickles in
FORWARD_DEADLINE_S = 30.0  # the proxy's exchange with the driver (Gloo's own client never times out)
SEND_TIMEOUT_S = 10.0
SERVER_POLL_INTERVAL_S = 0.1
PROXY_MAX_CONNECTIONS = 8  # Gloo sends one request at a time
CONNECTIONS_PER_RANK = 2  # a rank's proxy sends one at a time; one more in case a timed-out one lingers
CONNECTION_HEADROOM = 4
MAX_NUMBER_DIGITS = 20  # a rank, or a counter (a nanosecond timestamp fits in 19)
KEY_CONTEXT = b"sparkml-mnist horovod rendezvous"
RANK_HEADER = "X-Sparkml-Rank"
COUNTER_HEADER = "X-Sparkml-Counter"
SIGNATURE_HEADER = "X-Sparkml-Signature"
METHODS = ("GET", "PUT", "DELETE")
_PROC_TCP = "/proc/net/tcp"
_PROC_OWN_FDS = "/proc/self/fd"
_TCP_ESTABLISHED = "01"


ServiceT = TypeVar("ServiceT", bound="_Service")


class RendezvousRefused(LaunchError):
    """A request this side will not serve; ``status`` is the HTTP answer (never leaves this module's servers)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def rendezvous_key(token: str) -> bytes:
    """One rank's signing key, from its channel token: the rank can derive it, the driver too, no one else."""
    return hmac.new(token.encode(), KEY_CONTEXT, hashlib.sha256).digest()


def request_signature(key: bytes, method: str, path: str, rank: int, counter: int, body: bytes) -> str:
    message = f"{method}\n{path}\n{rank}\n{counter}\n{hashlib.sha256(body).hexdigest()}"
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def reply_signature(key: bytes, counter: int, status: int, body: bytes) -> str:
    """Binds a reply to the request it answers (its counter), so a reply cannot be forged or moved."""
    message = f"reply\n{counter}\n{status}\n{hashlib.sha256(body).hexdigest()}"
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


# -- bounded HTTP/1.1 messages -------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """A request or a reply: its first line's words, its headers (names lower-cased) and its body."""

    start: list[str]
    headers: dict[str, str]
    body: bytes


def is_decimal(text: str) -> bool:
    """ASCII digits only (``str.isdigit`` also takes the superscripts a latin-1 header may hold)."""
    return text.isascii() and text.isdigit()


def _recv(sock: socket.socket, deadline: float) -> bytes:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("the message did not arrive in time")
    sock.settimeout(remaining)  # what is left of the one deadline, not a fresh timeout per read
    chunk = sock.recv(RECV_CHUNK_BYTES)
    if not chunk:
        raise ConnectionError("the peer closed the connection")
    return chunk


def read_message(sock: socket.socket, deadline_s: float, max_body: int = MAX_BODY_BYTES) -> Message:
    """One message, all of it within ``deadline_s``; a declared body above ``max_body`` is refused unread.

    Raises ``RendezvousRefused`` for what deserves an answer, ``OSError`` (timeout, closed) for what does not.
    """
    deadline = time.monotonic() + deadline_s
    buffer = bytearray()
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        if len(buffer) > MAX_HEAD_BYTES:
            raise RendezvousRefused(http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "headers too large")
        buffer += _recv(sock, deadline)
    if end > MAX_HEAD_BYTES:
        raise RendezvousRefused(http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "headers too large")
    lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    start = lines[0].split(" ")
    if len(lines) - 1 > MAX_HEADERS:
        raise RendezvousRefused(http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many headers")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        name = name.strip().lower()
        if not colon or not name or name in headers:
            raise RendezvousRefused(http.HTTPStatus.BAD_REQUEST, f"a malformed or repeated header {name!r}")
        headers[name] = value.strip()
    if "transfer-encoding" in headers:
        raise RendezvousRefused(http.HTTPStatus.NOT_IMPLEMENTED, "only bodies with a Content-Length")
    declared = headers.get("content-length", "0")
    if not is_decimal(declared):
        raise RendezvousRefused(http.HTTPStatus.BAD_REQUEST, "a malformed Content-Length")
    digits = declared.lstrip("0") or "0"
    # Before a byte of the body is read (and before int() of thousands of digits).
    if len(digits) > len(str(max_body)) or int(digits) > max_body:
        raise RendezvousRefused(http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"a body above {max_body} bytes")
    length = int(digits)
    body = bytearray(buffer[end + 4:end + 4 + length])
    while len(body) < length:
        body += _recv(sock, deadline)[: length - len(body)]
    return Message(start=start, headers=headers, body=bytes(body))


def write_message(sock: socket.socket, start: str, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
    """``start`` line, headers, ``Content-Length`` (Gloo's client reads exactly that much) and the body."""
    lines = [start, *(f"{name}: {value}" for name, value in (headers or {}).items()),
             f"Content-Length: {len(body)}", "Connection: close", "", ""]
    sock.settimeout(SEND_TIMEOUT_S)
    sock.sendall("\r\n".join(lines).encode("latin-1") + body)


def write_reply(sock: socket.socket, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    write_message(sock, f"HTTP/1.1 {status} {phrase}", body, headers)


def scope_and_key(path: str) -> tuple[str, str]:
    """``/scope/key`` as Gloo's client sends it; anything else is a bad request."""
    parts = path.split("/")
    if (len(path) > MAX_PATH_CHARS or len(parts) != 3 or parts[0] or not parts[1] or not parts[2]
            or not path.isprintable()):
        raise RendezvousRefused(http.HTTPStatus.BAD_REQUEST, f"not a /scope/key path: {path[:80]!r}")
    return parts[1], parts[2]


def parse_request(message: Message) -> tuple[str, str]:
    if len(message.start) != 3 or not message.start[2].startswith("HTTP/1."):
        raise RendezvousRefused(http.HTTPStatus.BAD_REQUEST, "not an HTTP/1.x request line")
    method, path, _ = message.start
    if method not in METHODS:
        raise RendezvousRefused(http.HTTPStatus.METHOD_NOT_ALLOWED, f"method {method[:16]!r}")
    scope_and_key(path)
    return method, path


# -- a bounded threaded TCP server -----------------------------------------------------------------


class _Connection(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.server.serve_connection(self.request)  # type: ignore[attr-defined]


class _BoundedServer(socketserver.ThreadingTCPServer):
    """Daemon request threads, never joined; at most ``max_connections`` at once (more are closed unread)."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], max_connections: int,
                 serve_connection: Callable[[socket.socket], None]) -> None:
        super().__init__(address, _Connection)
        self.max_connections = max_connections
        self.serve_connection = serve_connection
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False

    def verify_request(self, request: socket.socket, client_address: object) -> bool:  # type: ignore[override]
        with self._lock:
            if self._closed or len(self._open) >= self.max_connections:
                return False  # socketserver closes it
            self._open.add(request)
            return True

    def process_request_thread(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._open.discard(request)

    def handle_error(self, request: object, client_address: object) -> None:
        """A broken connection is the client's business: no traceback on the driver's console."""

    def close_all(self) -> None:
        """Stop accepting and cut every open connection, so no request thread outlives the server for long."""
        with self._lock:
            self._closed = True
            still_open = list(self._open)
        self.shutdown()
        self.server_close()  # block_on_close is False: the request threads are not waited for
        for sock in still_open:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Service:
    """Runs a ``_BoundedServer`` on its own daemon thread, as a context manager."""

    def __init__(self, bind_host: str, max_connections: int) -> None:
        self._server = _BoundedServer((bind_host, 0), max_connections, self._serve)
        self.host: str = self._server.server_address[0]
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": SERVER_POLL_INTERVAL_S},
            name=f"{type(self).__name__}-{self.port}", daemon=True,
        )

    def _serve(self, sock: socket.socket) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.close_all()
        else:
            self._server.server_close()

    def __enter__(self: ServiceT) -> ServiceT:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the driver's key-value store ----------------------------------------------------------------


class RendezvousServer(_Service):
    """The run's key-value store on the driver, for its ranks' proxies only (Horovod's semantics for Gloo)."""

    def __init__(self, bind_host: str, size: int, secret: str, max_connections: int | None = None,
                 request_deadline_s: float = REQUEST_DEADLINE_S) -> None:
        limit = max_connections if max_connections is not None else CONNECTIONS_PER_RANK * size + CONNECTION_HEADROOM
        super().__init__(bind_host, limit)
        self._keys = {rank: rendezvous_key(rank_token(secret, rank)) for rank in range(size)}
        self._last_counter = dict.fromkeys(self._keys, 0)
        self._deadline_s = request_deadline_s
        self._store: dict[str, dict[str, bytes]] = {}
        self._lock = threading.Lock()

    def value(self, scope: str, key: str) -> bytes | None:
        """What the store holds (for tests and diagnostics)."""
        with self._lock:
            return self._store.get(scope, {}).get(key)

    def _serve(self, sock: socket.socket) -> None:
        try:
            message = read_message(sock, self._deadline_s)
            method, path = parse_request(message)
            rank, counter = self._authenticate(method, path, message)
        except RendezvousRefused as refused:
            with contextlib.suppress(OSError):
                write_reply(sock, refused.status)
            return
        except OSError:  # too slow, or gone
            return
        status, body = self._apply(method, path, message.body)
        signature = reply_signature(self._keys[rank], counter, status, body)
        with contextlib.suppress(OSError):
            write_reply(sock, status, body, {SIGNATURE_HEADER: signature})

    def _authenticate(self, method: str, path: str, message: Message) -> tuple[int, int]:
        """(rank, counter) of a request signed by one of the run's ranks and never seen before."""
        rank_text = message.headers.get(RANK_HEADER.lower(), "")
        counter_text = message.headers.get(COUNTER_HEADER.lower(), "")
        signature = message.headers.get(SIGNATURE_HEADER.lower(), "")
        if not all(is_decimal(text) and len(text) <= MAX_NUMBER_DIGITS for text in (rank_text, counter_text)):
            raise RendezvousRefused(http.HTTPStatus.UNAUTHORIZED, "an unsigned request")
        rank, counter = int(rank_text), int(counter_text)
        key = self._keys.get(rank)
        if key is None:
            raise RendezvousRefused(http.HTTPStatus.UNAUTHORIZED, f"no rank {rank} in this run")
        expected = request_signature(key, method, path, rank, counter, message.body)
        if not hmac.compare_digest(expected.encode(), signature.encode("latin-1")):
            raise RendezvousRefused(http.HTTPStatus.UNAUTHORIZED, "a wrong signature")
        with self._lock:
            if counter <= self._last_counter[rank]:
                raise RendezvousRefused(http.HTTPStatus.UNAUTHORIZED, "a replayed request")
            self._last_counter[rank] = counter
        return rank, counter

    def _apply(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        """Horovod's ``RendezvousHandler`` for the scopes Gloo uses (no allocation plan: ad-hoc deletes)."""
        scope, key = scope_and_key(path)
        with self._lock:
            if method == "PUT":
                self._store.setdefault(scope, {})[key] = body
                return http.HTTPStatus.OK, b""
            if method == "GET":
                value = self._store.get(scope, {}).get(key)
                return (http.HTTPStatus.NOT_FOUND, b"") if value is None else (http.HTTPStatus.OK, value)
            values = self._store.get(scope, {})
            values.pop(key, None)
            if not values:
                self._store.pop(scope, None)
            return http.HTTPStatus.OK, b""


# -- the rank's loopback proxy ---------------------------------------------------------------------


def _proc_tcp_address(field: str) -> tuple[str, int]:
    """``0100007F:1F90`` (/proc/net/tcp: the IPv4 address as a native-order word, the port in hex)."""
    address, port = field.split(":")
    return socket.inet_ntoa(struct.pack("=I", int(address, 16))), int(port, 16)


def connected_from_this_process(sock: socket.socket) -> bool:
    """True when the peer of an accepted loopback IPv4 connection is a socket of this very process (Linux).

    The kernel lists the client's end in /proc/net/tcp with its inode; this process's descriptors
    (/proc/self/fd) show whether it holds that inode. Anything unreadable counts as a stranger.
    """
    try:
        client, server = sock.getpeername()[:2], sock.getsockname()[:2]
        inode = None
        with open(_PROC_TCP) as table:
            next(table)
            for line in table:
                fields = line.split()
                if (fields[3] == _TCP_ESTABLISHED and _proc_tcp_address(fields[1]) == client
                        and _proc_tcp_address(fields[2]) == server):
                    inode = fields[9]
                    break
        if inode is None or inode == "0":
            return False
        wanted = f"socket:[{inode}]"
        for fd in os.listdir(_PROC_OWN_FDS):
            with contextlib.suppress(OSError):
                if os.readlink(os.path.join(_PROC_OWN_FDS, fd)) == wanted:
                    return True
    except (OSError, ValueError, IndexError, StopIteration):
        return False
    return False


class RendezvousProxy(_Service):
    """In the rank's process, on loopback: what Gloo's client talks to; signs each request for the driver."""

    def __init__(self, driver_host: str, driver_port: int, rank: int, token: str,
                 admit: Callable[[socket.socket], bool] = connected_from_this_process,
                 request_deadline_s: float = REQUEST_DEADLINE_S,
                 forward_deadline_s: float = FORWARD_DEADLINE_S) -> None:
        super().__init__(LOOPBACK, PROXY_MAX_CONNECTIONS)
        self._driver = (driver_host, driver_port)
        self._rank = rank
        self._key = rendezvous_key(token)
        self._admit = admit
        self._deadline_s = request_deadline_s
        self._forward_deadline_s = forward_deadline_s
        self._counter = 0
        self._forward_lock = threading.Lock()  # one request at a time: they reach the driver in counter order

    def _serve(self, sock: socket.socket) -> None:
        if not self._admit(sock):
            return  # closed unanswered: only this process's Gloo may use the rank's key
        try:
            message = read_message(sock, self._deadline_s)
            method, path = parse_request(message)
        except RendezvousRefused as refused:
            with contextlib.suppress(OSError):
                write_reply(sock, refused.status)
            return
        except OSError:
            return
        try:
            status, body = self.forward(method, path, message.body)
        except (OSError, RendezvousRefused):  # Gloo's client retries a few times, then fails hvd.init()
            status, body = http.HTTPStatus.BAD_GATEWAY, b""
        with contextlib.suppress(OSError):
            write_reply(sock, status, body)

    def forward(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        """Sign and send one request to the driver; its (status, body) once the reply's signature is checked."""
        with self._forward_lock:
            self._counter = max(self._counter + 1, time.time_ns())
            counter = self._counter
            headers = {
                "Host": self._driver[0], RANK_HEADER: str(self._rank), COUNTER_HEADER: str(counter),
                SIGNATURE_HEADER: request_signature(self._key, method, path, self._rank, counter, body),
            }
            with socket.create_connection(self._driver, timeout=self._forward_deadline_s) as driver:
                write_message(driver, f"{method} {path} HTTP/1.1", body, headers)
                reply = read_message(driver, self._forward_deadline_s)
        if len(reply.start) < 2 or not is_decimal(reply.start[1]):
            raise RendezvousRefused(http.HTTPStatus.BAD_GATEWAY, "not an HTTP reply")
        status = int(reply.start[1])
        expected = reply_signature(self._key, counter, status, reply.body)
        if not hmac.compare_digest(expected.encode(), reply.headers.get(SIGNATURE_HEADER.lower(), "").encode("latin-1")):
            raise RendezvousRefused(http.HTTPStatus.BAD_GATEWAY, f"an unsigned reply ({status})")
        return status, reply.body
