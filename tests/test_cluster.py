"""spark-submit on a REAL standalone cluster started by this test, the package shipped as its wheel.

The test starts a Master and two Workers (1 core, 1536m each) from pyspark's own ``spark-class``
launcher classes on 127.0.0.1, builds the project's wheel, and runs ``jobs/train_mnist.py`` at
``np=2`` through ``spark-submit --py-files <wheel>`` on a small slice of the bundled sample.

What it proves:
- the job works on a cluster whose executors are separate JVMs with their own Python workers;
- the wheel is what ships: the driver and the executors run a Python (a venv made here) that sees
  every dependency of /work/venv but NOT the editable install of this repository (its ``.pth``
  finder is not processed there), so ``import sparkml_mnist`` is only possible from the wheel;
- the two ranks ran in two different executor JVMs: the event log's barrier stage has its two
  tasks on two executor ids, each executor's own stderr (one per worker work dir) names a
  different JVM pid, and the rank records carry different pids;
- everything it started (Master, Workers, executors, Python workers, ranks, the driver) is
  stopped, also on failure: each is its own process group, killed at teardown, and every process
  carrying this run's marker in its environment is looked for afterwards.

Deselect with ``-m "not cluster"``.
"""

from __future__ import annotations

import bz2
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from spark_processes import (
    LOCALHOST,
    LOG_TAIL_CHARS,
    POLL_S,
    STOP_TIMEOUT_S,
    free_port,
    marked_pids,
    spark_home,
    stop_group,
    tail,
)

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
MARKER_ENV = "SPARKML_MNIST_TEST_CLUSTER"
WORKERS = 2
WORKER_MEMORY = "1536m"
TRAIN_ROWS, TEST_ROWS = 1280, 200
START_TIMEOUT_S = 180.0  # JVM start-up on a busy 2-core machine
JOB_TIMEOUT_S = 540.0
# Files a wheel build needs; copied so the build writes nothing into the repository.
WHEEL_SOURCES = ("setup.py", "README.md", "sparkml_mnist", "conf")
PID_LINE = re.compile(r"Started daemon with process name: (\d+)@")


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
        MARKER_ENV: marker,
    })
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Master and two Workers on 127.0.0.1; everything is stopped at teardown, also on failure."""
    root = tmp_path_factory.mktemp("cluster")
    marker = uuid.uuid4().hex
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
        deadline = time.monotonic() + START_TIMEOUT_S
        alive = -1
        while True:
            cluster.check_running()
            try:
                alive = sum(w.get("state") == "ALIVE" for w in cluster.state().get("workers", []))
            except OSError:  # the master's UI is not up yet
                pass
            if alive == WORKERS:
                break
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{alive} of {WORKERS} workers registered after {START_TIMEOUT_S:.0f} s:\n"
                    + "\n".join(f"--- {name}\n{cluster.log(name)}" for name, _ in cluster.processes)
                )
            time.sleep(POLL_S)
        yield cluster
    finally:
        leftovers = cluster.stop()
    assert not marked_pids(MARKER_ENV, marker), "processes of the test cluster are still running after teardown"
    assert not leftovers, f"processes outlived their process group and had to be killed one by one: {leftovers}"


# ---------------------------------------------------------------------------------------------
# What the job needs: a wheel, a Python without the editable install, a small slice of data.
# ---------------------------------------------------------------------------------------------


def build_wheel(root: Path) -> Path:
    source = root / "src"
    source.mkdir()
    for name in WHEEL_SOURCES:
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(origin, source / name)
    dist = root / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(source)],
        capture_output=True, text=True, timeout=START_TIMEOUT_S,
    )
    output = f"{result.stdout[-LOG_TAIL_CHARS:]}\n{result.stderr[-LOG_TAIL_CHARS:]}"
    assert result.returncode == 0, f"pip wheel failed:\n{output}"
    (wheel,) = dist.glob("sparkml_mnist-*.whl")
    # pyspark puts only .zip/.egg/.jar files of --py-files on the executors' sys.path (its
    # PACKAGE_EXTENSIONS); a .whl is shipped but never importable there. A wheel is a zip.
    shipped = wheel.with_suffix(".zip")
    shutil.copyfile(wheel, shipped)
    return shipped


def python_without_the_editable_install(root: Path) -> Path:
    """A venv whose site-packages points at this venv's packages through a plain path entry.

    A directory named in a ``.pth`` file is added to ``sys.path``, but the ``.pth`` files inside
    it are not processed, so the editable install's import hook is absent there.
    """
    venv = root / "exec-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=START_TIMEOUT_S)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, timeout=START_TIMEOUT_S,
    ).stdout.strip()
    here = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "dependencies-of-work-venv.pth").write_text("\n".join(sorted(here)) + "\n")
    probe = subprocess.run(
        [str(python), "-c", "import importlib.util as u; print([u.find_spec(m) is not None for m in "
         "('sparkml_mnist', 'pyspark', 'pyarrow', 'tensorflow', 'tf_keras', 'yaml', 'sklearn')])"],
        capture_output=True, text=True, timeout=START_TIMEOUT_S, cwd=root, env=_no_pythonpath(),
    )
    assert probe.stdout.strip() == str([False] + [True] * 6), (
        f"the executors' Python must see the dependencies but not sparkml_mnist: {probe.stdout} {probe.stderr}"
    )
    return python


def _no_pythonpath() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


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


# ---------------------------------------------------------------------------------------------
# Reading the evidence: the driver's event log, each executor's own stderr in its worker's dir.
# ---------------------------------------------------------------------------------------------


def read_event_log(folder: Path) -> list[dict]:
    (log,) = [p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".inprogress")]
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def barrier_task_executors(events: list[dict]) -> dict[int, str]:
    """Partition -> executor id of the successful tasks of the barrier stage(s)."""
    barrier_stages = barrier_stage_ids(events)
    placed = {}
    for event in events:
        if event["Event"] == "SparkListenerTaskEnd" and event["Stage ID"] in barrier_stages:
            if event["Task End Reason"]["Reason"] == "Success":
                placed[event["Task Info"]["Partition ID"]] = event["Task Info"]["Executor ID"]
    return placed


def executor_jvms(worker_dirs: list[Path]) -> dict[str, tuple[int, int, str]]:
    """Executor id -> (worker index, JVM pid, its log), from each executor's stderr in its worker's work dir."""
    found = {}
    for index, work_dir in enumerate(worker_dirs):
        for stderr in work_dir.glob("app-*/*/stderr"):
            text = stderr.read_text(errors="replace")
            match = PID_LINE.search(text)
            assert match, f"{stderr} does not name its JVM's pid:\n{tail(stderr)}"
            found[stderr.parent.name] = (index, int(match.group(1)), text)
    return found


def barrier_stage_ids(events: list[dict]) -> set[int]:
    return {
        e["Stage Info"]["Stage ID"] for e in events
        if e["Event"] == "SparkListenerStageSubmitted" and any(r.get("Barrier") for r in e["Stage Info"]["RDD Info"])
    }


def test_spark_submit_on_a_standalone_cluster_runs_the_ranks_in_two_executor_jvms(cluster, tmp_path):
    wheel = build_wheel(tmp_path)
    python = python_without_the_editable_install(tmp_path)
    train, test = sample_slice(tmp_path)
    events, output = tmp_path / "events", tmp_path / "out"
    events.mkdir()
    env = {**cluster.env, "PYSPARK_PYTHON": str(python), "PYSPARK_DRIVER_PYTHON": str(python)}
    command = [
        str(spark_home() / "bin" / "spark-submit"),
        "--master", cluster.master_url,
        "--conf", "spark.executor.cores=1",
        "--conf", "spark.cores.max=2",
        "--conf", "spark.executor.memory=1g",
        "--conf", f"spark.driver.host={LOCALHOST}",
        "--conf", "spark.ui.enabled=false",
        "--conf", "spark.sql.shuffle.partitions=4",
        "--conf", "spark.eventLog.enabled=true",
        "--conf", f"spark.eventLog.dir=file://{events}",
        "--conf", "spark.eventLog.compress=false",
        "--conf", "spark.eventLog.rolling.enabled=false",
        "--py-files", str(wheel),
        str(REPO / "jobs" / "train_mnist.py"),
        "--variant", "variant1", "--epochs", "1", "--np", "2",
        "--train", str(train), "--test", str(test), "--output", str(output),
    ]
    submit = cluster.launch("submit", command, env=env)
    try:
        code = submit.wait(JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        code = None
    executor_logs = "\n".join(
        f"--- {p.relative_to(cluster.root)}\n{tail(p, 1500)}"
        for d in cluster.worker_dirs for p in d.glob("app-*/*/stderr")
    )
    assert code == 0, (
        f"spark-submit {'timed out' if code is None else f'exited with {code}'}:\n"
        f"--- driver stdout\n{tail(cluster.root / 'logs' / 'submit.out')}\n--- driver stderr\n{cluster.log('submit')}\n"
        f"{executor_logs}"
    )

    report = json.loads((output / "report.json").read_text())
    ranks = report["variants"][0]["rank_records"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert {r["host"] for r in ranks} == {LOCALHOST}
    assert len({r["pid"] for r in ranks}) == 2
    assert report["variants"][0]["test"]["num_examples"] == TEST_ROWS

    log = read_event_log(events)
    (environment,) = [e for e in log if e["Event"] == "SparkListenerEnvironmentUpdate"]
    assert str(wheel) in environment["Spark Properties"].get("spark.submit.pyFiles", ""), "the wheel is shipped"
    placed = barrier_task_executors(log)
    assert sorted(placed) == [0, 1], f"the barrier stage's successful tasks: {placed}"
    assert placed[0] != placed[1], f"both ranks ran in executor {placed[0]}"

    jvms = executor_jvms(cluster.worker_dirs)
    assert set(placed.values()) <= set(jvms), f"executors of the ranks {placed} not found in the work dirs {jvms}"
    (worker0, pid0, log0), (worker1, pid1, log1) = jvms[placed[0]], jvms[placed[1]]
    assert pid0 != pid1, "the two ranks' executors are one JVM"
    assert worker0 != worker1, "the two ranks' executors were launched by the same worker"
    # Each JVM's own log shows its barrier task meeting the other one (BarrierTaskContext's global sync).
    stages = "|".join(str(stage) for stage in barrier_stage_ids(log))
    synced = re.compile(rf"from Stage ({stages})\(Attempt \d+\) finished global sync successfully")
    assert synced.search(log0) and synced.search(log1), "each executor's barrier task passed the global sync"


def test_a_rank_killed_on_the_cluster_resumes_without_shared_storage(cluster, tmp_path):
    """Rank 1's process, in an executor JVM, SIGKILLed mid-epoch: the launcher's retry resumes from the
    checkpoint rank 0 sent the driver over the channel; no folder is shared by the executors."""
    from rank_processes import rank_pids

    from sparkml_mnist.data.paths import sample_paths

    wheel = build_wheel(tmp_path)
    python = python_without_the_editable_install(tmp_path)
    output = tmp_path / "out"
    env = {**cluster.env, "PYSPARK_PYTHON": str(python), "PYSPARK_DRIVER_PYTHON": str(python)}
    command = [
        str(spark_home() / "bin" / "spark-submit"), "--master", cluster.master_url,
        "--conf", "spark.executor.cores=1", "--conf", "spark.cores.max=2", "--conf", "spark.executor.memory=1g",
        "--conf", f"spark.driver.host={LOCALHOST}", "--conf", "spark.ui.enabled=false",
        "--conf", "spark.sql.shuffle.partitions=4", "--py-files", str(wheel), str(REPO / "jobs" / "train_mnist.py"),
        "--variant", "variant3", "--epochs", "3", "--np", "2",
        "--train", sample_paths().train, "--test", sample_paths().test, "--output", str(output),
    ]
    submit = cluster.launch("submit-kill", command, env=env)
    driver_log = cluster.root / "logs" / "submit-kill.out"  # spark-submit merges the Python driver's stderr
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while "variant3 epoch 1/3" not in tail(driver_log, 200_000):
        assert submit.poll() is None and time.monotonic() < deadline, f"epoch 1 never ended:\n{tail(driver_log)}"
        time.sleep(POLL_S)
    time.sleep(0.5)  # into epoch 2
    os.kill(rank_pids(cluster.marker, MARKER_ENV)[1], signal.SIGKILL)  # this cluster's rank 1, nobody else's
    try:
        code = submit.wait(JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        code = None
    assert code == 0, f"spark-submit ended with {code}:\n{tail(driver_log)}"
    variant = json.loads((output / "report.json").read_text())["variants"][0]
    assert [a["outcome"] for a in variant["attempts"]] == ["failed", "succeeded"]
    assert variant["attempts"][1]["resumed_from_epoch"] == 1
    assert all(len(values) == 3 for values in variant["history"].values())
