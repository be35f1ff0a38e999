"""The ``horovod`` backend.

Here, in the default environment (TF 2.21, no Horovod): what can be checked without Horovod, and
the clear error when it is asked for. Then the backend's real suite, tests/horovod_env, run with
the Horovod environment's python: this module builds that environment with
scripts/make_horovod_env.sh (pip's wheel cache keeps the Horovod build for later runs), or uses
the one ``SPARKML_MNIST_HOROVOD_PYTHON`` names.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import HOROVOD_SUITE_DIR, HOROVOD_SUITE_ENV
from sparkml_mnist.cli import commands as cli
from sparkml_mnist.launcher import HorovodRunner
from sparkml_mnist.launcher.backends import rendezvous
from sparkml_mnist.launcher.backends.horovod import (
    RENDEZVOUS_ADDR_ENV,
    RENDEZVOUS_PORT,
    RENDEZVOUS_PORT_ENV,
    HorovodDriverBackend,
    HorovodRankBackend,
    horovod_slot,
)
from sparkml_mnist.launcher.channel import rank_token
from sparkml_mnist.launcher.policy import FailurePolicy
from sparkml_mnist.launcher.spec import LaunchSpec, RankSpec
from sparkml_mnist.errors import ConfigError, LaunchError

pytestmark = pytest.mark.horovod

REPO = Path(__file__).resolve().parents[1]
HOROVOD_VENV = REPO / ".venv-horovod"
MAKE_ENV_SCRIPT = REPO / "scripts" / "make_horovod_env.sh"
HOROVOD_PYTHON_ENV = "SPARKML_MNIST_HOROVOD_PYTHON"
INNER_SUITE_TESTS = 8  # tests/horovod_env collects this many: fewer passing means some did not run
BUILD_TIMEOUT_S = 3600
SUITE_TIMEOUT_S = 1800
OUTPUT_TAIL = 6000


def spec_for(rank: int, hosts: list[str], **changes) -> RankSpec:
    settings = dict(size=len(hosts), backend="horovod", policy=FailurePolicy(), driver_host="127.0.0.1",
                    driver_port=4000, backend_options={RENDEZVOUS_PORT: 4321})
    launch = LaunchSpec(**{**settings, **changes})
    return launch.for_rank(rank, hosts, [5000 + i for i in range(len(hosts))], [])


def test_asking_for_horovod_without_it_says_how_to_install(spark) -> None:
    with pytest.raises(ConfigError) as caught:
        HorovodRunner(np=2, spark=spark, backend="horovod")
    message = str(caught.value)
    assert "Horovod is not installed" in message and "scripts/make_horovod_env.sh" in message


def test_the_cli_refuses_horovod_here_before_any_spark_work(capsys, monkeypatch) -> None:
    def no_spark(*args, **kwargs):
        raise AssertionError("Spark was started")

    monkeypatch.setattr("sparkml_mnist.cli.session.create_spark", no_spark)
    assert cli.main(["train", "--backend", "horovod", "--variant", "variant1", "--epochs", "1"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("sparkml-mnist: error: backend 'horovod' was asked for") and "make_horovod_env.sh" in error


def test_ranks_are_placed_as_horovod_places_them() -> None:
    # Two hosts, two ranks each, interleaved as Spark may schedule barrier tasks.
    hosts = ["a", "b", "a", "b"]
    assert [(p.local_rank, p.local_size, p.cross_rank, p.cross_size) for p in (horovod_slot(hosts, r) for r in range(4))] == [
        (0, 2, 0, 2), (0, 2, 1, 2), (1, 2, 0, 2), (1, 2, 1, 2),
    ]
    # Uneven hosts: local rank 1 exists only on host a.
    hosts = ["a", "a", "b"]
    assert [(p.local_rank, p.cross_rank, p.cross_size) for p in (horovod_slot(hosts, r) for r in range(3))] == [
        (0, 0, 2), (1, 0, 1), (0, 1, 2),
    ]


def test_each_rank_gets_horovods_gloo_environment() -> None:
    env = HorovodDriverBackend().environment(spec_for(1, ["127.0.0.1", "127.0.0.1"], policy=FailurePolicy(collective_timeout_s=42.5)))
    assert env["HOROVOD_RANK"] == "1" and env["HOROVOD_SIZE"] == "2"
    assert (env["HOROVOD_LOCAL_RANK"], env["HOROVOD_LOCAL_SIZE"]) == ("1", "2")
    assert (env["HOROVOD_CROSS_RANK"], env["HOROVOD_CROSS_SIZE"]) == ("0", "1")
    # Gloo talks to the rank's own loopback proxy (its port is set once it listens), never to the driver.
    assert env["HOROVOD_GLOO_RENDEZVOUS_ADDR"] == "127.0.0.1" and "HOROVOD_GLOO_RENDEZVOUS_PORT" not in env
    assert env["HOROVOD_CONTROLLER"] == env["HOROVOD_CPU_OPERATIONS"] == "gloo"
    assert env["HOROVOD_GLOO_IFACE"] == "lo" and env["HOROVOD_HOSTNAME"] == "127.0.0.1"
    assert env["HOROVOD_GLOO_TIMEOUT_SECONDS"] == "42"


def test_a_host_on_no_interface_of_this_machine_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.delenv("HOROVOD_GLOO_IFACE", raising=False)
    with pytest.raises(LaunchError, match=r"rank 0: no network interface .* 'not-a-host\.invalid'.*HOROVOD_GLOO_IFACE"):
        HorovodDriverBackend().environment(spec_for(0, ["not-a-host.invalid"]))
    with pytest.raises(LaunchError, match="rendezvous server"):
        HorovodDriverBackend().environment(spec_for(0, ["127.0.0.1"], backend_options={}))


# -- the rendezvous: the driver's store and each rank's proxy (no Horovod needed) -------------------

SIZE = 2
QUICK_S = 1.0  # how long a prompt answer may take on a busy CI machine
SHORT_DEADLINE_S = 1.0
DRIP_INTERVAL_S = 0.2


def http_exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` as one request on a fresh connection (as Gloo's client does); the reply."""
    with socket.create_connection((rendezvous.LOOPBACK, port), timeout=10) as sock:
        sock.sendall(raw)
        reply = rendezvous.read_message(sock, 10)
    return int(reply.start[1]), reply.headers, reply.body


def gloo_request(method: str, path: str, body: bytes = b"") -> bytes:
    """What Horovod's C++ client (elnormous/HTTPRequest) writes: no credentials."""
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def signed_request(token: str, rank: int, counter: int, method: str, path: str, body: bytes = b"") -> bytes:
    signature = rendezvous.request_signature(rendezvous.rendezvous_key(token), method, path, rank, counter, body)
    return (
        f"{method} {path} HTTP/1.1\r\nContent-Length: {len(body)}\r\n{rendezvous.RANK_HEADER}: {rank}\r\n"
        f"{rendezvous.COUNTER_HEADER}: {counter}\r\n{rendezvous.SIGNATURE_HEADER}: {signature}\r\n\r\n"
    ).encode() + body


@pytest.fixture
def store():
    """The driver's rendezvous for a run of two ranks, with rank 0's proxy: (secret, driver port, proxy)."""
    secret = secrets.token_hex(16)
    with HorovodDriverBackend().driver_session(SIZE, rendezvous.LOOPBACK, secret) as options:
        port = options[RENDEZVOUS_PORT]
        with rendezvous.RendezvousProxy(rendezvous.LOOPBACK, port, 0, rank_token(secret, 0)) as proxy:
            yield secret, port, proxy


def test_the_proxy_and_the_store_serve_put_get_and_delete_as_gloo_expects(store) -> None:
    _, _, proxy = store
    address = b"\x02\x00\x13\x88" * 8  # what a Gloo pair's address looks like: bytes, not text
    assert http_exchange(proxy.port, gloo_request("PUT", "/global/0", address))[0] == 200
    status, headers, body = http_exchange(proxy.port, gloo_request("GET", "/global/0"))
    assert (status, body) == (200, address) and headers["content-length"] == str(len(address))
    assert http_exchange(proxy.port, gloo_request("GET", "/global/1"))[0] == 404  # Gloo waits and asks again
    assert http_exchange(proxy.port, gloo_request("DELETE", "/global/0"))[0] == 200  # Finalize
    assert http_exchange(proxy.port, gloo_request("GET", "/global/0"))[0] == 404
    # Gloo's client finds the length by the header's exact name, "Content-Length".
    with socket.create_connection((rendezvous.LOOPBACK, proxy.port), timeout=10) as sock:
        sock.sendall(gloo_request("GET", "/global/1"))
        assert b"\r\nContent-Length: 0\r\n" in sock.recv(4096)


def test_a_strangers_put_without_or_with_a_wrong_signature_is_refused_and_changes_nothing(store) -> None:
    secret, port, proxy = store
    assert http_exchange(proxy.port, gloo_request("PUT", "/global/1", b"rank 1's address"))[0] == 200
    attacker = b"attacker's address"
    assert http_exchange(port, gloo_request("PUT", "/global/1", attacker))[0] == 401  # Horovod's client's way
    another_run = rank_token(secrets.token_hex(16), 1)
    assert http_exchange(port, signed_request(another_run, 1, time.time_ns(), "PUT", "/global/1", attacker))[0] == 401
    no_such_rank = rank_token(secret, SIZE)
    assert http_exchange(port, signed_request(no_such_rank, SIZE, time.time_ns(), "PUT", "/global/1", attacker))[0] == 401
    # Rank 1's valid signature over another body, or another key, does not carry over.
    forged = signed_request(rank_token(secret, 1), 1, time.time_ns(), "PUT", "/global/1", b"x" * len(attacker))
    assert http_exchange(port, forged.replace(b"x" * len(attacker), attacker))[0] == 401
    assert http_exchange(port, gloo_request("DELETE", "/global/1"))[0] == 401
    status, _, body = http_exchange(proxy.port, gloo_request("GET", "/global/1"))
    assert (status, body) == (200, b"rank 1's address")


def test_a_replayed_signed_request_is_refused(store) -> None:
    secret, port, proxy = store
    token = rank_token(secret, 1)
    first = signed_request(token, 1, time.time_ns(), "PUT", "/global/1", b"first address")
    assert http_exchange(port, first)[0] == 200
    assert http_exchange(port, signed_request(token, 1, time.time_ns(), "PUT", "/global/1", b"second address"))[0] == 200
    assert http_exchange(port, first)[0] == 401  # captured and sent again
    assert http_exchange(proxy.port, gloo_request("GET", "/global/1"))[2] == b"second address"


def test_an_oversized_body_is_refused_before_it_is_read(store) -> None:
    secret, port, proxy = store
    for target in (port, proxy.port):
        for declared in (str(rendezvous.MAX_BODY_BYTES + 1), "9" * 5000):
            with socket.create_connection((rendezvous.LOOPBACK, target), timeout=10) as sock:
                # Only the head: the answer must come although not one byte of the body was sent.
                sock.sendall(f"PUT /global/0 HTTP/1.1\r\nContent-Length: {declared}\r\n\r\n".encode())
                reply = rendezvous.read_message(sock, 10)
            assert int(reply.start[1]) == 413, (target, declared[:10])
    assert http_exchange(proxy.port, gloo_request("GET", "/global/0"))[0] == 404


def test_a_malformed_request_gets_an_answer_not_a_dropped_thread(store) -> None:
    _, port, proxy = store
    for target in (port, proxy.port):
        assert http_exchange(target, b"PUT /global/0 HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n")[0] == 400  # a latin-1 "2"
        assert http_exchange(target, gloo_request("PUT", "/global/0/extra", b"x"))[0] == 400
        assert http_exchange(target, gloo_request("POST", "/global/0", b"x"))[0] == 405
        assert http_exchange(target, b"GET /global/0 HTTP/1.1\r\nX-Padding: " + b"a" * 2 * rendezvous.MAX_HEAD_BYTES)[0] == 431


def _drip(port: int, stop: threading.Event, closed_at: list[float]) -> None:
    """A client that sends a request line a byte at a time and never finishes it."""
    with socket.create_connection((rendezvous.LOOPBACK, port), timeout=10) as sock:
        try:
            for byte in b"PUT /global/0 HTTP/1.1\r\nContent-Length: 3\r\n" * 100:
                sock.sendall(bytes([byte]))
                sock.settimeout(DRIP_INTERVAL_S)
                try:
                    if sock.recv(1024) == b"":
                        break  # the server hung up
                except TimeoutError:
                    pass
                if stop.is_set():
                    return
        except OSError:
            pass
        closed_at.append(time.monotonic())


def test_a_slow_client_cannot_stretch_a_request_past_its_deadline() -> None:
    """One deadline for the whole request: bytes arriving in time do not extend it."""
    stop, closed_at = threading.Event(), []
    with rendezvous.RendezvousServer(rendezvous.LOOPBACK, SIZE, "secret", request_deadline_s=SHORT_DEADLINE_S) as server:
        started = time.monotonic()
        client = threading.Thread(target=_drip, args=(server.port, stop, closed_at), daemon=True)
        client.start()
        client.join(SHORT_DEADLINE_S + 4 * QUICK_S)
        stop.set()
    assert closed_at, "the server still served a client that kept dripping bytes"
    assert closed_at[0] - started < SHORT_DEADLINE_S + 2 * QUICK_S


def test_closing_the_rendezvous_does_not_wait_for_a_slow_client() -> None:
    stop, closed_at = threading.Event(), []
    with HorovodDriverBackend().driver_session(SIZE, rendezvous.LOOPBACK, "secret") as options:
        client = threading.Thread(target=_drip, args=(options[RENDEZVOUS_PORT], stop, closed_at), daemon=True)
        client.start()
        time.sleep(3 * DRIP_INTERVAL_S)  # the server's thread is now in the middle of the request line
        leaving = time.monotonic()
    assert time.monotonic() - leaving < QUICK_S  # although the client still holds its connection
    client.join(QUICK_S + DRIP_INTERVAL_S)
    stop.set()
    assert closed_at, "the client's connection stayed open after the server closed"


def test_connections_are_capped() -> None:
    with rendezvous.RendezvousServer(rendezvous.LOOPBACK, SIZE, "secret", max_connections=2) as server:
        held = [socket.create_connection((rendezvous.LOOPBACK, server.port), timeout=10) for _ in range(2)]
        try:
            time.sleep(DRIP_INTERVAL_S)  # both accepted and being read
            with socket.create_connection((rendezvous.LOOPBACK, server.port), timeout=10) as extra:
                assert extra.recv(1024) == b""  # closed unread at once
        finally:
            for sock in held:
                sock.close()


def test_the_proxy_serves_its_own_process_only(store) -> None:
    _, _, proxy = store
    stranger = (
        "import socket, sys\n"
        "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=10)\n"
        "s.sendall(b'PUT /global/0 HTTP/1.1\\r\\nContent-Length: 4\\r\\n\\r\\nevil')\n"
        "print(repr(s.recv(1024)))\n"
    )
    result = subprocess.run([sys.executable, "-c", stranger, str(proxy.port)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "b''", result.stdout + result.stderr
    assert http_exchange(proxy.port, gloo_request("GET", "/global/0"))[0] == 404


def test_the_proxy_never_passes_on_an_unsigned_reply() -> None:
    """Whoever answers in the driver's place cannot hand Gloo an address: the reply must carry the rank's HMAC."""
    with socket.create_server((rendezvous.LOOPBACK, 0)) as impostor:
        def answer() -> None:
            connection, _ = impostor.accept()
            with connection:
                rendezvous.read_message(connection, 10)
                rendezvous.write_reply(connection, 200, b"attacker's address")

        threading.Thread(target=answer, daemon=True).start()
        token = rank_token("secret", 0)
        with rendezvous.RendezvousProxy(rendezvous.LOOPBACK, impostor.getsockname()[1], 0, token) as proxy:
            status, _, body = http_exchange(proxy.port, gloo_request("GET", "/global/1"))
            assert (status, body) == (502, b"")


def test_the_rank_points_gloo_at_its_proxy_which_reaches_the_drivers_store(monkeypatch) -> None:
    for name in (RENDEZVOUS_ADDR_ENV, RENDEZVOUS_PORT_ENV):
        monkeypatch.delenv(name, raising=False)  # restored after the test
    secret = secrets.token_hex(16)
    with HorovodDriverBackend().driver_session(SIZE, rendezvous.LOOPBACK, secret) as options:
        spec = spec_for(1, ["127.0.0.1", "127.0.0.1"], backend_options=options, secret=secret)
        assert secret not in repr(spec) and secret not in str(spec.backend_options)  # the rank gets its token only
        backend = HorovodRankBackend(spec)
        backend.start()
        try:
            assert os.environ[RENDEZVOUS_ADDR_ENV] == "127.0.0.1"
            port = int(os.environ[RENDEZVOUS_PORT_ENV])
            assert port != options[RENDEZVOUS_PORT]
            assert http_exchange(port, gloo_request("PUT", "/local_127.0.0.1/1", b"addr"))[0] == 200
            assert http_exchange(port, gloo_request("GET", "/local_127.0.0.1/1"))[2] == b"addr"
        finally:
            backend.shutdown()


def test_an_unknown_optimisation_level_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    env = {**os.environ, "SPARKML_MNIST_HOROVOD_OPT": "-O9"}
    done = subprocess.run(["bash", str(MAKE_ENV_SCRIPT), str(tmp_path / "venv")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "SPARKML_MNIST_HOROVOD_OPT=-O9 is not one of" in done.stderr
    assert list(tmp_path.iterdir()) == []  # no venv, no lock


@pytest.fixture(scope="module")
def horovod_python() -> str:
    """The Horovod environment's python: SPARKML_MNIST_HOROVOD_PYTHON, else built (or brought up to date)."""
    given = os.environ.get(HOROVOD_PYTHON_ENV)
    if given:
        return given
    built = subprocess.run(
        ["bash", str(MAKE_ENV_SCRIPT), str(HOROVOD_VENV)], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
    )
    if built.returncode != 0:
        pytest.fail(f"{MAKE_ENV_SCRIPT} failed (exit {built.returncode}):\n{(built.stdout + built.stderr)[-OUTPUT_TAIL:]}")
    return str(HOROVOD_VENV / "bin" / "python")


def test_the_horovod_suite_passes_in_the_horovod_environment(horovod_python: str) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYSPARK_")}  # its own python
    env[HOROVOD_SUITE_ENV] = "1"
    result = subprocess.run(
        # pytest.ini's addopts ask for pytest-xdist workers, which the Horovod environment does not have.
        [horovod_python, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider", "-q", "-rA",
         f"tests/{HOROVOD_SUITE_DIR}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=SUITE_TIMEOUT_S,
    )
    output = result.stdout + result.stderr
    sys.stdout.write(output[-OUTPUT_TAIL:])  # shown with -rA / on failure: each inner test's outcome
    passed = re.search(r"(\d+) passed", output)
    assert result.returncode == 0, f"the Horovod suite failed (exit {result.returncode}):\n{output[-OUTPUT_TAIL:]}"
    assert passed and int(passed.group(1)) == INNER_SUITE_TESTS, output[-OUTPUT_TAIL:]
