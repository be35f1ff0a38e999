"""Finding a run's rank processes from outside (as an operator or a chaos test would), and driving the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

CHILD_MODULE = b"sparkml_mnist.launcher.rank.main"
POLL_S = 0.2


MARK_ENV = "SPARKML_MNIST_TEST_MARK"


def rank_pids(mark: str | None = None, mark_env: str = MARK_ENV) -> dict[int, int]:
    """rank -> pid of the live rank processes on this machine (its work folder's spec names the rank);
    with ``mark``, only those whose environment carries ``<mark_env>=<mark>`` (this test's own)."""
    needle = f"{mark_env}={mark}".encode() if mark else None
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle is not None:
            try:
                if needle not in (entry / "environ").read_bytes().split(b"\0"):
                    continue
            except OSError:
                continue
        if CHILD_MODULE in args and state != "Z":
            workdir = Path(args[args.index(CHILD_MODULE) + 1].decode())
            try:
                found[json.loads((workdir / "spec.json").read_text())["rank"]] = int(entry.name)
            except (OSError, ValueError, KeyError):
                continue
    return found


class CliRun:
    """``sparkml-mnist ARGS`` in its own process (``new_session``: and its own process group, which a test can
    kill whole: the driver, its JVM, the ranks); its combined output is read line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, log: Path, new_session: bool = False) -> None:
        self.log = log
        self.mark = uuid.uuid4().hex  # its rank processes inherit it: rank_pids(run.mark) finds only them
        self._out = open(log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sparkml_mnist.cli", *args], stdout=self._out, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {}), MARK_ENV: self.mark}, start_new_session=new_session,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, timeout_s: float) -> bool:
        """Poll until ``needle`` is printed (True), the process ends, or ``timeout_s`` passes (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if needle in self.text():
                return True
            if self.process.poll() is not None:
                return needle in self.text()
            time.sleep(POLL_S)
        return False

    def finish(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout_s)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._out.close()
