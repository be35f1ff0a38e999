"""What a user sees: MLflow runs read back, live per-rank progress, logging they can route, readable reports."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pyspark import cloudpickle
from spark_processes import LOCALHOST, free_port

from sparkml_mnist.config import load_run
from sparkml_mnist.errors import ConfigError
from sparkml_mnist.launcher import HorovodRunner
from sparkml_mnist.launcher.driver.board import LiveBoard, straggler_summary
from sparkml_mnist.launcher.protocol import Heartbeat
from sparkml_mnist.job.run import run_job

cloudpickle.register_pickle_by_value(sys.modules[__name__])

EPOCHS, STEPS = 2, 6
REGISTERED_MODEL = "sparkml_mnist_test"
# A bound on a hang, not a speed check: the server starts at the suite's busiest moment (the Horovod build and
# the packed environment's install run beside it); a run on an overloaded machine took just over 120 s.
SERVER_START_S = 300.0
# One client at a time: one worker process instead of MLflow's default four, each of which imports MLflow
# (about 9 CPU-seconds and 4 s of the server's start on the 2-core CI machine).
SERVER_WORKERS = 1
CLI_TIMEOUT_S = 600


def keras_main() -> int:
    """Written for HorovodRunner, with sparkdl's LogCallback (which reports progress)."""
    import numpy as np
    import tensorflow as tf

    from sparkml_mnist import LogCallback

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = tf.keras.Sequential([tf.keras.layers.Input((4,)), tf.keras.layers.Dense(2, activation="softmax")])
        model.compile(optimizer="sgd", loss="categorical_crossentropy")
    x = np.random.default_rng(0).random((STEPS * 8, 4), dtype=np.float32)
    y = np.eye(2, dtype=np.float32)[np.arange(STEPS * 8) % 2]

    class Slow(tf.keras.callbacks.Callback):  # time for the board to see several steps
        def on_train_batch_end(self, batch, logs=None):
            time.sleep(0.3)

    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
    model.fit(data, epochs=EPOCHS, steps_per_epoch=STEPS, verbose=0, callbacks=[LogCallback(), Slow()])
    return 0


# -- MLflow ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 with a SQLite backend and a local artifact root."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", LOCALHOST, "--port", str(port),
         "--workers", str(SERVER_WORKERS),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://{LOCALHOST}:{port}"
    deadline = time.monotonic() + SERVER_START_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()[-3000:]
        time.sleep(0.5)
    yield url
    os.killpg(server.pid, 15)
    server.wait(30)
    log.close()


def tracked_run(spark, tmp_path: Path, tracking_uri: str, register_model: str | None = None) -> tuple[Path, Any]:
    from sparkml_mnist.job.tracking import Tracking

    run = load_run("sample").with_overrides(variants="variant1", np=-1, epochs=EPOCHS, output=str(tmp_path / "out"),
                                            register_model=register_model)
    before = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    tracking = Tracking(tracking_uri, experiment=f"test-{tmp_path.name}",
                        artifact_location=None if tracking_uri.startswith("http") else (tmp_path / "artifacts").as_uri())
    folder = run_job(spark, run, tracking=tracking)
    # MLflow's set_tracking_uri exports the URI for subprocesses: the job puts the environment back
    assert {key: os.environ.get(key) for key in before} == before
    return folder, tracking


def read_back(tracking_uri: str, tracking: Any, folder: Path, np_: int = -1) -> None:
    """Parent and child runs, parameters, per-epoch metrics with steps, test metrics, artifacts, the model."""
    import mlflow
    from mlflow import MlflowClient

    from sparkml_mnist.launcher.keras_flavour import keras

    client = MlflowClient(tracking_uri)
    report = json.loads((folder / "report.json").read_text())["variants"][0]
    parent = client.get_run(next(iter(client.search_runs(
        [client.get_experiment_by_name(tracking.experiment).experiment_id],
        filter_string="attributes.run_name = 'sample'"))).info.run_id)
    child = client.get_run(tracking.children["variant1"])
    assert parent.info.status == "FINISHED" and child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.params["np"] == str(np_) and parent.data.params["seed"] == "42"
    assert child.data.params["optimizer"] == "adam" and child.data.params["epochs"] == str(EPOCHS)
    for key in ("loss", "accuracy", "val_loss"):
        history = client.get_metric_history(child.info.run_id, key)
        assert [m.step for m in history] == list(range(1, EPOCHS + 1))
        assert [m.value for m in history] == pytest.approx(report["history"][key])
    assert child.data.metrics["test_accuracy"] == pytest.approx(report["test"]["accuracy"])
    assert child.data.metrics["test_loss"] == pytest.approx(report["test"]["loss"])
    assert "test_recall_7" in child.data.metrics
    assert {a.path for a in client.list_artifacts(child.info.run_id)} >= {"variant1-loss.png", "variant1-confusion.png"}
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"report.md", "report.json", "comparison.png"}
    mlflow.set_tracking_uri(tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(child.data.tags["model_uri"])
    finally:
        mlflow.set_tracking_uri(None)  # exported for subprocesses: later tests' CLI runs must not log here
    images = np.random.default_rng(3).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)  # raw pixels, as served
    expected = keras().models.load_model(next(folder.rglob("variant1.keras")), compile=False).predict(
        images.astype(np.float32) / 255.0, verbose=0)
    predicted = np.asarray(model.predict({"pixels": images}))
    assert predicted.shape == (4, 10)
    np.testing.assert_array_equal(predicted.argmax(axis=1), expected.argmax(axis=1))
    assert model.metadata.signature is not None


@pytest.mark.mlflow
def test_a_run_logged_to_an_mlflow_server_reads_back_whole(spark, tmp_path: Path, mlflow_server: str) -> None:
    """Read back whole; each epoch logged when the driver heard it (not all at the end); the model registered."""
    from mlflow import MlflowClient

    from sparkml_mnist.job.tracking import REGISTERED_TAG, registered_name

    folder, tracking = tracked_run(spark, tmp_path, mlflow_server, register_model=REGISTERED_MODEL)
    client = MlflowClient(mlflow_server)
    child = client.get_run(tracking.children["variant1"])
    parent = client.get_run(child.data.tags["mlflow.parentRunId"])
    history = json.loads((folder / "report.json").read_text())["variants"][0]["history"]
    evaluated_at = client.get_metric_history(child.info.run_id, "test_accuracy")[0].timestamp
    for key in history:  # loss, accuracy, val_loss, val_accuracy: one value per epoch, steps 1..E
        logged = client.get_metric_history(child.info.run_id, key)
        assert [m.step for m in logged] == list(range(1, EPOCHS + 1)), key
        times = [m.timestamp for m in logged]
        assert parent.info.start_time <= times[0] < times[-1] < evaluated_at < child.info.end_time, key  # live
    name = registered_name(REGISTERED_MODEL, "variant1")
    [version] = client.search_model_versions(f"name = '{name}'")
    assert version.run_id == child.info.run_id and child.data.tags[REGISTERED_TAG] == f"{name}/{version.version}"
    read_back(mlflow_server, tracking, folder)


@pytest.fixture(scope="module")
def local_store(tmp_path_factory) -> str:
    """A SQLite tracking store for the in-process MLflow tests (made once: its schema takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow-local') / 'mlflow.db'}"


@pytest.fixture
def forget_tracking_uri():
    """Tracking.start sets MLflow's process-wide tracking URI: later tests in this process must not log there."""
    yield
    import mlflow

    mlflow.set_tracking_uri(None)


def epoch_report(epoch: int) -> dict[str, Any]:
    """Rank 0's report of an epoch, as the job's EpochCallback (and LogCallback) sends it."""
    return {"epoch": epoch, "loss": 1.0 / epoch, "accuracy": 1.0 - 0.5 / epoch}


@pytest.mark.mlflow
def test_a_stopped_or_failed_job_ends_its_runs_so_with_their_epochs_and_resume_continues_them(
        local_store: str, tmp_path: Path, forget_tracking_uri: None) -> None:
    """In-process, fake reports: KILLED (Ctrl-C/SIGTERM) then FAILED, each with the epochs heard; a resumed
    run continues the same parent and child, logs only the epochs they lack, and ends FINISHED."""
    from types import SimpleNamespace

    from mlflow import MlflowClient

    from sparkml_mnist.job.tracking import Tracking, ended_status

    experiment, output = f"test-{tmp_path.name}", str(tmp_path / "out")
    variants = {"variant1": {"optimizer": "adam"}, "variant2": {"optimizer": "sgd"}}
    client = MlflowClient(local_store)

    def tracking(resume: bool) -> Tracking:
        made = Tracking(local_store, experiment=experiment, artifact_location=(tmp_path / "artifacts").as_uri())
        made.start("sample", {"np": 2}, variants=variants, output=output, resume=resume)
        assert made.enabled
        return made

    def steps(run_id: str) -> list[int]:
        return [m.step for m in client.get_metric_history(run_id, "loss")]

    first = tracking(resume=False)
    parent = first.parent_id
    first.on_report("variant1", 1, epoch_report(1), None)  # rank 1's: not logged (rank 0's is)
    for epoch in (1, 2, 2):  # a retried attempt's repeat of epoch 2 is logged once
        first.on_report("variant1", 0, epoch_report(epoch), None)
    first.on_report("variant1.scored", 0, {"test": {}}, None)  # not an epoch
    first.end(None, status=ended_status(KeyboardInterrupt("signal 15")))
    child = first.children["variant1"]
    assert set(first.children) == {"variant1"}  # variant2 never reached its first epoch: no child run
    assert client.get_run(parent).info.status == client.get_run(child).info.status == "KILLED"
    assert steps(child) == [1, 2]

    second = tracking(resume=True)  # --resume: the same runs, running again
    assert second.resumed and second.parent_id == parent and second.children == {"variant1": child}
    assert client.get_run(parent).info.status == client.get_run(child).info.status == "RUNNING"
    for epoch in (2, 3):  # epoch 2 again: the resumed ranks restart after the last checkpoint it had
        second.on_report("variant1", 0, epoch_report(epoch), None)
    second.end(None, status=ended_status(RuntimeError("rank 1 failed")))
    assert client.get_run(parent).info.status == client.get_run(child).info.status == "FAILED"
    assert steps(child) == [1, 2, 3]

    third = tracking(resume=True)
    third.on_report("variant1", 0, epoch_report(4), None)
    for plot in ("loss.png", "confusion.png"):
        (tmp_path / plot).write_bytes(b"png")
    evaluation = SimpleNamespace(loss=0.1, accuracy=0.9, class_names=["0"], precision=[1.0], recall=[1.0], f1=[1.0])
    history = {key: [epoch_report(epoch)[key] for epoch in range(1, 6)] for key in ("loss", "accuracy")}
    result = SimpleNamespace(name="variant1", parameter_count=10, history=history, evaluation=evaluation,
                             loss_plot="loss.png", confusion_plot="confusion.png")
    third.variant(result, variants["variant1"], tmp_path, None)  # epoch 5 only from the history: it had 1..4
    third.end(tmp_path)
    assert client.get_run(parent).info.status == client.get_run(child).info.status == "FINISHED"
    assert steps(child) == [1, 2, 3, 4, 5]
    assert [m.value for m in client.get_metric_history(child, "accuracy")] == pytest.approx(history["accuracy"])
    assert client.get_run(child).data.params == {"optimizer": "adam", "parameter_count": "10"}
    fresh = tracking(resume=False)  # the same output without --resume: a run of its own
    assert fresh.parent_id != parent and not fresh.resumed
    fresh.end(None)


@pytest.mark.mlflow
def test_a_horovodrunner_users_listener_logs_log_callbacks_epochs_from_the_driver(local_store: str, tmp_path: Path):
    """``HorovodRunner(on_report=MlflowEpochs())``, fed through the runner's own report path (no ranks)."""
    import mlflow
    from mlflow import MlflowClient

    from sparkml_mnist.launcher import MlflowEpochs
    from sparkml_mnist.launcher.driver.reports import RunReports
    from sparkml_mnist.launcher.driver.store import CheckpointStore
    from sparkml_mnist.launcher.mlflow_epochs import LOG_CALLBACK_KEY

    mlflow.set_tracking_uri(local_store)
    try:
        experiment = mlflow.create_experiment(f"test-{tmp_path.name}", artifact_location=tmp_path.as_uri())
        with mlflow.start_run(experiment_id=experiment) as run, MlflowEpochs() as epochs:
            reports = RunReports(CheckpointStore(tmp_path / "store"), on_report=epochs)
            for rank, key, epoch in [(0, LOG_CALLBACK_KEY, 1), (1, LOG_CALLBACK_KEY, 1), (0, "variant1", 1),
                                     (0, LOG_CALLBACK_KEY, 1), (0, LOG_CALLBACK_KEY, 2)]:
                reports.keep(rank, key, epoch_report(epoch), None)
    finally:
        mlflow.set_tracking_uri(None)
    client = MlflowClient(local_store)
    for key in ("loss", "accuracy"):
        logged = client.get_metric_history(run.info.run_id, key)
        assert [(m.step, m.value) for m in logged] == [(e, pytest.approx(epoch_report(e)[key])) for e in (1, 2)]
    assert epochs.enabled
    with pytest.raises(ConfigError, match="no MLflow run is active"):
        MlflowEpochs()


def test_a_registered_models_name_is_checked_before_spark_and_gets_the_variant(capsys) -> None:
    from sparkml_mnist.cli import commands as cli
    from sparkml_mnist.config.runs import model_name_problem

    assert model_name_problem("mnist") is None and model_name_problem("main.ml.mnist-cnn") is None  # UC: 3 levels
    assert all(model_name_problem(bad) for bad in ("ml.mnist", "a..b", "", "mnist cnn", "a/b", "x" * 201))
    assert cli.main(["-q", "train", "--variant", "variant1", "--register-model", "ml.mnist"]) == cli.EXIT_USAGE
    [line] = capsys.readouterr().err.splitlines()
    assert "field 'register_model' (--register-model) 'ml.mnist' is not a model name" in line
    if importlib.util.find_spec("mlflow") is not None:
        from sparkml_mnist.job.tracking import registered_name

        assert registered_name("main.ml.mnist", "variant-1.b") == "main.ml.mnist_variant_1_b"


@pytest.mark.mlflow
def test_a_finished_run_logged_to_a_local_store_reads_back_whole(spark, trained_run, tmp_path: Path) -> None:
    """What run_job logs once its report is written (the job's own logging is read back from the server
    above), logged here from the session's trained run: a local store, with no job of its own."""
    from sparkml_mnist.data.libsvm import load_libsvm
    from sparkml_mnist.data.paths import sample_paths
    from sparkml_mnist.job.plan import plan_job
    from sparkml_mnist.job.run import signature_examples
    from sparkml_mnist.job.tracking import Tracking, log_variants, run_params, variant_params
    from sparkml_mnist.report import VariantResult, collect_versions

    folder, settings = trained_run.output, trained_run.report["config"]["run"]
    assert settings["epochs"] == EPOCHS  # read_back's expectation
    names = [entry["name"] for entry in trained_run.report["variants"]]
    plan = plan_job(load_run("sample").with_overrides(
        variants=",".join(names), np=settings["np"], epochs=settings["epochs"],
        deterministic=settings["deterministic"], output=str(tmp_path / "unused")))
    results = [VariantResult.from_dict(entry, sorted((folder / "models" / entry["name"]).glob("*.keras")))
               for entry in trained_run.report["variants"]]
    x_sample = signature_examples(load_libsvm(spark, sample_paths().test))  # raw pixels, as the job logs them
    uri = f"sqlite:///{tmp_path / 'local.db'}"
    tracking = Tracking(uri, experiment=f"test-{tmp_path.name}", artifact_location=(tmp_path / "artifacts").as_uri())
    tracking.start(plan.run.name, run_params(plan.run, plan.placement, collect_versions()))
    params = {v.name: variant_params(v, plan.placement, plan.run.seed, plan.run.deterministic) for v in plan.variants}
    log_variants(tracking, results, params, folder, x_sample)
    tracking.end(folder)
    assert tracking.enabled and set(tracking.children) == set(names)
    read_back(uri, tracking, folder, np_=settings["np"])


@pytest.mark.mlflow
def test_an_unreachable_tracking_server_is_a_warning_and_the_report_is_written(trained_run) -> None:
    """The trained run had MLFLOW_TRACKING_URI pointing at a closed port (tests/conftest.py)."""
    if "MLFLOW_TRACKING_URI" not in trained_run.env:
        pytest.skip("mlflow is not installed: the trained run was not pointed at a tracking server")
    warnings = [line for line in trained_run.stderr.splitlines() if "cannot be reached" in line]
    assert len(warnings) == 1 and "MLflow tracking is off for this run, the report is written" in warnings[0]
    assert [v["name"] for v in trained_run.report["variants"]] == ["variant1", "variant3"]
    assert not (trained_run.output.parent / "mlruns").exists()  # nothing was logged anywhere else instead


# -- live progress ----------------------------------------------------------------------------------


class Keep(logging.Handler):
    """What a library user's handler receives."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def watched_run(spark) -> tuple[Any, list[logging.LogRecord], list[logging.LogRecord], list[tuple[str, int, dict]]]:
    """``keras_main`` at np=2, with a library user's handlers on the progress logger (lines every second)
    and on the ranks' logger, and an ``on_report`` listener: (the run's result, progress records, rank line
    records, the reports the listener heard)."""
    from sparkml_mnist.launcher.driver import board

    loggers = [logging.getLogger(name) for name in ("sparkml_mnist.progress", "sparkml_mnist.ranks")]
    handlers = [Keep(), Keep()]
    heard: list[tuple[str, int, dict]] = []
    before = [logger.level for logger in loggers]
    for logger, handler in zip(loggers, handlers):
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(board, "DEFAULT_INTERVAL_S", 1.0)
            outcome = HorovodRunner(np=2, spark=spark, on_report=lambda key, rank, metrics, checkpoint:
                                    heard.append((key, rank, metrics))).run_all(keras_main)
    finally:
        for logger, handler, level in zip(loggers, handlers, before):
            logger.removeHandler(handler)
            logger.setLevel(level)
    return outcome, handlers[0].records, handlers[1].records, heard


def test_the_driver_sees_every_ranks_steps_and_logs_them_now_and_then(watched_run) -> None:
    outcome, progress, _, _ = watched_run
    records = outcome.records
    lines = [r.getMessage() for r in progress]
    for rank in (0, 1):
        steps = [int(line.split("step ")[1].split()[0]) for line in lines if f"rank {rank} (" in line and "step " in line]
        assert len(steps) >= 2 and steps == sorted(steps), lines  # periodic, in order
        assert records[rank].steps == EPOCHS * STEPS  # the totals match the training
    summary = outcome.ranks
    assert summary is not None and all(rate and rate > 0 for rate in summary["steps_per_s"].values())
    assert any("loss" in line and f"/{EPOCHS}  step " in line for line in lines)  # img/s: when the input is ours


def test_the_board_names_a_straggler_and_renders_one_line_per_rank() -> None:
    clock = [100.0]
    board = LiveBoard(2, title="v", clock=lambda: clock[0])
    board.update(0, Heartbeat(steps=40, first_step_at=90.0, epoch=2, epochs=3, loss=0.5, fit_examples=640,
                              host="a"))
    board.update(1, Heartbeat(steps=20, first_step_at=90.0, host="b"))
    assert board.lines()[0] == "v rank 0 (a):  epoch 2/3  step 40  loss 0.5000  64 img/s"
    summary = board.summary()
    assert summary["straggler"] == "rank 1 on b ran at 0.50x the fastest rank's step rate"
    assert straggler_summary({0: 2.0, 1: 1.9}, {0: "a", 1: "b"})["straggler"] is None


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_a_terminal_shows_the_ranks_lines_updating_in_place(tmp_path: Path) -> None:
    session = f"sparkml-mnist-{os.getpid()}"
    command = (f"{sys.executable} -m sparkml_mnist.cli train --variant variant3 --epochs 1 --np 2 "
               f"--output {tmp_path / 'out'}; echo EXIT=$?; sleep 600")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50", command], check=True)
    screens = []
    try:
        deadline = time.monotonic() + CLI_TIMEOUT_S
        while time.monotonic() < deadline:
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout
            screens.append(screen)
            if "EXIT=" in screen:
                break
            time.sleep(1.0)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    assert "EXIT=0" in screens[-1], screens[-1]
    live = [s for s in screens if "variant3 rank 1 (" in s and " step " in s]
    assert any(" img/s" in s for s in live)  # the job's input pipeline says how many images a step takes
    assert len(live) >= 2, "the ranks' progress lines were on screen while they trained"
    for screen in live:  # in place: one line per rank on the screen at any time, never a growing list
        assert screen.count("variant3 rank 0 (") == 1 and screen.count("variant3 rank 1 (") == 1
    steps = {int(s.split("variant3 rank 0 (")[1].split(" step ")[1].split()[0]) for s in live}
    assert len(steps) >= 2, "the same line showed different steps over time"
    assert "variant3 rank 0 (" not in screens[-1]  # cleared when training ended


# -- logging -----------------------------------------------------------------------------------------


def test_quiet_prints_only_the_result_table_and_errors(quiet_rerun) -> None:
    """The determinism pair's second run (tests/conftest.py) ran at -q."""
    run = quiet_rerun.run
    lines = run.stdout.splitlines()
    assert lines[0].startswith("variant ") and set(lines[1]) == {"-", " "}
    assert [line.split()[0] for line in lines[2:]] == ["variant1", "variant3"]  # the table, nothing else
    ours = [line for line in run.stderr.splitlines()
            if not line.startswith(("WARNING: Using incubator modules", "Setting default log level",
                                    "To adjust logging level"))]
    assert ours == [], ours  # the JVM's own start-up lines are all that is left


def test_verbose_shows_tensorflows_notices_and_times(trained_run) -> None:
    """The session's trained run (tests/conftest.py) ran at -v."""
    assert "oneDNN" in trained_run.stderr or "cpu_feature_guard" in trained_run.stderr
    assert " sparkml_mnist.job.run: reading and checking " in trained_run.stderr  # time and logger name at -v


def test_a_library_users_handler_gets_rank_lines_with_the_rank(watched_run) -> None:
    _, _, received, _ = watched_run
    epochs = [r for r in received if r.getMessage().startswith("epoch ")]
    assert len(epochs) == EPOCHS and all(r.rank == 0 and r.stream == "log" for r in epochs)


def test_log_callback_reports_rank_0s_epochs_to_the_drivers_listener(watched_run) -> None:
    """What ``MlflowEpochs`` logs for a HorovodRunner user: each epoch's exact logs, heard as it ends."""
    from sparkml_mnist.launcher.mlflow_epochs import LOG_CALLBACK_KEY, epoch_metrics

    _, _, received, heard = watched_run
    epochs = [(rank, epoch_metrics(metrics)) for key, rank, metrics in heard if key == LOG_CALLBACK_KEY]
    assert [(rank, found[0]) for rank, found in epochs] == [(0, epoch) for epoch in range(1, EPOCHS + 1)]
    lines = [r.getMessage() for r in received if r.getMessage().startswith("epoch ")]
    for (_, (_, values)), line in zip(epochs, lines):  # the same values as the epoch's line, unrounded
        assert set(values) == {"loss"} and f"loss {values['loss']:.4f}" in line


def test_the_cli_called_in_process_leaves_logging_as_it_found_it(capsys) -> None:
    """A notebook or wheel task calling cli.main goes on afterwards: no handler may outlive the command."""
    from sparkml_mnist.cli import commands as cli

    package, warnings_logger = logging.getLogger("sparkml_mnist"), logging.getLogger("py.warnings")
    before = [(list(lg.handlers), lg.propagate, lg.level) for lg in (package, warnings_logger)]
    assert cli.main(["-q", "train", "--variant", "no-such-variant", "--epochs", "1"]) == cli.EXIT_USAGE
    assert "no-such-variant" in capsys.readouterr().err
    assert [(list(lg.handlers), lg.propagate, lg.level) for lg in (package, warnings_logger)] == before
    assert "MLFLOW_LOGGING_LEVEL" not in os.environ


@pytest.mark.parametrize(("verbosity", "mlflow_level"), [(-1, "WARNING"), (0, "WARNING"), (1, None)])
def test_mlflow_says_info_only_at_verbose(monkeypatch, verbosity: int, mlflow_level: str | None) -> None:
    """MLflow's own INFO lines (database set-up, signature checks) would land among the epoch lines."""
    import io

    from sparkml_mnist.cli import console

    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    with console.configured(verbosity, io.StringIO()):
        assert os.environ.get("MLFLOW_LOGGING_LEVEL") == mlflow_level
    assert "MLFLOW_LOGGING_LEVEL" not in os.environ
