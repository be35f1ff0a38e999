"""MLflow tracking from the driver: one parent run per job, one child run per variant, live while it trains.

On when ``--mlflow`` or ``--register-model`` is given or ``MLFLOW_TRACKING_URI`` is set (on Databricks, the
workspace's server). Everything is logged from the driver, from what the ranks reported (no tokens on
workers). The parent run starts with the job (its settings, versions); a variant's child run starts when
the driver hears its first epoch (rank 0's report with its checkpoint), and each epoch's metrics are logged
then with ``step=epoch``, so the UI draws the curves during the run. Once the job succeeds each child gets
its test metrics (loss, accuracy, per class), its plots and its model as a pyfunc with a signature
(registered as ``<register_model>_<variant>`` when asked), and the parent ``report.md``/``report.json`` and
the comparison plot. A failed job ends its runs FAILED (KILLED when interrupted) with the epochs they had;
``--resume`` continues the newest unfinished parent logged for that output, and each child logs only the
epochs it lacks. A server that cannot be reached is a warning at start and the job goes on; an MLflow
error never loses the run or its report. The MLflow calls of the live epochs run on a thread of their own:
a report arrives on a channel thread, which must not wait on a server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import socket
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

from sparkml_mnist.errors import ConfigError
from sparkml_mnist.launcher.mlflow_epochs import CHIEF_RANK, FLUSH_TIMEOUT_S, epoch_metrics
from sparkml_mnist.redact import redact, redact_all

logger = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_EXPERIMENT = "sparkml-mnist"
PROBE_TIMEOUT_S = 5.0
# MLflow's own HTTP retries take minutes on a dead server; the job keeps them short.
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
INSTALL_HINT = "install it with `pip install \".[mlflow]\"`"
MODEL_NAME = "model"
RUNNING, FINISHED, FAILED, KILLED = "RUNNING", "FINISHED", "FAILED", "KILLED"  # MLflow's run statuses
PARENT_TAG = "mlflow.parentRunId"
# The parent run's tag naming the output it writes (a digest: no quoting in a search), so --resume finds it.
OUTPUT_TAG = "sparkml_mnist.output"
OUTPUT_DIGEST_CHARS = 32
REGISTERED_TAG = "registered_model"  # a child's registered model version: "<name>/<version>"
TEST_PREFIX = "test_"  # a child's test metrics (step 0); its other metrics are per epoch (step = epoch)
UNSAFE_IN_MODEL_NAME = re.compile(r"[^A-Za-z0-9_]")  # a variant's "." or "-" would break a Unity Catalog name
ERROR_CHARS = 300  # of an MLflow error's first line, in the warning


def tracking_wanted(flag: bool | None) -> bool:
    return bool(flag) or bool(os.environ.get(TRACKING_URI_ENV))


def ended_status(error: BaseException) -> str:
    """The status a job's runs end with when ``error`` stopped it: Ctrl-C or SIGTERM (exit 130) is KILLED."""
    return KILLED if isinstance(error, KeyboardInterrupt) else FAILED


def registered_name(base: str, variant: str) -> str:
    """Where a variant's model is registered: ``base_variant`` (``main.ml.mnist_variant1`` on Unity Catalog)."""
    return f"{base}_{UNSAFE_IN_MODEL_NAME.sub('_', variant)}"


def output_digest(output: str) -> str:
    return hashlib.sha256(output.encode("utf-8")).hexdigest()[:OUTPUT_DIGEST_CHARS]


class Tracking:
    """Logs a job to MLflow; every method is safe to call after a failure (it then does nothing)."""

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None,
                 artifact_location: str | None = None) -> None:
        try:
            import mlflow  # noqa: PLC0415 - an optional extra
        except ImportError:
            raise ConfigError(f"MLflow tracking was asked for, but mlflow is not installed: {INSTALL_HINT}") from None
        self._saved_environment: dict[str, str | None] = {}  # see start()
        self._mlflow = mlflow
        self.tracking_uri = tracking_uri or os.environ.get(TRACKING_URI_ENV) or mlflow.get_tracking_uri()
        self.experiment = experiment or DEFAULT_EXPERIMENT
        self.artifact_location = artifact_location  # a new experiment's artifact root (MLflow's default: ./mlruns)
        self.parent_id: str | None = None
        self.children: dict[str, str] = {}
        self.register_as: str | None = None  # the run's register_model
        self.resumed = False  # the parent is an earlier, unfinished run's (--resume)
        self.enabled = True
        self._client: Any = None
        self._variant_params: dict[str, dict[str, Any]] = {}  # logged when a variant's child run starts
        self._param_keys: dict[str, set[str]] = {}  # per run: the params it has (MLflow refuses a changed one)
        self._steps: dict[str, set[int]] = {}  # per variant: the epochs its child run has
        self._finished: set[str] = set()  # variants whose child run was ended FINISHED
        self._queue: queue.Queue[tuple[str, int, dict[str, float], int] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # reports arrive on several channel threads

    # -- the job ----------------------------------------------------------------------------------

    def start(self, run_name: str, params: dict[str, Any], variants: dict[str, dict[str, Any]] | None = None,
              output: str | None = None, resume: bool = False, register_as: str | None = None) -> None:
        """The parent run, and the thread that logs epochs as they come; an unreachable server turns
        tracking off with one warning.

        ``variants``: each variant's parameters (its epochs are logged live only when given). ``output``: the
        run's output folder, tagged on the parent so that a ``resume`` continues the newest unfinished run
        logged for it. ``register_as``: the run's ``register_model``.
        """
        # MLflow reads these from the environment, and set_tracking_uri writes MLFLOW_TRACKING_URI there
        # (for its subprocesses): what was there before comes back in end(), so neither the caller's
        # process nor the programs it starts later log to this run's server by surprise. Set here, not
        # when made, since a job that fails before it starts never calls end().
        self._saved_environment = {key: os.environ.get(key) for key in (TRACKING_URI_ENV, *HTTP_SETTINGS)}
        for key, value in HTTP_SETTINGS.items():
            os.environ.setdefault(key, value)
        self._variant_params = dict(variants or {})
        self.register_as = register_as
        problem = _unreachable(self.tracking_uri)
        if problem:
            self._disable(f"the MLflow tracking server at {redact(self.tracking_uri)} cannot be reached ({problem})")
            return
        self._guard("start the job's MLflow run", self._start, run_name, params, output, resume)
        if self.enabled and self._variant_params:
            self._thread = threading.Thread(target=self._work, name="sparkml-mnist-mlflow", daemon=True)
            self._thread.start()

    def _start(self, run_name: str, params: dict[str, Any], output: str | None, resume: bool) -> None:
        self._mlflow.set_tracking_uri(self.tracking_uri)
        self._client = self._mlflow.MlflowClient(self.tracking_uri)
        found = self._client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found else self._client.create_experiment(
            self.experiment, artifact_location=self.artifact_location)
        self._experiment_id = experiment_id
        unfinished = self._unfinished(output) if resume and output else None
        if unfinished is not None:
            self.parent_id, self.resumed = unfinished.info.run_id, True
            self._param_keys[self.parent_id] = set(unfinished.data.params)
            self._client.update_run(self.parent_id, status=RUNNING)
            self._reopen_children()
        else:
            tags = {OUTPUT_TAG: output_digest(output)} if output else None
            self.parent_id = self._client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        self._log_params(self.parent_id, params)
        logger.info("MLflow: logging to experiment %r at %s (%s run %s)", self.experiment, redact(self.tracking_uri),
                    "continuing" if self.resumed else "new", self.parent_id)

    def _unfinished(self, output: str) -> Any:
        """The newest parent run logged for ``output``, when it did not finish (what --resume continues)."""
        newest = self._client.search_runs([self._experiment_id],
                                          filter_string=f"tags.`{OUTPUT_TAG}` = '{output_digest(output)}'",
                                          order_by=["attributes.start_time DESC"], max_results=1)
        return newest[0] if newest and newest[0].info.status != FINISHED else None

    def _reopen_children(self) -> None:
        """An unfinished parent's child runs, running again, with the epochs and params each already has."""
        for child in self._client.search_runs([self._experiment_id],
                                              filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_id}'"):
            name, run_id = child.info.run_name, child.info.run_id
            self.children[name] = run_id
            self._param_keys[run_id] = set(child.data.params)
            self._steps[name] = {metric.step for key in child.data.metrics if not key.startswith(TEST_PREFIX)
                                 for metric in self._client.get_metric_history(run_id, key)}
            self._client.update_run(run_id, status=RUNNING)

    # -- live epochs --------------------------------------------------------------------------------

    def on_report(self, key: str, rank: int, metrics: dict[str, Any], checkpoint: Any = None) -> None:
        """The runner's report listener (a channel thread): queue rank 0's epoch of a variant, never wait."""
        if rank != CHIEF_RANK or key not in self._variant_params or not self.enabled:
            return
        found = epoch_metrics(metrics)
        if found is None:
            return
        with self._lock:
            if self._thread is None:  # not started, or stopped: the job is ending
                return
            self._queue.put((key, *found, int(time.time() * 1000)))

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            self._guard(f"log epoch {item[1]} of {item[0]} to MLflow", self._epoch, *item)

    def _epoch(self, name: str, epoch: int, values: dict[str, float], timestamp: int) -> None:
        from mlflow.entities import Metric

        steps = self._steps.setdefault(name, set())
        if epoch in steps:  # logged by the run this one resumes
            return
        self._client.log_batch(self._child(name), metrics=[Metric(key, value, timestamp, epoch)
                                                           for key, value in values.items()])
        steps.add(epoch)

    def _stop_live(self) -> None:
        """Log the epochs heard so far (waiting up to FLUSH_TIMEOUT_S); later reports are ignored."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.put(None)
        thread.join(FLUSH_TIMEOUT_S)
        if thread.is_alive():
            self._disable(f"MLflow did not take the last epochs within {FLUSH_TIMEOUT_S:.0f} s")

    def _child(self, name: str) -> str:
        """A variant's child run: made (with the variant's params) the first time it is asked for."""
        run_id = self.children.get(name)
        if run_id is None:
            run = self._client.create_run(self._experiment_id, run_name=name, tags={PARENT_TAG: self.parent_id})
            run_id = self.children[name] = run.info.run_id
        self._log_params(run_id, self._variant_params.get(name, {}))
        return run_id

    # -- the job's end ----------------------------------------------------------------------------

    def variant(self, result: Any, variant_params: dict[str, Any], report: Path, x_sample: Any) -> None:
        """A finished variant's test metrics, plots and model (registered when asked), from the report's
        folder and its result; the epochs its child run lacks; the child run FINISHED."""
        self._stop_live()
        self._guard(f"log {result.name} to MLflow", self._variant, result, variant_params, report, x_sample)

    def _variant(self, result: Any, variant_params: dict[str, Any], report: Path, x_sample: Any) -> None:
        from mlflow.entities import Metric

        run_id = self._child(result.name)
        self._log_params(run_id, {**variant_params, "parameter_count": result.parameter_count})
        now = int(time.time() * 1000)
        logged = self._steps.get(result.name, set())
        metrics = [Metric(key, value, now, epoch + 1) for key, values in result.history.items()
                   for epoch, value in enumerate(values) if epoch + 1 not in logged]
        evaluation = result.evaluation
        test = {f"{TEST_PREFIX}loss": evaluation.loss, f"{TEST_PREFIX}accuracy": evaluation.accuracy}
        for name, precision, recall, f1 in zip(evaluation.class_names, evaluation.precision, evaluation.recall,
                                               evaluation.f1):
            test.update({f"{TEST_PREFIX}precision_{name}": precision, f"{TEST_PREFIX}recall_{name}": recall,
                         f"{TEST_PREFIX}f1_{name}": f1})
        metrics += [Metric(key, float(value), now, 0) for key, value in test.items()]
        self._client.log_batch(run_id, metrics=metrics)
        for plot in (result.loss_plot, result.confusion_plot):
            self._client.log_artifact(run_id, str(report / plot))
        model_files = sorted((report / "models" / result.name).glob("*.keras"))
        if model_files:
            model_uri = self._log_model(run_id, model_files[0], x_sample)
            if self.register_as:
                self._register(result.name, run_id, model_uri)
        self._client.set_terminated(run_id, FINISHED)
        self._finished.add(result.name)

    def _log_model(self, run_id: str, keras_file: Path, x_sample: Any) -> str:
        """The model as this package's pyfunc (raw pixels in), so what is served is what the tests load."""
        from sparkml_mnist.job import serving

        with self._mlflow.start_run(run_id=run_id):
            info = serving.log_pyfunc(keras_file, x_sample, name=MODEL_NAME)
        self._client.set_tag(run_id, "model_uri", info.model_uri)
        return str(info.model_uri)

    def _register(self, variant: str, run_id: str, model_uri: str) -> None:
        """A new version of ``registered_name(register_as, variant)`` in the registry MLflow's registry URI
        names (the tracking server's, or ``databricks-uc``); a refusal is a warning, the model stays logged."""
        name = registered_name(str(self.register_as), variant)
        try:
            version = self._mlflow.register_model(model_uri, name)
            self._client.set_tag(run_id, REGISTERED_TAG, f"{name}/{version.version}")
        except Exception as error:  # the registry's refusal must not cost the run's other logging
            logger.warning("could not register the model of %s as %r (%s: %s); it stays logged in run %s", variant,
                           name, type(error).__name__, _first_line(error), run_id)
            return
        logger.info("MLflow: registered the model of %s as %s version %s", variant, name, version.version)

    def end(self, report: Path | None, status: str = FINISHED) -> None:
        """The parent run's artifacts; it and every child run not yet finished end with ``status`` (a failed
        job's runs keep the epochs they had); the process's environment as it was before."""
        try:
            self._stop_live()
            self._guard("finish the job's MLflow run", self._finish, report, status)
        finally:
            for key, value in self._saved_environment.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def _finish(self, report: Path | None, status: str) -> None:
        if self.parent_id is None:
            return
        for name, run_id in self.children.items():
            if name not in self._finished:
                self._client.set_terminated(run_id, status)
        if report is not None:
            for name in ("report.md", "report.json", "comparison.png"):
                if (report / name).exists():
                    self._client.log_artifact(self.parent_id, str(report / name))
        self._client.set_terminated(self.parent_id, status)
        self.parent_id = None

    # -- safety -----------------------------------------------------------------------------------

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """The params ``run_id`` lacks (MLflow refuses a changed value: a resumed run keeps its first)."""
        from mlflow.entities import Param

        have = self._param_keys.setdefault(run_id, set())
        flat = {key: value if isinstance(value, str) else json.dumps(value, default=str)
                for key, value in redact_all(params).items() if value is not None and key not in have}
        if flat:
            self._client.log_batch(run_id, params=[Param(key, value[:6000]) for key, value in flat.items()])
            have.update(flat)

    def _guard(self, what: str, action: Any, *args: Any) -> None:
        if not self.enabled:
            return
        try:
            action(*args)
        except Exception as error:  # MLflow must never cost the run or its report
            self._disable(f"could not {what} ({type(error).__name__}: {_first_line(error)})")

    def _disable(self, reason: str) -> None:
        self.enabled = False
        logger.warning("%s; MLflow tracking is off for this run, the report is written as usual", reason)


def _first_line(error: BaseException) -> str:
    return (redact(str(error)).splitlines() or [""])[0][:ERROR_CHARS]


def _unreachable(uri: str) -> str | None:
    """Why an http(s) tracking server cannot be reached (None: it can, or the store is not over the network)."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return None
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as error:
        return error.strerror or str(error)
    return None


def run_params(run: Any, placement: Any, versions: dict[str, str]) -> dict[str, Any]:
    """The job-level parameters (nothing secret: URIs are masked, no environment or Spark conf)."""
    fields = asdict(run)
    fields.pop("source", None)
    return {**fields, "np": placement.np, "backend": placement.backend,
            **{f"version.{name}": version for name, version in versions.items()}}


def variant_params(variant: Any, placement: Any, seed: int, deterministic: bool) -> dict[str, Any]:
    fields = asdict(variant)
    fields.pop("source", None)
    return {**fields, "np": placement.np, "backend": placement.backend, "seed": seed,
            "deterministic": deterministic}


def log_variants(tracking: Tracking | None, results: Sequence[Any], params: dict[str, dict[str, Any]],
                 report: Path, x_sample: Any) -> None:
    if tracking is None:
        return
    for result in results:
        tracking.variant(result, params.get(result.name, {}), report, x_sample)
