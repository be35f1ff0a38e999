"""A variant's ranks' test sums and last checkpoint -> its result, on the driver, while the ranks train on.

All of a job's variants train in one barrier stage; rank 0 reports a checkpoint after every epoch, and
after a variant's fit every rank scores its own share of the test set and reports the sums with its
record (``sparkml_mnist.training.scoring``). The test set is never collected here: once every rank's
sums and the last epoch's checkpoint of a variant are in, this adds the sums up, derives the figures
(``job.metrics.evaluation_from_sums``), saves the model from the checkpoint's weights and keeps the
result in the run's state (so a later failure or stop cannot lose it), on a thread of its own.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable

from sparkml_mnist.config import VariantConfig
from sparkml_mnist.errors import DataError
from sparkml_mnist.job.metrics import TEST_SET, evaluation_from_sums
from sparkml_mnist.job.state import RunState, StateError
from sparkml_mnist.launcher.protocol import Checkpoint
from sparkml_mnist.report import VariantResult
from sparkml_mnist.training import state as training_state
from sparkml_mnist.training.scoring import ATTEMPT_KEY, TEST_RECORD_KEY, ScoreSums, variant_of_key

logger = logging.getLogger(__name__)

MODEL_FILE_SUFFIX = ".keras"


class Evaluator:
    """Keeps each variant once its ranks' test sums and its last checkpoint are in; ``close()`` waits for the last.

    ``ranks``: how many ranks report sums; ``test_rows``: how many rows they must have scored between them.
    """

    def __init__(self, variants: list[VariantConfig], np_: int, ranks: int, test_rows: int, seed: int,
                 deterministic: bool, state: RunState, say: Callable[[str], None]) -> None:
        self._variants = {variant.name: variant for variant in variants}
        self._np, self._ranks, self._test_rows = np_, ranks, test_rows
        self._seed, self._deterministic = seed, deterministic
        self._state, self._say = state, say
        self._queue: queue.Queue[tuple[VariantConfig, Checkpoint, ScoreSums] | None] = queue.Queue()
        self._lock = threading.Lock()  # reports arrive on several channel threads
        self._final: dict[str, Checkpoint] = {}  # a variant's last epoch's checkpoint, until it is queued
        self._sums: dict[str, dict[int, ScoreSums]] = {}  # a variant's sums by rank, of one attempt
        self._attempt: dict[str, int] = {}  # which attempt those are of: a later attempt's replace them all
        self._queued: set[str] = set()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.results: dict[str, VariantResult] = {}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="sparkml-mnist-evaluation", daemon=True)
        self._thread.start()

    def final_checkpoint(self, name: str, checkpoint: Checkpoint) -> None:
        """A variant an earlier run of the driver trained to its last epoch: its ranks only score it now."""
        self._note(name, checkpoint=checkpoint)

    def on_report(self, key: str, rank: int, metrics: dict[str, Any], checkpoint: Checkpoint | None) -> None:
        """The runner's report listener (a channel thread): note rank 0's last checkpoint and each rank's sums."""
        test = metrics.get(TEST_RECORD_KEY) if isinstance(metrics, dict) else None
        if isinstance(test, dict):
            sums, attempt = ScoreSums.from_record(test), int(test.get(ATTEMPT_KEY, 0))
            self._note(variant_of_key(key), checkpoint, rank, sums, attempt)
        else:
            self._note(variant_of_key(key), checkpoint)

    def _note(self, name: str, checkpoint: Checkpoint | None = None, rank: int | None = None,
              sums: ScoreSums | None = None, attempt: int = 0) -> None:
        """Queue the variant once its last checkpoint and one attempt's sums of every rank are in.

        Only one attempt's sums add up: a rank that scored before its attempt failed may have scored weights
        that the next attempt trained again (the last epoch redone), and the next attempt's ranks all report.
        """
        variant = self._variants.get(name)
        if variant is None:
            return
        with self._lock:
            if name in self._queued or name in self.results:
                return  # evaluated already: a retry's ranks score finished variants again
            if checkpoint is not None and checkpoint.epoch >= variant.epochs:
                self._final[name] = checkpoint
            if sums is not None and rank is not None and attempt >= self._attempt.get(name, attempt):
                if attempt > self._attempt.get(name, attempt):
                    self._sums.pop(name, None)
                self._attempt[name] = attempt
                self._sums.setdefault(name, {})[rank] = sums
            by_rank = self._sums.get(name, {})
            if name not in self._final or len(by_rank) < self._ranks:
                return
            self._queued.add(name)
            total = by_rank[0]
            for other in sorted(by_rank)[1:]:  # in rank order: the same float sum every run
                total = total + by_rank[other]
            item = (variant, self._final.pop(name), total)
            del self._sums[name]
        self._queue.put(item)

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

    def evaluate(self, variant: VariantConfig, checkpoint: Checkpoint, sums: ScoreSums) -> VariantResult:
        """The figures from the ranks' summed test sums; the model saved from rank 0's final weights; kept."""
        from sparkml_mnist.training.models import build_model

        if sums.examples != self._test_rows:
            raise DataError(TEST_SET, f"the ranks scored {sums.examples:,} test rows of {variant.name}, the test "
                            f"file has {self._test_rows:,}", hint="Give the launcher the frame of shard_layouts(..., "
                            "test=...) made for this run's np")
        evaluation = evaluation_from_sums(sums)
        state = training_state.unpack(checkpoint.data)
        clock = time.perf_counter()
        model = build_model(variant)
        model.set_weights(state.weights)
        folder = self._state.variant_folder(variant.name)
        model_file = folder / f"{variant.name}{MODEL_FILE_SUFFIX}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            model.save(model_file)
        except OSError as error:
            raise StateError(f"cannot save the model of {variant.name} in {folder} ({error.strerror}); free space "
                             "or fix permissions, then `sparkml-mnist train --resume` the run") from None
        logger.debug("%s: model saved in %.1f s", variant.name, time.perf_counter() - clock)
        evaluate_s = sums.seconds  # the slowest rank's scoring: they score in parallel
        train_s = float(sum(state.epoch_seconds))
        self._say(f"{variant.name}: test accuracy {evaluation.accuracy:.4f}, loss {evaluation.loss:.4f} on "
                  f"{sums.examples:,} test images scored by {self._ranks} ranks ({train_s:.0f} s in epochs, "
                  f"{evaluate_s:.1f} s scoring)")
        result = VariantResult(
            name=variant.name, description=variant.description, np=self._np, epochs=variant.epochs,
            history=state.history, evaluation=evaluation, parameter_count=int(model.count_params()),
            seconds={"train": train_s, "evaluate": evaluate_s, "total": train_s + evaluate_s},
            lab_reference_accuracy=variant.lab.test_accuracy, model_files=[model_file],
            seed=self._seed, deterministic=self._deterministic,
        )
        self.results[variant.name] = self._state.save_finished(result)
        return self.results[variant.name]
