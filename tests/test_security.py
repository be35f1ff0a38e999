"""The driver's endpoints against a stranger on the network, secured clusters, secrets in outputs, paths.

A real run (np=2, no data) keeps its ranks alive while this test, from its own sockets, tries what an
attacker on the cluster's network could: connect without the run's secret, forge frames with a
stolen-looking token, announce a 4 GiB frame, open many idle connections. Each assertion fails if
its guard is removed (no hello check, no frame cap, no connection cap, binding every interface).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pyspark import cloudpickle

from rank_logs import rank_lines
from sparkml_mnist.launcher import HorovodRunner, get_context
from sparkml_mnist.launcher.policy import FailurePolicy
from sparkml_mnist.launcher.channel import HELLO_TIMEOUT_S, MAX_FRAME_BYTES, rank_token
from sparkml_mnist.launcher.task.process import rank_workdir
from sparkml_mnist.launcher.failures import PreflightError
from sparkml_mnist.launcher.driver.cluster import ACCEPT_RISK_CONF, check_secured_cluster
from sparkml_mnist.redact import redact

cloudpickle.register_pickle_by_value(sys.modules[__name__])

WAIT_S = 120.0
FORGED = "FORGED-LINE-FROM-A-STRANGER"
IDLE_CONNECTIONS = 200
RSS_GROWTH_LIMIT_KB = 200 * 1024  # a 4 GiB allocation would show as far more


def keep_ranks_alive(folder: str) -> dict[str, Any]:
    """Rank 0 publishes where the driver listens; every rank makes progress until the test says stop."""
    context = get_context()
    strategy = context.strategy  # TensorFlow's gRPC server starts: its binding is read back too
    del strategy
    if context.rank == 0:
        spec = context.spec
        Path(folder, "address.json").write_text(json.dumps(
            {"host": spec.launch.driver_host, "port": spec.launch.driver_port, "addresses": spec.addresses}))
    while not Path(folder, "stop").exists():
        context.report()
        time.sleep(0.2)
    return {"rank": context.rank, "ok": True}


def frame(payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload).encode()
    return struct.pack(">I", len(body)) + body


def closed_by_peer(sock: socket.socket, within_s: float) -> bool:
    """True once the driver closed ``sock``; its challenge (sent first on every connection) is read past."""
    sock.settimeout(within_s)
    try:
        while sock.recv(1 << 16):
            pass
        return True
    except socket.timeout:
        return False
    except OSError:
        return True


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def listeners(port: int) -> set[str]:
    """Local addresses listening on ``port`` (IPv4 and IPv6), read from /proc/net/tcp{,6}."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                if width == 8:
                    found.add(socket.inet_ntoa(struct.pack("<I", int(address, 16))))
                else:  # four little-endian words; an IPv4-mapped address (::ffff:a.b.c.d) as its IPv4 form
                    packed = b"".join(struct.pack("<I", int(address[i:i + 8], 16)) for i in range(0, 32, 8))
                    ip = ipaddress.IPv6Address(packed)
                    found.add(str(ip.ipv4_mapped or ip))
    return found


@pytest.fixture(scope="module")
def attacked_run(spark, tmp_path_factory):
    folder = tmp_path_factory.mktemp("attack")
    runner = HorovodRunner(np=2, spark=spark, driver_log_verbosity="all",
                           policy=FailurePolicy(max_retries=0, progress_timeout_s=60.0))
    collecting = rank_lines()
    lines = collecting.__enter__()
    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: outcome.update(records=runner.run_all(keep_ranks_alive, folder=str(folder)).records))
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not (folder / "address.json").exists() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    address = json.loads((folder / "address.json").read_text())
    found: dict[str, Any] = {"address": address}
    host, port = address["host"], address["port"]

    # 1. no hello: a forged log line straight away
    with socket.create_connection((host, port)) as sock:
        sock.sendall(frame({"type": "log", "stream": "stdout", "line": FORGED}))
        found["no_hello_closed"] = closed_by_peer(sock, HELLO_TIMEOUT_S + 5)
    # 2. a stolen-looking token (right shape, wrong secret) with forged done / progress / log frames
    with socket.create_connection((host, port)) as sock:
        sock.sendall(frame({"type": "hello", "rank": 0, "token": rank_token("guessed" * 8, 0)}))
        for forged in ({"type": "heartbeat", "progress": 10**12, "done": True},
                       {"type": "log", "stream": "stderr", "line": FORGED + "\x1b[2J"}):
            try:
                sock.sendall(frame(forged))
            except OSError:
                pass
        found["stolen_token_closed"] = closed_by_peer(sock, HELLO_TIMEOUT_S + 5)
    # 3. ranks outside 0..size-1
    found["bad_ranks_closed"] = []
    for rank in (-1, 7):
        with socket.create_connection((host, port)) as sock:
            sock.sendall(frame({"type": "hello", "rank": rank, "token": "0" * 64}))
            found["bad_ranks_closed"].append(closed_by_peer(sock, HELLO_TIMEOUT_S + 5))
    # 4. a header announcing 4 GiB: refused before anything is allocated
    before = rss_kb()
    with socket.create_connection((host, port)) as sock:
        sock.sendall(struct.pack(">I", 0xFFFFFFFF) + b"x" * 1024)
        found["huge_header_closed"] = closed_by_peer(sock, HELLO_TIMEOUT_S + 5)
    found["rss_growth_kb"] = rss_kb() - before
    # 5. many idle connections: the cap closes the excess at once
    idle = []
    for _ in range(IDLE_CONNECTIONS):
        try:
            idle.append(socket.create_connection((host, port), timeout=5))
        except OSError:
            break
    time.sleep(1.0)
    found["idle_closed_at_once"] = sum(closed_by_peer(sock, 0.05) for sock in idle)
    for sock in idle:
        sock.close()
    found["channel_listeners"] = listeners(port)
    found["rank_listeners"] = [listeners(int(a.rsplit(":", 1)[1])) for a in address["addresses"]]

    (folder / "stop").write_text("done")
    thread.join(WAIT_S)
    collecting.__exit__(None, None, None)
    found["records"] = outcome.get("records")
    found["lines"] = lines
    return found


def test_a_stranger_without_the_runs_secret_is_dropped_and_changes_nothing(attacked_run) -> None:
    assert attacked_run["no_hello_closed"] and attacked_run["stolen_token_closed"]
    assert attacked_run["bad_ranks_closed"] == [True, True]
    assert not any(FORGED in line for _, line in attacked_run["lines"])  # nothing printed
    records = attacked_run["records"]
    assert records is not None and [r.value for r in records] == [{"rank": 0, "ok": True}, {"rank": 1, "ok": True}]


def test_an_oversized_header_is_refused_before_any_allocation(attacked_run) -> None:
    assert attacked_run["huge_header_closed"]
    assert attacked_run["rss_growth_kb"] < RSS_GROWTH_LIMIT_KB
    assert MAX_FRAME_BYTES < 0xFFFFFFFF


def test_idle_connections_are_capped(attacked_run) -> None:
    cap = max(8, 4 * 2)  # ChannelServer's pending (not yet authenticated) connections per address, two ranks
    assert attacked_run["idle_closed_at_once"] >= IDLE_CONNECTIONS - cap


def test_the_channel_binds_the_drivers_address_not_every_interface(attacked_run) -> None:
    host = socket.gethostbyname(attacked_run["address"]["host"])
    assert attacked_run["channel_listeners"] == {host}
    # TensorFlow's gRPC server binds every interface whatever TF_CONFIG says (grpc_server_lib.cc uses
    # "0.0.0.0:<port>"): what README's Security section tells operators to firewall.
    assert all(found & {"0.0.0.0", "::"} for found in attacked_run["rank_listeners"])


def _session(conf: dict[str, str]) -> Any:
    return SimpleNamespace(conf=SimpleNamespace(get=lambda key, default=None: conf.get(key, default)))


@pytest.mark.parametrize("setting", ["spark.authenticate", "spark.network.crypto.enabled", "spark.ssl.enabled"])
def test_a_secured_cluster_is_refused_unless_the_risk_is_accepted(setting: str) -> None:
    with pytest.raises(PreflightError, match=rf"{setting}=true.*neither encrypted nor authenticated.*{ACCEPT_RISK_CONF}=true"):
        check_secured_cluster(_session({setting: "true"}))
    warning = check_secured_cluster(_session({setting: "true", ACCEPT_RISK_CONF: "true"}))
    assert warning is not None and ACCEPT_RISK_CONF in warning
    assert check_secured_cluster(_session({"spark.master": "local[2]"})) is None


URI_SECRET = "SECRETinURI0004"


def test_no_secret_reaches_an_output_file_or_the_console(trained_run, tmp_path: Path) -> None:
    """The session's trained run (tests/conftest.py) ran at -v with secrets planted in its environment: a
    token, a Spark conf through PYSPARK_SUBMIT_ARGS, credentials in MLFLOW_TRACKING_URI."""
    failed = subprocess.run(  # a credential inside a data URI, named by the error
        [sys.executable, "-m", "sparkml_mnist.cli", "train", "--variant", "variant1", "--np", "-1",
         "--train", f"s3a://AKIAEXAMPLE:{URI_SECRET}@bucket/train.txt",
         "--test", f"https://bucket.example/test.txt?X-Amz-Signature={URI_SECRET}", "--output", str(tmp_path / "x")],
        capture_output=True, text=True, env={**os.environ, **trained_run.env}, timeout=600,
    )
    assert failed.returncode != 0
    planted = [*trained_run.planted_secrets, URI_SECRET]
    assert len(planted) >= 4 and all(secret in "".join(trained_run.env.values()) for secret in trained_run.planted_secrets)
    assert "s3a://***@bucket/train.txt" in failed.stdout + failed.stderr  # named, masked
    console = trained_run.stdout + trained_run.stderr + failed.stdout + failed.stderr
    assert [secret for secret in planted if secret in console] == []
    written = [path for path in trained_run.output.rglob("*") if path.is_file()]
    assert written and [p for p in written if any(s.encode() in p.read_bytes() for s in planted)] == []


def test_credentials_in_uris_are_masked() -> None:
    assert redact("s3a://KEY:SECRET@bucket/x") == "s3a://***@bucket/x"
    assert redact("https://h/x?sig=abc&x=1&X-Amz-Credential=k") == "https://h/x?sig=***&x=1&X-Amz-Credential=***"
    assert redact("/dbfs/data/mnist-digits-train.txt") == "/dbfs/data/mnist-digits-train.txt"


def test_work_folders_are_private_to_the_user() -> None:
    with rank_workdir(0) as folder:
        assert folder.stat().st_mode & 0o777 == 0o700


# --------------------------------------------------------------------------------------------
# What the ranks listen on, said once on a cluster without Spark's security
# --------------------------------------------------------------------------------------------

CLUSTER = {"spark.master": "spark://cluster:7077"}


class _ConnectConf:
    """Spark Connect's conf: the cluster's core settings cannot be read from the session."""

    def get(self, key: str, default: str | None = None) -> str | None:
        if key.startswith(("spark.authenticate", "spark.network.", "spark.ssl.")):
            raise RuntimeError(f"[CANNOT_MODIFY_CONFIG] {key}")
        return CLUSTER.get(key, default)


@pytest.mark.parametrize("backend, listeners", [
    ("tf", "TensorFlow's gRPC server on each rank (every interface"),
    ("jax", "JAX's coordinator on rank 0 (its address) and XLA's collectives"),
    ("horovod", "Gloo's ports on each rank"),
    (None, "TensorFlow's gRPC, Gloo, JAX's coordinator"),
])
def test_a_cluster_without_sparks_security_gets_one_line_naming_the_backends_listeners(backend, listeners) -> None:
    warning = check_secured_cluster(_session(CLUSTER), backend)
    assert warning is not None and "\n" not in warning
    assert "Spark's security is off" in warning and listeners in warning and "without authentication" in warning
    assert "README, 'Security'" in warning


def test_unreadable_security_settings_are_said_too() -> None:
    warning = check_secured_cluster(SimpleNamespace(conf=_ConnectConf()), "jax")
    assert warning is not None and "cannot be read" in warning and "spark.authenticate" in warning
    assert "JAX's coordinator" in warning


@pytest.mark.parametrize("master", ["local", "local[4]", "local[*]"])
def test_a_local_master_gets_no_warning(master: str) -> None:
    assert check_secured_cluster(_session({"spark.master": master}), "tf") is None


# --------------------------------------------------------------------------------------------
# What a rank sends that reaches the console: the progress label and host, one plain line each
# --------------------------------------------------------------------------------------------

# Terminal escapes, a tab, C1 controls, bidi overrides (text shown reversed), zero-width and line separators.
HOSTILE = "\x1b]0;owned\x07\x1b[2J\x9b31m\tA\u202eB\u2066\u200bC\u2028D\u2029E\x85F\r\nG"
UNSAFE_CHARACTERS = set("\x1b\x07\t\x9b\u202e\u2066\u200b\u2028\u2029\x85\r\n")


def test_a_ranks_label_and_host_reach_the_board_as_one_plain_line() -> None:
    from sparkml_mnist.launcher.driver.board import LiveBoard
    from sparkml_mnist.launcher.protocol import Heartbeat

    board = LiveBoard(2)
    board.update(0, Heartbeat.from_message({"type": "heartbeat", "label": HOSTILE, "host": HOSTILE, "steps": 3}))
    board.task_started(1, HOSTILE)
    lines = board.lines()
    assert len(lines) == 2 and all(not UNSAFE_CHARACTERS & set(line) for line in lines), lines
    assert "ABCDEFG" in lines[0] and "ABCDEFG" in lines[1]  # the printable text is kept
    assert board.summary()["straggler"] is None


@pytest.mark.parametrize("uri, masked", [
    ("https://login.example/token?client_id=app&client_secret=S3cr3t&grant_type=x",
     "https://login.example/token?client_id=app&client_secret=***&grant_type=x"),
    ("https://h/cb?refresh_token=R1&state=ok", "https://h/cb?refresh_token=***&state=ok"),
    ("https://h/x?sessionToken=T0k&region=eu", "https://h/x?sessionToken=***&region=eu"),
    ("https://h/x?session_token=T0k", "https://h/x?session_token=***"),
    ("https://h/x?X-Amz-Security-Token=T0k", "https://h/x?X-Amz-Security-Token=***"),
    ("https://app/cb#access_token=A1&token_type=bearer&expires_in=3600",
     "https://app/cb#access_token=***&token_type=bearer&expires_in=3600"),
    ("https://app/cb#id_token=eyJ.x.y&state=s", "https://app/cb#id_token=***&state=s"),
    ("https://h/x?api_key=K1&api-key=K2&x-api-key=K3&apiKey=K4",
     "https://h/x?api_key=***&api-key=***&x-api-key=***&apiKey=***"),
    ("https://h/x?access_key=AK&secret_key=SK&account_key=AC",
     "https://h/x?access_key=***&secret_key=***&account_key=***"),
    ("https://h/x?auth_token=T&client_assertion=J", "https://h/x?auth_token=***&client_assertion=***"),
])
def test_oauth_and_session_credentials_in_uris_are_masked(uri: str, masked: str) -> None:
    assert redact(uri) == masked
    assert redact(f"failed to read {uri} (HTTP 403)") == f"failed to read {masked} (HTTP 403)"


def test_ordinary_query_values_are_kept() -> None:
    kept = "https://h/x?page=2&tokenizer=bpe&keyboard=us&monkey=1&state=ok#section-2"
    assert redact(kept) == kept
