"""Spark Connect: what of the job works against a Spark Connect server, and the errors where not.

The test starts a Spark Connect server (``SparkConnectServer`` through pyspark's own
``spark-submit``, a ``local[2]`` master behind it) on a free port of 127.0.0.1 and talks to it
from a SEPARATE Python process: a process that already holds a classic SparkSession (as pytest
does, through the session-scoped ``spark`` fixture) cannot also open a Connect session; pyspark
refuses with ``[SESSION_ALREADY_EXIST]`` (checked below, with the product's own error for it).

The client process runs every probe, records its outcome as JSON, and the tests below assert
the behaviour we want: the data stage, a barrier ``mapInArrow`` over the hand-off, the launcher
(pre-flight, ranks, the stall watchdog's cancel by operation tag), the whole job through the
command line with ``SPARK_REMOTE``, and scoring its model on the executors (``predict``) work over Connect; a wrong ``sc://`` URL ends with one line,
not a traceback and not the Connect client's minutes of retries.

Deselect with ``-m "not connect"``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from spark_processes import (
    LOCALHOST,
    LOG_TAIL_CHARS,
    POLL_S,
    QUICK_JIT,
    free_port,
    marked_pids,
    spark_home,
    stop_group,
    tail,
)

pytestmark = pytest.mark.connect

MARKER_ENV = "SPARKML_MNIST_TEST_CONNECT"
SERVER_CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"
SERVER_READY_LINE = "Spark Connect server started at"
START_TIMEOUT_S = 180.0
CLIENT_TIMEOUT_S = 480.0
CLI_TIMEOUT_S = 120.0
TRAIN_ROWS, TEST_ROWS, NP = 1280, 200, 2
ROWS_PER_SHARD = 576  # 1,280 rows, last 10% held out: 1,152 training rows over 2 shards

CLIENT = r'''
"""Spark Connect client: runs each probe, records what happened, writes the results as JSON."""
import bz2, json, os, sys, time, traceback

URL, DATA, OUTPUT, RESULTS = sys.argv[1:5]
TRAIN_ROWS, TEST_ROWS, NP = 1280, 200, 2
results = {}


def probe(name):
    def run(function):
        started = time.perf_counter()
        try:
            results[name] = {"ok": True, "value": function()}
        except BaseException as error:  # recorded, never raised: every probe runs
            from sparkml_mnist.errors import SparkMnistError

            results[name] = {"ok": False, "error": {
                "type": type(error).__name__, "package_error": isinstance(error, SparkMnistError),
                "message": str(error)[:2000], "traceback": traceback.format_exc()[-3000:],
            }}
        results[name]["seconds"] = round(time.perf_counter() - started, 2)
        with open(RESULTS, "w") as out:
            json.dump(results, out, indent=1, default=str)
        return function
    return run


from pyspark.sql import SparkSession
from sparkml_mnist.data.paths import sample_paths

os.makedirs(DATA, exist_ok=True)
paths = {}
for split, source, rows in (("train", sample_paths().train, TRAIN_ROWS), ("test", sample_paths().test, TEST_ROWS)):
    paths[split] = os.path.join(DATA, f"mnist-digits-{split}.txt")
    with bz2.open(source, "rt") as lines, open(paths[split], "w") as out:
        for _, line in zip(range(rows), lines):
            out.write(line)

session = {}


@probe("create_spark_from_SPARK_REMOTE")
def _():
    from pyspark.sql.utils import is_remote
    from sparkml_mnist.cli.session import create_spark

    spark = create_spark("sparkml-mnist connect test")  # SPARK_REMOTE is set, no master given
    session["spark"] = spark
    return {"is_remote": is_remote(), "class": type(spark).__module__, "master": spark.conf.get("spark.master")}


if "spark" not in session:  # record the rest even when the product cannot make the session
    session["spark"] = SparkSession.builder.remote(URL).getOrCreate()
spark = session["spark"]


@probe("sparkContext")
def _():
    return repr(spark.sparkContext)


@probe("resources")
def _():
    from sparkml_mnist.launcher.driver import cluster as resources

    return {"barrier_slots": resources.barrier_slots(spark), "task_cpus": resources.task_cpus(spark),
            "driver_gpus": resources.driver_gpus(spark)}


@probe("preflight_np3")
def _():
    from sparkml_mnist.launcher.driver.cluster import check_barrier_run

    check_barrier_run(spark, 3)


data = {}


@probe("data_stage")
def _():
    from sparkml_mnist.data.libsvm import load_libsvm
    from sparkml_mnist.data.shards import shard_frame

    data["train"] = load_libsvm(spark, paths["train"])
    data["sharded"] = shard_frame(data["train"], NP, 0.1)
    plan = data["sharded"].plan
    return {"rows": data["train"].num_rows, "train_per_shard": plan.train_per_shard}


@probe("barrier_handoff")
def _():
    import pyarrow as pa

    def task(batches):
        from pyspark import BarrierTaskContext
        from sparkml_mnist.training.inputs import shard_rows

        context = BarrierTaskContext.get()
        shard = shard_rows(pa.Table.from_batches(list(batches)))
        peers = context.allGather(str(len(shard.train)))
        yield pa.RecordBatch.from_pydict({
            "partition": pa.array([context.partitionId()], pa.int64()),
            "shard": pa.array([shard.shard], pa.int64()),
            "train": pa.array([len(shard.train)], pa.int64()),
            "peers": pa.array([",".join(peers)], pa.string()),
        })

    rows = data["sharded"].frame.mapInArrow(task, "partition long, shard long, train long, peers string", barrier=True)
    return sorted([row.asDict() for row in rows.collect()], key=lambda row: row["partition"])


@probe("launcher")
def _():
    from sparkml_mnist.launcher import FailurePolicy, HorovodRunner

    def tiny(context):
        import os
        from sparkml_mnist.training.inputs import shard_rows
        rows = len(shard_rows(context.partition()).train)
        return {"rank": context.rank, "size": context.size, "rows": rows, "pid": os.getpid()}

    records = HorovodRunner(np=NP, spark=spark, data=data["sharded"].frame).run_all(tiny).records
    return [record.value for record in records]


@probe("launcher_watchdog")
def _():
    from sparkml_mnist.launcher import FailurePolicy, HorovodRunner

    def stall(context):
        import time
        context.report()  # the ranks report progress, then none moves
        time.sleep(120)

    HorovodRunner(np=NP, spark=spark, policy=FailurePolicy(progress_timeout_s=5, max_retries=0)).run(stall)


@probe("job_cli")
def _():
    from sparkml_mnist.cli.commands import main

    code = main(["train", "--variant", "variant1", "--epochs", "1", "--np", str(NP), "--train", paths["train"],
                 "--test", paths["test"], "--output", OUTPUT])
    report = json.load(open(os.path.join(OUTPUT, "report.json"))) if code == 0 else None
    variant = report["variants"][0] if report else None
    return {"exit_code": code, "test_examples": variant and variant["test"]["num_examples"],
            "accuracy": variant and variant["test"]["accuracy"],
            "ranks": variant and [(r["rank"], r["pid"]) for r in variant["rank_records"]]}


@probe("predict_cli")
def _():
    from sparkml_mnist.cli.commands import main

    predictions = OUTPUT + "-predictions"  # the job's model above, the test file, scored on the executors
    code = main(["predict", "--model", OUTPUT, "--data", paths["test"], "--output", predictions])
    if code != 0:
        return {"exit_code": code}
    written = spark.read.parquet(predictions)
    rows = written.collect()
    report = json.load(open(os.path.join(OUTPUT, "report.json")))
    return {"exit_code": code, "columns": written.columns, "rows": len(rows),
            "accuracy": sum(row["label"] == row["prediction"] for row in rows) / len(rows),
            "report_accuracy": report["variants"][0]["test"]["accuracy"]}
'''


# ---------------------------------------------------------------------------------------------
# The server: its own process group, stopped (and looked for) at teardown, also on failure.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def connect_url(tmp_path_factory):
    """``sc://127.0.0.1:PORT`` of a Spark Connect server (local[2]) started for this module."""
    root = tmp_path_factory.mktemp("connect-server")
    marker = uuid.uuid4().hex
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK_", "SPARK_")) and k != "MASTER"}
    conf_dir = root / "spark-conf"
    conf_dir.mkdir()
    env.update({
        "SPARK_HOME": str(spark_home()), "SPARK_CONF_DIR": str(conf_dir), "SPARK_LOCAL_IP": LOCALHOST,
        "PYSPARK_PYTHON": sys.executable,  # the server's Python workers: this venv (the package is installed)
        MARKER_ENV: marker,
    })
    command = [
        str(spark_home() / "bin" / "spark-submit"), "--class", SERVER_CLASS, "--master", "local[2]",
        "--conf", f"spark.connect.grpc.binding.port={port}",
        "--conf", f"spark.connect.grpc.binding.address={LOCALHOST}",
        "--conf", f"spark.driver.host={LOCALHOST}",
        "--conf", "spark.ui.enabled=false",
        "--conf", "spark.sql.shuffle.partitions=4",
        "--conf", f"spark.driver.extraJavaOptions={QUICK_JIT}",
        "spark-internal",
    ]
    log = root / "server.err"
    with open(root / "server.out", "wb") as out, open(log, "wb") as err:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=root,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while SERVER_READY_LINE not in tail(log, 1 << 20):
            assert server.poll() is None, f"the Connect server exited with {server.returncode}:\n{tail(log)}"
            assert time.monotonic() < deadline, f"no Connect server after {START_TIMEOUT_S:.0f} s:\n{tail(log)}"
            time.sleep(POLL_S)
        yield f"sc://{LOCALHOST}:{port}"
    finally:
        stop_group(server)
        leftovers = marked_pids(MARKER_ENV, marker)
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not leftovers, f"processes of the Connect server outlived its process group: {leftovers}"


def client_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK_", "SPARK_")) and k != "MASTER"}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def results(connect_url, tmp_path_factory) -> dict:
    """Run the client (SPARK_REMOTE set) once; every probe's outcome, by name."""
    root = tmp_path_factory.mktemp("connect-client")
    script, output = root / "client.py", root / "results.json"
    script.write_text(CLIENT)
    with open(root / "client.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(script), connect_url, str(root / "data"), str(root / "out"), str(output)],
            env=client_env(SPARK_REMOTE=connect_url), stdout=log, stderr=subprocess.STDOUT,
            cwd=root, start_new_session=True,
        )
    try:
        process.wait(CLIENT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        stop_group(process)
    recorded = json.loads(output.read_text()) if output.exists() else {}
    recorded["_log"] = tail(root / "client.log")
    return recorded


def outcome(results: dict, name: str) -> dict:
    assert name in results, f"the client never got to probe {name!r}; its log:\n{results['_log']}"
    return results[name]


def works(results: dict, name: str):
    result = outcome(results, name)
    assert result["ok"], f"{name} failed over Spark Connect: {result['error']['traceback']}"
    return result["value"]


# ---------------------------------------------------------------------------------------------
# One process, two kinds of session: refused, by pyspark and (clearly) by the product.
# ---------------------------------------------------------------------------------------------


def test_a_process_with_a_classic_session_cannot_open_a_connect_session(spark, connect_url):
    from pyspark.errors import PySparkRuntimeError
    from pyspark.sql import SparkSession

    saved = dict(os.environ)
    try:
        with pytest.raises(PySparkRuntimeError, match="SESSION_ALREADY_EXIST"):
            SparkSession.builder.remote(connect_url).getOrCreate()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert spark.range(3).count() == 3, "the classic session still works"


def test_create_spark_says_clearly_that_one_process_cannot_hold_both(spark, connect_url):
    from sparkml_mnist.errors import ConfigError
    from sparkml_mnist.cli.session import create_spark

    saved = dict(os.environ)
    try:
        with pytest.raises(ConfigError, match="Spark Connect"):
            create_spark("second session", master=connect_url)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_a_wrong_connect_url_ends_the_cli_with_one_line(tmp_path):
    closed = free_port()  # nothing listens there
    result = subprocess.run(
        [sys.executable, "-m", "sparkml_mnist.cli", "data", "--np", "2", "--master", f"sc://{LOCALHOST}:{closed}"],
        env=client_env(), capture_output=True, text=True, timeout=CLI_TIMEOUT_S, cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-LOG_TAIL_CHARS:]
    assert "Traceback" not in result.stderr
    assert "Spark Connect" in result.stderr and str(closed) in result.stderr


# ---------------------------------------------------------------------------------------------
# Over Spark Connect, from a separate process.
# ---------------------------------------------------------------------------------------------


def test_create_spark_opens_a_connect_session_from_spark_remote(results):
    value = works(results, "create_spark_from_SPARK_REMOTE")
    assert value["is_remote"] and value["class"].startswith("pyspark.sql.connect")
    assert value["master"] == "local[2]", "the server's master, seen through the session"


def test_pyspark_has_no_spark_context_over_connect(results):
    """What the product must never touch unguarded: every such place is in the probes below."""
    result = outcome(results, "sparkContext")
    assert not result["ok"] and "JVM_ATTRIBUTE_NOT_SUPPORTED" in result["error"]["message"]


def test_pre_flight_resources_work_without_a_spark_context(results):
    assert works(results, "resources") == {"barrier_slots": 2, "task_cpus": 1, "driver_gpus": []}
    result = outcome(results, "preflight_np3")
    assert not result["ok"] and result["error"]["type"] == "PreflightError" and result["error"]["package_error"]
    assert "np=3" in result["error"]["message"] and "only 2 task slots" in result["error"]["message"]


def test_the_data_stage_works_over_connect(results):
    value = works(results, "data_stage")
    assert value["rows"] == TRAIN_ROWS and value["train_per_shard"] == ROWS_PER_SHARD


def test_a_barrier_map_in_arrow_over_the_hand_off_gives_each_task_its_shard(results):
    rows = works(results, "barrier_handoff")
    assert [(r["partition"], r["shard"], r["train"]) for r in rows] == [(s, s, ROWS_PER_SHARD) for s in range(NP)]
    assert all(r["peers"] == f"{ROWS_PER_SHARD},{ROWS_PER_SHARD}" for r in rows), "allGather works inside"


def test_the_launcher_runs_ranks_over_connect(results):
    values = works(results, "launcher")
    assert [(v["rank"], v["size"], v["rows"]) for v in values] == [(r, NP, ROWS_PER_SHARD) for r in range(NP)]
    assert len({v["pid"] for v in values}) == NP


def test_the_watchdog_cancels_a_stalled_run_over_connect(results):
    """No SparkContext, so no job group: the run is cancelled through its operation tag."""
    result = outcome(results, "launcher_watchdog")
    assert not result["ok"] and result["error"]["type"] == "RankStalledError", result.get("error")
    assert result["error"]["package_error"]


def test_the_job_runs_over_connect_through_the_cli(results):
    value = works(results, "job_cli")
    assert value["exit_code"] == 0, results["_log"]
    assert value["test_examples"] == TEST_ROWS
    assert [rank for rank, _ in value["ranks"]] == list(range(NP))


def test_predict_scores_on_the_executors_over_connect_at_the_reports_accuracy(results):
    value = works(results, "predict_cli")
    assert value["exit_code"] == 0, results["_log"]
    assert value["columns"] == ["row", "label", "prediction", "probability"] and value["rows"] == TEST_ROWS
    assert value["accuracy"] == value["report_accuracy"]
