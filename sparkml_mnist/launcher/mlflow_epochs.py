"""Live MLflow curves for a ``HorovodRunner`` run: rank 0's epochs, logged by the driver as it hears them.

``LogCallback`` (sparkdl's) sends rank 0's epoch logs to the driver as a line, and also as a report under
``LOG_CALLBACK_KEY`` (``{"epoch": n, "loss": ...}``, exact values, no checkpoint). ``MlflowEpochs`` is an
``on_report`` listener that logs those to an MLflow run with ``step=epoch`` while the ranks train::

    with mlflow.start_run(), MlflowEpochs() as epochs:
        HorovodRunner(np=2, on_report=epochs).run(main)

Why a listener on the driver: the workers need no MLflow client and no token, and the curves show up in
the UI during the run, not after it. MLflow is imported when one is made (on the driver), never by a rank.
The calls run on a thread of its own (a report arrives on a channel thread, which must not wait on a
server), and an MLflow error is one warning: the run goes on, nothing more is logged.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Sequence

from sparkml_mnist.errors import ConfigError
from sparkml_mnist.redact import redact

logger = logging.getLogger(__name__)

LOG_CALLBACK_KEY = "LogCallback"  # the report key of LogCallback's epoch logs (rank 0's)
EPOCH_FIELD = "epoch"  # a report's epoch number, counted from 1 (the job's EpochCallback sends it too)
CHIEF_RANK = 0  # the rank whose epoch logs are reported (the ranks' metrics agree)
FLUSH_TIMEOUT_S = 120.0  # how long close() waits for MLflow to take the epochs heard so far
PLAIN_KEYS = (LOG_CALLBACK_KEY, "")  # their metrics keep their names; another key's get "<key>." in front
ERROR_CHARS = 300  # of an MLflow error's first line, in the warning


def epoch_metrics(metrics: Any) -> tuple[int, dict[str, float]] | None:
    """A report's epoch and its numeric metrics, or None when it is no epoch's report."""
    if not isinstance(metrics, dict):
        return None
    epoch = metrics.get(EPOCH_FIELD)
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        return None
    values = {str(name): float(value) for name, value in metrics.items()
              if name != EPOCH_FIELD and isinstance(value, (int, float)) and not isinstance(value, bool)}
    return (epoch, values) if values else None


class MlflowEpochs:
    """``HorovodRunner(on_report=MlflowEpochs())``: rank 0's epoch reports -> metrics of one MLflow run.

    ``run_id``: the run to log to (default: the active run, ``mlflow.start_run()``, of the thread that makes
    this). ``keys``: the report keys whose epochs are logged (default: ``LogCallback``'s); a key other than
    ``LogCallback``'s or ``""`` puts its name in front of its metrics (``variant1.loss``). An epoch is logged
    once: a retried attempt's repeat of one is left out. ``close()`` (or leaving a ``with`` block) waits for
    the epochs heard so far to be logged.
    """

    def __init__(self, run_id: str | None = None, keys: Sequence[str] = (LOG_CALLBACK_KEY,),
                 tracking_uri: str | None = None) -> None:
        try:
            import mlflow  # noqa: PLC0415 - optional, and only ever on the driver
        except ImportError:
            raise ConfigError("MlflowEpochs: mlflow is not installed on the driver (pip install mlflow)") from None
        if run_id is None:
            active = mlflow.active_run()
            if active is None:
                raise ConfigError("MlflowEpochs: no MLflow run is active; call mlflow.start_run() first, "
                                  "or pass run_id=")
            run_id = active.info.run_id
        self.run_id = run_id
        self.keys = tuple(keys)
        self.enabled = True
        self._client = mlflow.MlflowClient(tracking_uri or mlflow.get_tracking_uri())
        self._last: dict[str, int] = {}  # the last epoch heard per key
        self._lock = threading.Lock()  # reports arrive on several channel threads
        self._queue: queue.Queue[tuple[str, int, dict[str, float], int] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = False

    def __call__(self, key: str, rank: int, metrics: dict[str, Any], checkpoint: Any = None) -> None:
        """The runner's report listener (a channel thread): queue rank 0's new epoch, never wait."""
        if rank != CHIEF_RANK or key not in self.keys or not self.enabled:
            return
        found = epoch_metrics(metrics)
        if found is None:
            return
        epoch, values = found
        with self._lock:
            if self._closed or epoch <= self._last.get(key, 0):
                return
            self._last[key] = epoch
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="sparkml-mnist-mlflow-epochs", daemon=True)
                self._thread.start()
        self._queue.put((key, epoch, values, int(time.time() * 1000)))

    def close(self, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Log what was heard (waiting up to ``timeout_s``); later reports are ignored."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is None:
            return
        self._queue.put(None)
        thread.join(timeout_s)
        if thread.is_alive():
            self._off(f"MLflow did not take the last epochs within {timeout_s:.0f} s")

    def __enter__(self) -> MlflowEpochs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _work(self) -> None:
        from mlflow.entities import Metric  # noqa: PLC0415

        while (item := self._queue.get()) is not None:
            if not self.enabled:
                continue
            key, epoch, values, timestamp = item
            prefix = "" if key in PLAIN_KEYS else f"{key}."
            try:
                self._client.log_batch(self.run_id, metrics=[Metric(f"{prefix}{name}", value, timestamp, epoch)
                                                             for name, value in values.items()])
            except Exception as error:  # MLflow must never cost the run
                first = (redact(str(error)).splitlines() or [""])[0][:ERROR_CHARS]
                self._off(f"could not log epoch {epoch} to MLflow run {self.run_id} ({type(error).__name__}: {first})")

    def _off(self, reason: str) -> None:
        self.enabled = False
        logger.warning("%s; live MLflow metrics are off for this run, the run goes on", reason)
