"""Start one rank's training process, stream its output, and collect its record or its crash.

Used by the barrier task (one per task) and by the driver-only mode (``-np`` of them). The
process is killed on every way out of ``RankProcess`` (and dies by itself if its parent
dies), so no trainer outlives its run.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator

from sparkml_mnist.launcher.rank.main import PARENT_PID_ENV, RANK_CORES_ENV, STATUS_FD_ENV
from sparkml_mnist.launcher.failures import CRASH, RankError, RankRecord
from sparkml_mnist.launcher.spec import PAYLOAD_FILE, RECORD_FILE, VALUE_FILE, RankSpec

CHILD_MODULE = "sparkml_mnist.launcher.rank.main"
SPARK_LOCAL_DIRS_ENV = "SPARK_LOCAL_DIRS"  # set by Spark for Python workers on executors
WORKDIR_PREFIX = "sparkml-mnist-rank"
OWNER_FILE = "owner.pid"
STDERR_TAIL_LINES = 40
EXIT_GRACE_S = 5.0  # how long a released process may take to exit before it is killed
CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
NO_GPUS = ""  # CUDA_VISIBLE_DEVICES="" hides every GPU: the rank trains on CPU
THREAD_ENVS = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS")
TF_LOG_LEVEL_ENV = "TF_CPP_MIN_LOG_LEVEL"
TF_LOG_LEVEL_DEFAULT = "1"  # hide TensorFlow's C++ INFO lines; warnings and errors still show

LineSink = Callable[[str, str], None]  # (stream name, line)


@dataclass
class RankOutcome:
    """A finished rank: its record (with ``error`` set if it raised or crashed) and pickled value."""

    record: RankRecord
    value_bytes: bytes


def work_root() -> Path:
    """Where rank work folders go: Spark's local directory on an executor, else the temporary folder."""
    local_dirs = os.environ.get(SPARK_LOCAL_DIRS_ENV, "")
    first = next((part for part in local_dirs.split(",") if part.strip()), None)
    return Path(first.strip()) if first else Path(tempfile.gettempdir())


def sweep_work_folders(root: Path) -> list[Path]:
    """Remove rank work folders whose owner (the task's Python worker) is gone: a task Spark SIGKILLed
    never ran its cleanup. Returns what was removed."""
    removed = []
    for folder in root.glob(f"{WORKDIR_PREFIX}*"):
        try:
            owner = int((folder / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours, or being created right now
        if not _alive(owner):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def rank_workdir(rank: int) -> Iterator[Path]:
    """The rank's work folder (spec, payload, partition, results), private to the user (0700).

    Its one owner creates and removes it; folders of killed tasks are swept when the next one starts.
    """
    root = work_root()
    root.mkdir(parents=True, exist_ok=True)
    sweep_work_folders(root)
    workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{rank}-", dir=root))  # mkdtemp: mode 0700
    (workdir / OWNER_FILE).write_text(str(os.getpid()))
    try:
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def free_port() -> int:
    """A TCP port free on this host right now.

    The socket is closed before the rank's gRPC server binds the port (TensorFlow's server does
    not share ports, even with SO_REUSEPORT), so the window in which another program could take
    it is kept short: the port is chosen just before the ranks exchange addresses.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def child_environment(spec: RankSpec, backend_env: dict[str, str]) -> dict[str, str]:
    """This process's environment plus what the rank must have before TensorFlow is imported."""
    env = dict(os.environ)
    env.update(backend_env)
    env[CUDA_VISIBLE_DEVICES] = ",".join(spec.gpus) if spec.gpus else NO_GPUS
    if spec.threads and not spec.gpus:
        for name in THREAD_ENVS:  # ranks sharing a machine split its cores instead of oversubscribing
            env[name] = str(spec.threads)
        cores = rank_cores(spec) if spec.launch.pin_cores else None
        if cores:
            env[RANK_CORES_ENV] = ",".join(str(core) for core in cores)
    env.setdefault(TF_LOG_LEVEL_ENV, TF_LOG_LEVEL_DEFAULT)
    env["PYTHONUNBUFFERED"] = "1"
    env[PARENT_PID_ENV] = str(os.getpid())
    shipped = shipped_code_paths()
    if shipped:  # the rank's interpreter must import the package (and the user's code) as this one does
        env["PYTHONPATH"] = os.pathsep.join([*shipped, *filter(None, [env.get("PYTHONPATH")])])
    return env


def rank_cores(spec: RankSpec, available: set[int] | None = None) -> list[int] | None:
    """The cores this rank keeps to: its local rank's ``threads`` of the cores this task may use.

    Two 1-core ranks left to the scheduler keep moving between the cores, each with its communication
    threads; pinned, each keeps its own (benchmarks/RESULTS.md, "tf's synchronisation"). Only when the
    machine's ranks split every core between them: a run that leaves cores free leaves the scheduler to
    place them (another program may be pinned there too), and one rank alone has nobody to split with.
    """
    if available is None and not hasattr(os, "sched_getaffinity"):  # not Linux: left to the scheduler
        return None
    cores = sorted(available if available is not None else os.sched_getaffinity(0))
    threads = spec.threads or 0
    if spec.local_size < 2 or threads < 1 or spec.local_size * threads != len(cores):
        return None
    return cores[spec.local_rank * threads:(spec.local_rank + 1) * threads]


def shipped_code_paths() -> list[str]:
    """``sys.path`` entries that are archives: code shipped with ``--py-files`` or ``addPyFile``.

    pyspark's Python worker inserts those (.zip, .egg) into its own ``sys.path`` only, not into
    ``PYTHONPATH``, so a child process started from a task would not find the package.
    """
    return [path for path in sys.path if path and os.path.isfile(path)]


class RankProcess:
    """One rank's fresh training process (a context manager: leaving it kills the process).

    It runs in ``workdir``, which ``rank_workdir`` owns; the spec and payload are written there on start.
    """

    def __init__(self, spec: RankSpec, payload: bytes, env: dict[str, str], on_line: LineSink, workdir: Path) -> None:
        self.spec = spec
        self.workdir = workdir
        self._payload = payload
        self._env = env
        self._on_line = on_line
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._readers: list[threading.Thread] = []
        self._process: subprocess.Popen[bytes] | None = None
        self._status_fd: int | None = None

    def __enter__(self) -> RankProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def status_fd(self) -> int | None:
        return self._status_fd

    def start(self) -> None:
        (self.workdir / PAYLOAD_FILE).write_bytes(self._payload)
        self.spec.write(self.workdir)
        read_end, write_end = os.pipe()
        env = {**self._env, STATUS_FD_ENV: str(write_end)}
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", CHILD_MODULE, str(self.workdir)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=env, pass_fds=(write_end,), close_fds=True,
            )
        finally:
            os.close(write_end)
        self._status_fd = read_end
        for stream, pipe in (("stdout", self._process.stdout), ("stderr", self._process.stderr)):
            reader = threading.Thread(target=self._pump, args=(stream, pipe), daemon=True)
            reader.start()
            self._readers.append(reader)

    def _pump(self, stream: str, pipe: IO[bytes]) -> None:
        for raw in pipe:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            if stream == "stderr":
                self._stderr_tail.append(line)
            self._on_line(stream, line)

    def finished(self, timeout_s: float | None = None) -> RankOutcome | None:
        """Wait up to ``timeout_s`` (None: until it happens) for the rank's result or its death."""
        assert self._status_fd is not None and self._process is not None, "start() first"
        ready, _, _ = select.select([self._status_fd], [], [], timeout_s)
        if not ready:
            return None
        signalled = os.read(self._status_fd, 1)
        if signalled:
            record = RankRecord.from_json((self.workdir / RECORD_FILE).read_text())
            value = (self.workdir / VALUE_FILE).read_bytes()
            return RankOutcome(record=record, value_bytes=value)
        # The pipe closed without the byte: the process died before it could report.
        code = self._process.wait()
        for reader in self._readers:
            reader.join(EXIT_GRACE_S)
        error = RankError(
            kind=CRASH, error_type="ProcessExited", message=f"exit code {code}", exit_code=code,
            output_tail="\n".join(self._stderr_tail),
        )
        record = RankRecord(rank=self.spec.rank, host=self.spec.host, pid=self._process.pid, error=error)
        return RankOutcome(record=record, value_bytes=b"")

    def let_go(self) -> None:
        """Tell a finished process it may exit (all ranks are done); ``release`` then reaps it."""
        if self._process is not None and self._process.stdin:
            try:
                self._process.stdin.close()
            except OSError:
                pass

    def release(self) -> None:
        """Let a finished process exit (all ranks are done), then reap it."""
        if self._process is None:
            return
        self.let_go()
        try:
            self._process.wait(EXIT_GRACE_S)
        except subprocess.TimeoutExpired:
            self.kill()
        for reader in self._readers:
            reader.join(EXIT_GRACE_S)

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        if self._status_fd is not None:
            os.close(self._status_fd)
            self._status_fd = None
