"""Helpers for tests that start their own Spark JVMs (a standalone cluster, a Connect server).

Each such process runs in its own process group and carries a marker variable in its environment,
so teardown can stop the group and then look for anything left, also after a failure.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

LOCALHOST = "127.0.0.1"
# The suite's JVMs live seconds to a minute or two with little data, on a 2-core machine the suite keeps
# busy: only the quick C1 compiler (no C2 compile threads). Not the product's default: it halves the speed
# of a local read of full MNIST (conf/platform.yaml, benchmarks/RESULTS.md).
QUICK_JIT = "-XX:TieredStopAtLevel=1"
STOP_TIMEOUT_S = 20.0
POLL_S = 0.5
LOG_TAIL_CHARS = 4000


def spark_home() -> Path:
    """pyspark's package folder: it holds bin/spark-class and the jars (the pip package has no sbin/)."""
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


def tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return f"<no {path}>"


def marked_pids(marker_env: str, marker: str) -> list[int]:
    """Pids of live processes whose environment carries ``marker_env=marker`` (inherited by all of them)."""
    needle = f"{marker_env}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone, or not ours
            continue
        if state != "Z" and needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the process group (its leader was started with start_new_session), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(STOP_TIMEOUT_S)
            if sig == signal.SIGTERM:  # give the group's other members (executors) a moment too
                deadline = time.monotonic() + STOP_TIMEOUT_S
                while time.monotonic() < deadline and _group_alive(process.pid):
                    time.sleep(POLL_S)
                if not _group_alive(process.pid):
                    break
        except subprocess.TimeoutExpired:
            continue
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
