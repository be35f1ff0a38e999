"""MLflow tracking from the driver: one parent run per job, one child run per variant.

On when ``--mlflow`` is given or ``MLFLOW_TRACKING_URI`` is set (on Databricks, the workspace's server).
Everything is logged from the driver, from what the ranks reported (no tokens on workers): each
variant's parameters (its config, np, backend, seed, versions; nothing secret), per-epoch metrics with
``step=epoch``, test metrics (loss, accuracy, per class), its plots, and its model as a pyfunc with a
signature; the parent gets ``report.md``/``report.json`` and the comparison plot. A server that cannot
be reached is a warning at start and the job goes on; an MLflow error never loses the report.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

from sparkml_mnist.errors import ConfigError
from sparkml_mnist.redact import redact, redact_all

logger = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_EXPERIMENT = "sparkml-mnist"
PROBE_TIMEOUT_S = 5.0
# MLflow's own HTTP retries take minutes on a dead server; the job keeps them short.
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
INSTALL_HINT = "install it with `pip install \".[mlflow]\"`"
MODEL_NAME = "model"
PACKAGE_DIR = Path(__file__).resolve().parent
PYFUNC_CODE = PACKAGE_DIR / "mlflow_model.py"  # "models from code": MLflow runs it to load the model
KERAS_ARTIFACT = "keras_model"  # mlflow_model.KERAS_ARTIFACT (that module imports mlflow when imported)


def tracking_wanted(flag: bool | None) -> bool:
    return bool(flag) or bool(os.environ.get(TRACKING_URI_ENV))


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
        self.enabled = True
        self._client: Any = None

    # -- the job ----------------------------------------------------------------------------------

    def start(self, run_name: str, params: dict[str, Any]) -> None:
        """The parent run; an unreachable server turns tracking off with one warning."""
        # MLflow reads these from the environment, and set_tracking_uri writes MLFLOW_TRACKING_URI there
        # (for its subprocesses): what was there before comes back in finish(), so neither the caller's
        # process nor the programs it starts later log to this run's server by surprise. Set here, not
        # when made, since a job that fails before it starts never calls finish().
        self._saved_environment = {key: os.environ.get(key) for key in (TRACKING_URI_ENV, *HTTP_SETTINGS)}
        for key, value in HTTP_SETTINGS.items():
            os.environ.setdefault(key, value)
        problem = _unreachable(self.tracking_uri)
        if problem:
            self._disable(f"the MLflow tracking server at {redact(self.tracking_uri)} cannot be reached ({problem})")
            return
        self._guard("start the job's MLflow run", self._start, run_name, params)

    def _start(self, run_name: str, params: dict[str, Any]) -> None:
        self._mlflow.set_tracking_uri(self.tracking_uri)
        self._client = self._mlflow.MlflowClient(self.tracking_uri)
        found = self._client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found else self._client.create_experiment(
            self.experiment, artifact_location=self.artifact_location)
        self._experiment_id = experiment_id
        run = self._client.create_run(experiment_id, run_name=run_name)
        self.parent_id = run.info.run_id
        self._log_params(self.parent_id, params)
        logger.info("MLflow: logging to experiment %r at %s (run %s)", self.experiment,
                    redact(self.tracking_uri), self.parent_id)

    def variant(self, result: Any, variant_params: dict[str, Any], report: Path, x_sample: Any) -> None:
        """A child run for one finished variant, from the report's folder (plots, model) and its result."""
        self._guard(f"log {result.name} to MLflow", self._variant, result, variant_params, report, x_sample)

    def _variant(self, result: Any, variant_params: dict[str, Any], report: Path, x_sample: Any) -> None:
        from mlflow.entities import Metric

        run = self._client.create_run(self._experiment_id, run_name=result.name,
                                      tags={"mlflow.parentRunId": self.parent_id})
        run_id = self.children[result.name] = run.info.run_id
        self._log_params(run_id, {**variant_params, "parameter_count": result.parameter_count})
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, epoch + 1)
                   for key, values in result.history.items() for epoch, value in enumerate(values)]
        evaluation = result.evaluation
        test = {"test_loss": evaluation.loss, "test_accuracy": evaluation.accuracy}
        for name, precision, recall, f1 in zip(evaluation.class_names, evaluation.precision, evaluation.recall,
                                               evaluation.f1):
            test.update({f"test_precision_{name}": precision, f"test_recall_{name}": recall, f"test_f1_{name}": f1})
        metrics += [Metric(key, float(value), now, 0) for key, value in test.items()]
        self._client.log_batch(run_id, metrics=metrics)
        for plot in (result.loss_plot, result.confusion_plot):
            self._client.log_artifact(run_id, str(report / plot))
        model_files = sorted((report / "models" / result.name).glob("*.keras"))
        if model_files:
            self._log_model(run_id, model_files[0], x_sample)
        self._client.set_terminated(run_id, "FINISHED")

    def _log_model(self, run_id: str, keras_file: Path, x_sample: Any) -> None:
        from mlflow.models import infer_signature

        from sparkml_mnist.launcher.keras_flavour import keras

        probabilities = keras().models.load_model(keras_file, compile=False).predict(x_sample, verbose=0)
        with self._mlflow.start_run(run_id=run_id):
            info = self._mlflow.pyfunc.log_model(
                name=MODEL_NAME, python_model=str(PYFUNC_CODE), artifacts={KERAS_ARTIFACT: str(keras_file)},
                signature=infer_signature(x_sample, probabilities), input_example=x_sample,
                code_paths=[str(PACKAGE_DIR)], pip_requirements=_requirements(),
            )
        self._client.set_tag(run_id, "model_uri", info.model_uri)

    def end(self, report: Path | None, failed: bool = False) -> None:
        """The parent run's artifacts and status; the process's environment as it was before."""
        try:
            self._guard("finish the job's MLflow run", self._finish, report, failed)
        finally:
            for key, value in self._saved_environment.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def _finish(self, report: Path | None, failed: bool) -> None:
        if self.parent_id is None:
            return
        if report is not None:
            for name in ("report.md", "report.json", "comparison.png"):
                if (report / name).exists():
                    self._client.log_artifact(self.parent_id, str(report / name))
        self._client.set_terminated(self.parent_id, "FAILED" if failed else "FINISHED")
        self.parent_id = None

    # -- safety -----------------------------------------------------------------------------------

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = {key: value if isinstance(value, str) else json.dumps(value, default=str)
                for key, value in redact_all(params).items() if value is not None}
        self._client.log_batch(run_id, params=[Param(key, value[:6000]) for key, value in flat.items()])

    def _guard(self, what: str, action: Any, *args: Any) -> None:
        if not self.enabled:
            return
        try:
            action(*args)
        except Exception as error:  # MLflow must never cost the run or its report
            self._disable(f"could not {what} ({type(error).__name__}: {redact(str(error)).splitlines()[0][:300]})")

    def _disable(self, reason: str) -> None:
        self.enabled = False
        logger.warning("%s; MLflow tracking is off for this run, the report is written as usual", reason)


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


def _requirements() -> list[str]:
    from sparkml_mnist.launcher.packages import installed_version

    found = {name: installed_version(name) for name in ("tensorflow-cpu", "tensorflow", "tf-keras", "numpy", "PyYAML")}
    return [f"{name}=={version}" for name, version in found.items() if version is not None]


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
