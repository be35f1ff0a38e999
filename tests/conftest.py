"""One local[2] SparkSession for the whole test session, made the way the entry points make it; one
trained run (and its deterministic rerun) for the tests that only read a finished run."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from sparkml_mnist.cli.jvm import OPTIONS_ENV
from sparkml_mnist.data.paths import DATA_DIR_ENV
from spark_processes import QUICK_JIT

# Two slots, as CI's two cores: barrier stages of two tasks fit, three do not.
TEST_MASTER = "local[2]"
TEST_CONF = {
    "spark.ui.enabled": "false",
    "spark.sql.shuffle.partitions": "4",
    "spark.driver.memory": "2g",
}


# tests/horovod_env runs only inside the Horovod environment (TF 2.15 + Horovod), started by
# tests/test_horovod.py with that environment's python and this variable set.
HOROVOD_SUITE_ENV = "SPARKML_MNIST_HOROVOD_SUITE"
HOROVOD_SUITE_DIR = "horovod_env"
collect_ignore = [] if os.environ.get(HOROVOD_SUITE_ENV) == "1" else [HOROVOD_SUITE_DIR]


# The order the test files start in (pytest.ini: ``--dist loadfile --no-loadscope-reorder``, so xdist keeps
# it): the longest first, so that the many short files fill both workers at the end instead of one long
# file running alone; the Horovod file once its background build (.ci/run, about 4 minutes) is likely
# done, the cluster file last of these, once the packed environment's (about 7) is. A test still waits
# for its build if it is not (each build is locked). The other files follow in their usual order.
# Durations on the 2-core CI machine: reliability 180 s, observability 176, security 115, runner 108,
# horovod 97 (after its build), jax 66, connect 64, cluster 177.
FIRST_FILES = ("test_reliability.py", "test_observability.py", "test_security.py", "test_distributed_runner.py",
               "test_horovod.py", "test_jax.py", "test_connect.py", "test_cluster.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files in ``FIRST_FILES``' order, then the rest as collected (a stable sort: each file's tests keep theirs)."""
    def place(item: pytest.Item) -> int:
        name = item.path.name
        return FIRST_FILES.index(name) if name in FIRST_FILES else len(FIRST_FILES)

    items.sort(key=place)


# Functions defined in test modules run in Spark's Python workers, which import them by module
# name: the workers (started from the JVM that this process launches) need this folder on their path.
_TESTS_DIR = str(Path(__file__).resolve().parent)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_TESTS_DIR, os.environ.get("PYTHONPATH")) if p)
# The driver JVMs this suite's sessions and CLI processes start get the quick JIT (spark_processes.QUICK_JIT
# says why; conf/platform.yaml why it is not the product's default). A value set outside is kept.
os.environ.setdefault(OPTIONS_ENV, QUICK_JIT)


@pytest.fixture(scope="session")
def spark():
    from sparkml_mnist.cli.session import create_spark

    session = create_spark("sparkml-mnist-tests", master=TEST_MASTER, conf=TEST_CONF)
    yield session
    session.stop()


@pytest.fixture(scope="session")
def full_data_dir() -> Path:
    """The full MNIST files (../shared/data/mnist-digits), when SPARKML_MNIST_DATA names them."""
    value = os.environ.get(DATA_DIR_ENV)
    if not value:
        pytest.skip(f"{DATA_DIR_ENV} is not set: the full-MNIST checks need it (.ci/run sets it)")
    path = Path(value)
    if not path.is_dir():
        pytest.fail(f"{DATA_DIR_ENV}={value} is not a folder")
    return path


# -- one trained run for the whole session ---------------------------------------------------------
#
# Training is the slow part of the suite. The tests that only read a finished run (its report, plots,
# models, rank records, console lines, secrets in what it wrote) share this one: the CLI in a fresh
# process, as a user runs it. The determinism pair's second run (``quiet_rerun``) repeats it.

TRAINED_VARIANTS = ("variant1", "variant3")  # two models in one barrier stage, two shard layouts (0.1 and 0.0 validation)
TRAINED_EPOCHS = 2
TRAINED_NP = 2
CLI_TIMEOUT_S = 900
XDIST_WORKER_ENV = "PYTEST_XDIST_WORKER"  # set in each pytest-xdist worker ("gw0", "gw1")
SHARED_RESULT_SUFFIX, SHARED_LOCK_SUFFIX = ".result.json", ".lock"
CLAIM_WAIT_S = 300.0
# Planted in the trained run's environment; none may reach its console or anything it writes (test_security).
PLANTED_ENV_SECRETS = {"DATABRICKS_TOKEN": "dapiSECRETdatabricks0001", "AWS_SECRET_ACCESS_KEY": "SECRETawsKEY0002"}
PLANTED_CONF_SECRET = "SECRETsparkCONF0003"
PLANTED_TRACKING_SECRET = "SECRETtrackingURI0005"


@dataclass(frozen=True)
class FinishedRun:
    """A CLI run that ended: its report folder, report.json, console streams and environment."""

    output: Path
    report: dict[str, Any]
    stdout: str
    stderr: str
    env: dict[str, str]  # what the test added to the inherited environment
    planted_secrets: tuple[str, ...] = ()  # secret values in ``env``, to be found nowhere in what the run printed or wrote

    def variant(self, name: str) -> dict[str, Any]:
        return next(v for v in self.report["variants"] if v["name"] == name)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinishedRun:
        """Back from ``dataclasses.asdict`` through JSON (``once_per_run``)."""
        return cls(Path(data["output"]), data["report"], data["stdout"], data["stderr"], data["env"],
                   tuple(data["planted_secrets"]))


def train_args(output: Path, *loudness: str) -> list[str]:
    return [sys.executable, "-m", "sparkml_mnist.cli", *loudness, "train", "--variant", ",".join(TRAINED_VARIANTS),
            "--epochs", str(TRAINED_EPOCHS), "--np", str(TRAINED_NP), "--deterministic", "--output", str(output)]


def finished(output: Path, stdout: str, stderr: str, code: int, env: dict[str, str],
             planted: tuple[str, ...] = ()) -> FinishedRun:
    assert code == 0, f"exit code {code}; stderr:\n{stderr[-5000:]}"
    report = json.loads((output / "report.json").read_text(encoding="utf-8"))
    return FinishedRun(output, report, stdout, stderr, env, planted)


def once_per_run(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """``make(folder)`` once for the whole test run, its JSON result shared.

    Under pytest-xdist (pytest.ini: two workers) each worker is a session of its own; the first worker to
    ask computes, holding a lock in the workers' common temporary folder, and the other reads its result.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get(XDIST_WORKER_ENV):
        root = root.parent  # the folder every worker's own basetemp lies in
    folder = root / name  # the run's own: nothing else in it
    result = root / f"{name}{SHARED_RESULT_SUFFIX}"
    with open(root / f"{name}{SHARED_LOCK_SUFFIX}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if result.is_file():
            return json.loads(result.read_text())
        shutil.rmtree(folder, ignore_errors=True)  # a worker's earlier try that failed
        folder.mkdir()
        value = make(folder)
        result.write_text(json.dumps(value, default=str))  # paths as text
        return value


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> FinishedRun:
    """``sparkml-mnist -v train --variant variant1,variant3 --epochs 2 --np 2 --deterministic`` on the sample.

    Verbose, so that its stderr holds every line a run can print; with secrets planted in its environment
    (a token, a Spark conf through PYSPARK_SUBMIT_ARGS, credentials in MLFLOW_TRACKING_URI); MLflow pointed
    at a closed port, which must cost a warning and nothing else.
    """
    from spark_processes import LOCALHOST, free_port

    def train(root: Path) -> dict[str, Any]:
        output = root / "out"
        env = {**PLANTED_ENV_SECRETS, "PYTHONUNBUFFERED": "1",
               "PYSPARK_SUBMIT_ARGS": f"--conf spark.hadoop.fs.s3a.secret.key={PLANTED_CONF_SECRET} pyspark-shell"}
        if importlib.util.find_spec("mlflow") is not None:  # MLFLOW_TRACKING_URI turns tracking on; it needs mlflow
            env["MLFLOW_TRACKING_URI"] = f"http://user:{PLANTED_TRACKING_SECRET}@{LOCALHOST}:{free_port()}"
        done = subprocess.run(train_args(output, "-v"), capture_output=True, text=True, env={**os.environ, **env},
                              timeout=CLI_TIMEOUT_S, cwd=root)
        (root / "stdout.log").write_text(done.stdout)
        (root / "stderr.log").write_text(done.stderr)
        planted = (*PLANTED_ENV_SECRETS.values(), PLANTED_CONF_SECRET, PLANTED_TRACKING_SECRET)
        return asdict(finished(output, done.stdout, done.stderr, done.returncode, env, planted))

    return FinishedRun.from_dict(once_per_run(tmp_path_factory, "trained-run", train))


@dataclass(frozen=True)
class Rerun:
    run: FinishedRun
    pid: int
    intruder_code: int | None  # a third run into the same output, started while the rerun held it (None: never was)
    intruder_err: str


@pytest.fixture(scope="session")
def quiet_rerun(spark, trained_run, tmp_path_factory) -> Rerun:
    """The determinism pair's second run: the trained run again (same settings and seed), at ``-q``, in a
    plain environment. While it holds its output, another run into that output is started (in this
    process, so that it reaches the claim at once): it must be refused, naming the rerun's pid."""
    def rerun(root: Path) -> dict[str, Any]:
        import contextlib
        import io

        from sparkml_mnist.cli.commands import main
        from sparkml_mnist.job.state import LOCK_FILE, state_folder

        output = root / "out"
        with open(root / "stdout.log", "w+") as out, open(root / "stderr.log", "w+") as err:
            process = subprocess.Popen(train_args(output, "-q"), stdout=out, stderr=err, cwd=root,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
            try:
                lock = state_folder(output) / LOCK_FILE
                deadline = time.monotonic() + CLAIM_WAIT_S
                claimed = False
                while not claimed and process.poll() is None and time.monotonic() < deadline:
                    claimed = lock.is_file() and lock.read_text().startswith("pid ")  # written once the claim is held
                    time.sleep(0.1)
                intruder, code = io.StringIO(), None
                if claimed and process.poll() is None:
                    with contextlib.redirect_stderr(intruder):
                        code = main(["train", "--variant", "variant1", "--epochs", "1", "--np", "-1",
                                     "--output", str(output)])
                process.wait(CLI_TIMEOUT_S)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            out.seek(0)
            err.seek(0)
            run = finished(output, out.read(), err.read(), process.returncode, {})
        return {"run": asdict(run), "pid": process.pid, "intruder_code": code, "intruder_err": intruder.getvalue()}

    shared = once_per_run(tmp_path_factory, "quiet-rerun", rerun)
    return Rerun(FinishedRun.from_dict(shared["run"]), shared["pid"], shared["intruder_code"], shared["intruder_err"])
