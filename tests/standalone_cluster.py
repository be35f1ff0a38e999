"""A REAL standalone Spark cluster for tests (a Master and Workers from pip's pyspark), spark-submit on
it, and the evidence of where the ranks ran: the driver's event log and each executor's own stderr.

Every process started here runs in its own process group and carries a marker variable in its
environment, so ``Cluster.stop`` can stop the groups and then look for anything left, also after a
failure.
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Iterator

from spark_processes import LOCALHOST, POLL_S, QUICK_JIT, STOP_TIMEOUT_S, free_port, marked_pids, spark_home, stop_group, tail

REPO = Path(__file__).resolve().parents[1]
PACK_SCRIPT = REPO / "scripts" / "pack_env.py"  # also builds the wheel (build_wheel)
MARKER_ENV = "SPARKML_MNIST_TEST_CLUSTER"
WORKERS = 2
WORKER_MEMORY = "1536m"
TRAIN_ROWS, TEST_ROWS = 1280, 200
START_TIMEOUT_S = 180.0  # JVM start-up on a busy 2-core machine
JOB_TIMEOUT_S = 540.0
PID_LINE = re.compile(r"Started daemon with process name: (\d+)@")
EXECUTOR_LOG_CHARS = 1500
# The job's settings on the cluster: two one-core executors, small shuffles, an event log to read.
SUBMIT_CONF = {
    "spark.driver.extraJavaOptions": QUICK_JIT,
    "spark.executor.extraJavaOptions": QUICK_JIT,
    "spark.executor.cores": "1",
    "spark.cores.max": "2",
    "spark.executor.memory": "1g",
    "spark.driver.host": LOCALHOST,
    "spark.ui.enabled": "false",
    "spark.sql.shuffle.partitions": "4",
    "spark.eventLog.enabled": "true",
    "spark.eventLog.compress": "false",
    "spark.eventLog.rolling.enabled": "false",
}
JOB_ARGUMENTS = ("--variant", "variant1", "--epochs", "1", "--np", "2")


@dataclass
class Cluster:
    root: Path
    marker: str
    env: dict[str, str]
    master_url: str = ""
    master_ui: str = ""
    worker_dirs: list[Path] = field(default_factory=list)
    processes: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def launch(self, name: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start a process in its own process group, output to <root>/logs/<name>.{out,err}."""
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / f"{name}.out", "wb") as out, open(logs / f"{name}.err", "wb") as err:
            process = subprocess.Popen(
                command, env=env or self.env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                cwd=self.root, start_new_session=True,
            )
        self.processes.append((name, process))
        return process

    def log(self, name: str) -> str:
        return tail(self.root / "logs" / f"{name}.err")

    def check_running(self) -> None:
        for name, process in self.processes:
            if process.poll() is not None and not name.startswith("submit"):
                raise AssertionError(f"{name} exited with {process.returncode}:\n{self.log(name)}")

    def state(self) -> dict:
        with urllib.request.urlopen(f"{self.master_ui}/json/", timeout=10) as response:
            return json.loads(response.read())

    def executor_logs(self, app: str = "app-*") -> str:
        return "\n".join(
            f"--- {p.relative_to(self.root)}\n{tail(p, EXECUTOR_LOG_CHARS)}"
            for d in self.worker_dirs for p in d.glob(f"{app}/*/stderr")
        )

    def stop(self) -> list[int]:
        """Stop everything started here (newest first); returns the pids that outlived their group."""
        for _, process in reversed(self.processes):
            stop_group(process)
        leftovers = marked_pids(MARKER_ENV, self.marker)
        for pid in leftovers:  # e.g. something that left its group; only processes carrying our marker
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while marked_pids(MARKER_ENV, self.marker) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        return leftovers


def cluster_env(root: Path, marker: str) -> dict[str, str]:
    """The environment of every cluster process: this machine's, minus anything pointing at the repo."""
    env = {
        key: value for key, value in os.environ.items()
        if not key.startswith(("PYSPARK_", "SPARK_")) and key not in ("PYTHONPATH", "MASTER")
    }
    conf_dir = root / "spark-conf"  # empty: no stray spark-defaults / log4j2 from elsewhere
    conf_dir.mkdir(exist_ok=True)
    env.update({
        "SPARK_HOME": str(spark_home()),
        "SPARK_CONF_DIR": str(conf_dir),
        "SPARK_LOCAL_IP": LOCALHOST,
        "SPARK_LOCAL_HOSTNAME": LOCALHOST,
        "SPARK_DAEMON_JAVA_OPTS": QUICK_JIT,  # the Master's and the Workers'
        MARKER_ENV: marker,
    })
    return env


@contextmanager
def standalone_cluster(root: Path, marker: str) -> Iterator[Cluster]:
    """A Master and ``WORKERS`` one-core Workers on 127.0.0.1; all stopped on the way out, also on failure."""
    cluster = Cluster(root=root, marker=marker, env=cluster_env(root, marker))
    spark_class = str(spark_home() / "bin" / "spark-class")
    master_port, master_ui_port = free_port(), free_port()
    cluster.master_url = f"spark://{LOCALHOST}:{master_port}"
    cluster.master_ui = f"http://{LOCALHOST}:{master_ui_port}"
    try:
        cluster.launch("master", [
            spark_class, "org.apache.spark.deploy.master.Master",
            "--host", LOCALHOST, "--port", str(master_port), "--webui-port", str(master_ui_port),
        ])
        for index in range(WORKERS):
            work_dir = root / f"worker{index}"
            work_dir.mkdir()
            cluster.worker_dirs.append(work_dir)
            cluster.launch(f"worker{index}", [
                spark_class, "org.apache.spark.deploy.worker.Worker",
                "--host", LOCALHOST, "--webui-port", str(free_port()), "--cores", "1",
                "--memory", WORKER_MEMORY, "--work-dir", str(work_dir), cluster.master_url,
            ])
        wait_for_workers(cluster)
        yield cluster
    finally:
        leftovers = cluster.stop()
    assert not marked_pids(MARKER_ENV, marker), "processes of the test cluster are still running after teardown"
    assert not leftovers, f"processes outlived their process group and had to be killed one by one: {leftovers}"


def wait_for_workers(cluster: Cluster) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    alive = -1
    while True:
        cluster.check_running()
        try:
            alive = sum(w.get("state") == "ALIVE" for w in cluster.state().get("workers", []))
        except OSError:  # the master's UI is not up yet
            pass
        if alive == WORKERS:
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{alive} of {WORKERS} workers registered after {START_TIMEOUT_S:.0f} s:\n"
                + "\n".join(f"--- {name}\n{cluster.log(name)}" for name, _ in cluster.processes)
            )
        time.sleep(POLL_S)


# ---------------------------------------------------------------------------------------------
# Running the job: spark-submit of jobs/train_mnist.py on a small slice of the bundled sample.
# ---------------------------------------------------------------------------------------------


def sample_slice(root: Path) -> tuple[Path, Path]:
    from sparkml_mnist.data.paths import sample_paths

    sample = sample_paths()
    paths = []
    for split, source, rows in (("train", sample.train, TRAIN_ROWS), ("test", sample.test, TEST_ROWS)):
        target = root / "data" / f"mnist-digits-{split}.txt"
        target.parent.mkdir(exist_ok=True)
        with bz2.open(source, "rt") as lines, open(target, "w") as out:
            for _, line in zip(range(rows), lines):
                out.write(line)
        paths.append(target)
    return paths[0], paths[1]


@dataclass(frozen=True)
class Submission:
    """A successful spark-submit of the job: where its report and its event log are."""

    output: Path
    events: Path

    def report(self) -> dict:
        return json.loads((self.output / "report.json").read_text())


def submit_job(
    cluster: Cluster, root: Path, name: str, env: dict[str, str], conf: dict[str, str], options: list[str],
) -> Submission:
    """spark-submit jobs/train_mnist.py (variant1, 1 epoch, np=2) on the sample slice; it must succeed."""
    train, test = sample_slice(root)
    events, output = root / "events", root / "out"
    events.mkdir()
    settings = {**SUBMIT_CONF, "spark.eventLog.dir": f"file://{events}", **conf}
    command = [str(spark_home() / "bin" / "spark-submit"), "--master", cluster.master_url]
    for key, value in settings.items():
        command += ["--conf", f"{key}={value}"]
    command += [*options, str(REPO / "jobs" / "train_mnist.py"), *JOB_ARGUMENTS]
    command += ["--train", str(train), "--test", str(test), "--output", str(output)]
    submit = cluster.launch(name, command, env=env)
    try:
        code = submit.wait(JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        code = None
    assert code == 0, (
        f"spark-submit {'timed out' if code is None else f'exited with {code}'}:\n"
        f"--- driver stdout\n{tail(cluster.root / 'logs' / f'{name}.out')}\n--- driver stderr\n{cluster.log(name)}\n"
        f"{cluster.executor_logs()}"
    )
    return Submission(output=output, events=events)


def pack_script() -> ModuleType:
    """scripts/pack_env.py as a module: its ``build_wheel`` and packing functions."""
    spec = importlib.util.spec_from_file_location("pack_env", PACK_SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def module_origins(python: Path, modules: tuple[str, ...], cwd: Path) -> list[str | None]:
    """Where ``python`` would import each of ``modules`` from (None: nowhere), without this PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = f"import importlib.util as u, json; print(json.dumps([getattr(u.find_spec(m), 'origin', None) for m in {modules!r}]))"
    probe = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=START_TIMEOUT_S, cwd=cwd, env=env)
    assert probe.returncode == 0, probe.stderr
    return json.loads(probe.stdout)


def bare_python(root: Path, name: str) -> Path:
    """A venv of the base interpreter with nothing installed (no pip either)."""
    venv = root / name
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=START_TIMEOUT_S)
    return venv / "bin" / "python"


# ---------------------------------------------------------------------------------------------
# Reading the evidence: the driver's event log, each executor's own stderr in its worker's dir.
# ---------------------------------------------------------------------------------------------


def read_event_log(folder: Path) -> list[dict]:
    (log,) = [p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".inprogress")]
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def spark_properties(events: list[dict]) -> dict[str, str]:
    (environment,) = [e for e in events if e["Event"] == "SparkListenerEnvironmentUpdate"]
    return environment["Spark Properties"]


def application_id(events: list[dict]) -> str:
    (start,) = [e for e in events if e["Event"] == "SparkListenerApplicationStart"]
    return start["App ID"]


def barrier_stage_ids(events: list[dict]) -> set[int]:
    return {
        e["Stage Info"]["Stage ID"] for e in events
        if e["Event"] == "SparkListenerStageSubmitted" and any(r.get("Barrier") for r in e["Stage Info"]["RDD Info"])
    }


def barrier_task_executors(events: list[dict]) -> dict[int, str]:
    """Partition -> executor id of the successful tasks of the barrier stage(s)."""
    barrier_stages = barrier_stage_ids(events)
    placed = {}
    for event in events:
        if event["Event"] == "SparkListenerTaskEnd" and event["Stage ID"] in barrier_stages:
            if event["Task End Reason"]["Reason"] == "Success":
                placed[event["Task Info"]["Partition ID"]] = event["Task Info"]["Executor ID"]
    return placed


def executor_dirs(worker_dirs: list[Path], app: str) -> dict[str, tuple[int, Path]]:
    """Executor id -> (worker index, its working directory) of application ``app``."""
    return {
        folder.name: (index, folder)
        for index, work_dir in enumerate(worker_dirs) for folder in work_dir.glob(f"{app}/*") if folder.is_dir()
    }


def assert_ranks_ran_in_two_executor_jvms(cluster: Cluster, submission: Submission,
                                          test_rows: int = TEST_ROWS) -> dict[str, Path]:
    """The report's two ranks ran in two executors, two JVMs launched by two Workers; returns their work dirs.

    Evidence: the event log's barrier stage has its two successful tasks on two executor ids; each
    executor's own stderr (in its Worker's work dir) names a different JVM pid and shows its barrier
    task passing BarrierTaskContext's global sync; the rank records carry different pids.
    """
    report = submission.report()
    ranks = report["variants"][0]["rank_records"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert {r["host"] for r in ranks} == {LOCALHOST}
    assert len({r["pid"] for r in ranks}) == 2
    assert report["variants"][0]["test"]["num_examples"] == test_rows

    events = read_event_log(submission.events)
    placed = barrier_task_executors(events)
    assert sorted(placed) == [0, 1], f"the barrier stage's successful tasks: {placed}"
    assert placed[0] != placed[1], f"both ranks ran in executor {placed[0]}"

    folders = executor_dirs(cluster.worker_dirs, application_id(events))
    assert set(placed.values()) <= set(folders), f"executors of the ranks {placed} not found in the work dirs {folders}"
    jvms = []
    for executor in (placed[0], placed[1]):
        worker, folder = folders[executor]
        text = (folder / "stderr").read_text(errors="replace")
        match = PID_LINE.search(text)
        assert match, f"{folder / 'stderr'} does not name its JVM's pid:\n{tail(folder / 'stderr')}"
        jvms.append((worker, int(match.group(1)), text))
    (worker0, pid0, log0), (worker1, pid1, log1) = jvms
    assert pid0 != pid1, "the two ranks' executors are one JVM"
    assert worker0 != worker1, "the two ranks' executors were launched by the same worker"
    stages = "|".join(str(stage) for stage in barrier_stage_ids(events))
    synced = re.compile(rf"from Stage ({stages})\(Attempt \d+\) finished global sync successfully")
    assert synced.search(log0) and synced.search(log1), "each executor's barrier task passed the global sync"
    return {executor: folders[executor][1] for executor in (placed[0], placed[1])}
