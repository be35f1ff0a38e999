"""A variant's last checkpoint -> its result, on the driver, while the ranks already train the next one.

All of a job's variants train in one barrier stage; rank 0 reports a checkpoint after every epoch.
When a variant's last epoch's checkpoint arrives, this evaluates its weights on the test set,
saves the model and keeps the result in the run's state (so a later failure or stop cannot lose it),
on a thread of its own: the driver's evaluation overlaps the next variant's training.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable

import numpy as np

from sparkml_mnist.training import state as training_state
from sparkml_mnist.config import VariantConfig
from sparkml_mnist.launcher.protocol import Checkpoint
from sparkml_mnist.job.metrics import evaluate as score_predictions
from sparkml_mnist.report import VariantResult
from sparkml_mnist.job.state import RunState, StateError

logger = logging.getLogger(__name__)

MODEL_FILE_SUFFIX = ".keras"
PREDICT_BATCH = 1024  # driver-side inference batch: large batches are faster, memory is small


class Evaluator:
    """Evaluates and keeps each variant whose training ended; ``close()`` waits for the last one."""

    def __init__(self, variants: list[VariantConfig], np_: int, seed: int, deterministic: bool, state: RunState,
                 x_test: np.ndarray, y_test: np.ndarray, say: Callable[[str], None]) -> None:
        self._variants = {variant.name: variant for variant in variants}
        self._np, self._seed, self._deterministic = np_, seed, deterministic
        self._state, self._x_test, self._y_test, self._say = state, x_test, y_test, say
        self._queue: queue.Queue[tuple[VariantConfig, Checkpoint] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.results: dict[str, VariantResult] = {}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="sparkml-mnist-evaluation", daemon=True)
        self._thread.start()

    def on_report(self, key: str, rank: int, metrics: dict[str, Any], checkpoint: Checkpoint | None) -> None:
        """The runner's report listener (a channel thread): queue a variant whose last epoch's checkpoint came."""
        variant = self._variants.get(key)
        if variant is None or checkpoint is None:
            return
        if checkpoint.epoch >= variant.epochs and key not in self.results:
            self._queue.put((variant, checkpoint))

    def close(self) -> None:
        """Wait for every queued evaluation; re-raise the first one that failed."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.evaluate(*item)
                except BaseException as error:  # noqa: BLE001 - re-raised by close() on the job's thread
                    self._error = error

    def evaluate(self, variant: VariantConfig, checkpoint: Checkpoint) -> VariantResult:
        """Evaluate rank 0's final weights on the test set, save the model, keep the result in the state."""
        from sparkml_mnist.training.models import build_model

        state = training_state.unpack(checkpoint.data)
        self._say(f"{variant.name}: evaluating rank 0's model on {len(self._x_test):,} test images")
        clock = time.perf_counter()
        model = build_model(variant)
        model.set_weights(state.weights)
        probabilities = model.predict(self._x_test, batch_size=PREDICT_BATCH, verbose=0)
        evaluation = score_predictions(self._y_test, probabilities)
        folder = self._state.variant_folder(variant.name)
        model_file = folder / f"{variant.name}{MODEL_FILE_SUFFIX}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            model.save(model_file)
        except OSError as error:
            raise StateError(f"cannot save the model of {variant.name} in {folder} ({error.strerror}); free space "
                             "or fix permissions, then `sparkml-mnist train --resume` the run") from None
        evaluate_s = time.perf_counter() - clock
        train_s = float(sum(state.epoch_seconds))
        self._say(f"{variant.name}: test accuracy {evaluation.accuracy:.4f}, loss {evaluation.loss:.4f} "
                  f"({train_s:.0f} s in epochs, {evaluate_s:.1f} s evaluating)")
        result = VariantResult(
            name=variant.name, description=variant.description, np=self._np, epochs=variant.epochs,
            history=state.history, evaluation=evaluation, parameter_count=int(model.count_params()),
            seconds={"train": train_s, "evaluate": evaluate_s, "total": train_s + evaluate_s},
            lab_reference_accuracy=variant.lab.test_accuracy, model_files=[model_file],
            seed=self._seed, deterministic=self._deterministic,
        )
        self.results[variant.name] = self._state.save_finished(result)
        return self.results[variant.name]
