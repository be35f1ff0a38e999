"""Keras callbacks for functions a ``HorovodRunner`` runs: progress for the watchdog, logs for the driver.

``LogCallback`` is sparkdl's (``from sparkdl.horovod.tensorflow.keras import LogCallback``): it
streams epoch logs (and optionally batch logs) to the driver's output; rank 0 also reports each
epoch's logs, which ``on_report=MlflowEpochs()`` (``launcher.mlflow_epochs``) logs to MLflow from the
driver. Importing this module imports Keras (through ``keras_flavour``), so it is imported only inside a
rank, or when asked for.
"""

from __future__ import annotations

import time
from typing import Any

from sparkml_mnist.launcher import keras_flavour
from sparkml_mnist.launcher.failures import ReportRefusedError
from sparkml_mnist.launcher.mlflow_epochs import EPOCH_FIELD, LOG_CALLBACK_KEY
from sparkml_mnist.launcher.rank.context import RankContext, get_context, log_to_driver

_keras = keras_flavour.keras()
CHIEF_RANK = 0


def format_logs(logs: dict[str, Any] | None) -> str:
    return "  ".join(f"{name} {float(value):.4f}" for name, value in (logs or {}).items())


def summed_replicas(model: Any) -> int:
    """How many replicas' values tf_keras adds up in the logs it gives ``on_train_batch_end``.

    Its default reduction (``distribute_reduction_method`` "auto", i.e. "sum" off TPUs) sums every
    replica's metric results, which under tf.distribute already are the global values: a batch's
    logs read ``num_replicas_in_sync`` times the loss and accuracy (measured: 2.0x at np=2 under
    MultiWorkerMirroredStrategy), while the epoch's logs, read from the metrics, are right.
    """
    strategy = getattr(model, "distribute_strategy", None)
    if strategy is None or getattr(model, "distribute_reduction_method", None) not in ("auto", "sum"):
        return 1
    return int(strategy.num_replicas_in_sync)


class ProgressCallback(_keras.callbacks.Callback):
    """Counts every training batch as progress (and the rank's examples), for the driver's watchdog."""

    def __init__(self, context: RankContext | None = None) -> None:
        super().__init__()
        self.context = context or get_context()

    def on_train_begin(self, logs: dict | None = None) -> None:
        beat = self.context.heartbeat
        beat.fit_started_at, beat.fit_examples, beat.fit_steps = None, 0, 0
        self._summed = summed_replicas(self.model)

    def batch_logs(self, logs: dict | None) -> dict[str, Any]:
        """A training batch's logs as the epoch's would give them (see ``summed_replicas``)."""
        summed = getattr(self, "_summed", 1)
        return {name: float(value) / summed for name, value in (logs or {}).items()}

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        beat = self.context.heartbeat
        beat.epoch, beat.epochs = epoch + 1, (self.params or {}).get("epochs")

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        beat = self.context.heartbeat
        now = time.time()
        if beat.first_step_at is None:
            beat.first_step_at = now
        if beat.fit_started_at is None:
            beat.fit_started_at = now

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = self.batch_logs(logs).get("loss")
        if loss is not None:
            self.context.heartbeat.loss = loss
        self.context.count_steps(steps=1, examples=self.context.examples_per_step)

    def on_test_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.context.count_steps(steps=0)


class LogCallback(ProgressCallback):
    """sparkdl's ``LogCallback(per_batch_log=False)``: rank 0's epoch (and batch) logs on the driver.

    Every rank counts its batches as progress; only rank 0 logs, since the ranks' metrics agree.
    """

    def __init__(self, per_batch_log: bool = False) -> None:
        super().__init__()
        self.per_batch_log = per_batch_log
        self._refused = False  # the driver refused the epoch reports once: lines only from then on
        self._epoch = 0
        self._started = time.perf_counter()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        super().on_epoch_begin(epoch, logs)
        self._epoch = epoch
        self._started = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        super().on_train_batch_end(batch, logs)
        if self.per_batch_log and self.context.rank == CHIEF_RANK:
            log_to_driver(f"epoch {self._epoch + 1} batch {batch + 1}: {format_logs(self.batch_logs(logs))}")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.context.rank == CHIEF_RANK:
            seconds = time.perf_counter() - self._started
            self._report_epoch(epoch + 1, logs)
            log_to_driver(f"epoch {epoch + 1}: {format_logs(logs)} ({seconds:.1f} s)")

    def _report_epoch(self, epoch: int, logs: dict | None) -> None:
        """The epoch's logs as a report too (exact values), for a driver-side listener such as ``MlflowEpochs``.

        A refusal (the rank's cap on report keys reached) leaves the lines alone: said once, not raised.
        """
        if self._refused:
            return
        try:
            self.context.report(LOG_CALLBACK_KEY, {EPOCH_FIELD: epoch,
                                                   **{name: float(value) for name, value in (logs or {}).items()}})
        except ReportRefusedError as error:
            self._refused = True
            log_to_driver(f"LogCallback: the epoch logs go on as lines only ({error})")
