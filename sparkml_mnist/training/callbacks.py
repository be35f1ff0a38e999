"""The one Keras callback of the job's training: each epoch's time, history, log line and checkpoint.

Imports Keras (through the launcher's Keras flavour): imported only inside a rank.
"""

from __future__ import annotations

import time

from sparkml_mnist.launcher import keras_flavour
from sparkml_mnist.launcher.protocol import CHIEF_RANK, Checkpoint
from sparkml_mnist.launcher.rank.context import RankContext, log_to_driver
from sparkml_mnist.training import state as training_state

_keras = keras_flavour.keras()


class EpochCallback(_keras.callbacks.Callback):
    """Every rank times its epochs and keeps the history (identical on every rank: the metrics are
    global); rank 0 also logs one line per epoch to the driver and reports a checkpoint under ``key``,
    so a retried attempt resumes after the last finished epoch.

    Starts from ``resumed`` (an earlier attempt's state) when given: every epoch appears once.
    """

    def __init__(self, context: RankContext, key: str, epochs: int, steps: int,
                 resumed: training_state.TrainingState | None = None) -> None:
        super().__init__()
        self.context, self.key, self.epochs, self.steps = context, key, epochs, steps
        self.history: dict[str, list[float]] = resumed.history if resumed is not None else {}
        self.epoch_seconds: list[float] = resumed.epoch_seconds if resumed is not None else []
        self._started = time.perf_counter()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        seconds = time.perf_counter() - self._started
        self.epoch_seconds.append(seconds)
        for name, value in (logs or {}).items():
            self.history.setdefault(name, []).append(float(value))
        if self.context.rank != CHIEF_RANK:
            return
        state = training_state.pack(self.model, epoch + 1, self.history, self.epoch_seconds)
        self.context.report(self.key, {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}},
                            Checkpoint(epoch=epoch + 1, data=state))
        # Logged once the driver kept the checkpoint: a run stopped after this line resumes after this epoch.
        metrics = "  ".join(f"{name} {float(value):.4f}" for name, value in (logs or {}).items())
        log_to_driver(f"{self.key} epoch {epoch + 1}/{self.epochs}: {metrics}  ({self.steps} steps, {seconds:.1f} s)")
