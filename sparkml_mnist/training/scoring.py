"""Scoring the test set where it lies: each rank scores its own test rows, and only sums leave the rank.

The test set rides in the hand-off frame beside the training rows (``layout == TEST_LAYOUT``, see
``sparkml_mnist.data.shards.shard_layouts``), so the driver never collects it. After a variant's fit
every rank predicts its share with the trained weights on a plain local model (built outside the
backend's scope: a model of the distribution would run collectives, and the test shards may differ by
a row) and reports three sums: the examples, the loss summed over them (float64) and the confusion
counts. The driver adds the ranks' sums and derives every figure of the report from them
(``sparkml_mnist.job.metrics.evaluation_from_sums``).

The per-row math lives here, numpy only (the driver imports it without TensorFlow), so the ranks'
sums and the driver's reference evaluation (``job.metrics.evaluate``) are one computation.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import numpy as np
import pyarrow as pa

from sparkml_mnist.config import DataSpec, VariantConfig, load_data_spec
from sparkml_mnist.data.columns import LAYOUT_COLUMN, TEST_LAYOUT
from sparkml_mnist.training.inputs import ArrayRows, RowSource, layout_rows

if TYPE_CHECKING:
    from sparkml_mnist.launcher.rank.context import RankContext

# tf_keras' backend.epsilon(): softmax outputs are clipped to [EPSILON, 1 - EPSILON] before the log.
KERAS_EPSILON = 1e-7
# Rows a predict call takes: the batch the driver-side evaluation used, so the kernels see the same shapes.
SCORE_BATCH = 1024
# Where a rank record carries its test sums (``context.report(variant, record)``).
TEST_RECORD_KEY = "test"
ATTEMPT_KEY = "attempt"  # in the test record: which attempt of the run scored (only one attempt's sums add up)
# A variant an earlier attempt trained is scored again under ``<variant><suffix>``, so its training records stay.
SCORED_KEY_SUFFIX = ".scored"


@dataclass(frozen=True, eq=False)
class ScoreSums:
    """What one rank (or, added up, every rank) contributes to a model's test figures: sums only."""

    examples: int
    loss_sum: float  # float64 sum of the per-row cross-entropy, as tf_keras computes it
    confusion: np.ndarray  # (classes, classes) int64, [true][predicted]
    seconds: float = 0.0  # time spent scoring (added up: the slowest rank's, as they score in parallel)

    def __add__(self, other: ScoreSums) -> ScoreSums:
        return ScoreSums(self.examples + other.examples, self.loss_sum + other.loss_sum,
                         self.confusion + other.confusion, max(self.seconds, other.seconds))

    def to_record(self) -> dict[str, Any]:
        """JSON values for a rank record (a float64 round-trips exactly through JSON)."""
        return {"examples": int(self.examples), "loss_sum": float(self.loss_sum),
                "confusion": self.confusion.astype(np.int64).tolist(), "seconds": float(self.seconds)}

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> ScoreSums:
        return cls(examples=int(data["examples"]), loss_sum=float(data["loss_sum"]),
                   confusion=np.asarray(data["confusion"], dtype=np.int64), seconds=float(data.get("seconds", 0.0)))


def crossentropy_per_row(label_ids: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Per-row categorical cross-entropy (float64) as tf_keras computes it from softmax outputs.

    tf_keras (``backend.categorical_crossentropy``, ``from_logits=False``) first renormalises each row to sum
    to 1, then clips to [epsilon, 1 - epsilon] in the outputs' own dtype, then takes ``-sum(y * log(p))``.
    The clip is done in the input dtype so the bounds are float32's when the model's outputs are float32;
    the log is taken in float64.
    """
    probs = np.asarray(probabilities)
    if not np.issubdtype(probs.dtype, np.floating):
        probs = probs.astype(np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)
    epsilon = probs.dtype.type(KERAS_EPSILON)
    probs = np.clip(probs, epsilon, probs.dtype.type(1) - epsilon)
    true_class_probs = probs[np.arange(len(probs)), np.asarray(label_ids, dtype=np.int64)].astype(np.float64)
    return -np.log(true_class_probs)


def crossentropy_sum(label_ids: np.ndarray, probabilities: np.ndarray) -> float:
    """The per-row losses summed in float64: what a rank reports (the mean is the driver's, over every rank)."""
    return float(np.sum(crossentropy_per_row(label_ids, probabilities)))


def confusion_counts(label_ids: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """``counts[true][predicted]`` (int64), sklearn's orientation; classes absent from the rows count 0."""
    cells = np.asarray(label_ids, dtype=np.int64) * num_classes + np.asarray(predicted, dtype=np.int64)
    return np.bincount(cells, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def score_probabilities(label_ids: np.ndarray, probabilities: np.ndarray, seconds: float = 0.0) -> ScoreSums:
    """Sums of softmax ``probabilities`` (n, classes) against class ids (n,); the classes are the columns."""
    probs = np.asarray(probabilities)
    return ScoreSums(examples=len(probs), loss_sum=crossentropy_sum(label_ids, probs),
                     confusion=confusion_counts(label_ids, probs.argmax(axis=1), probs.shape[1]), seconds=seconds)


@dataclass(frozen=True)
class ScoringRows:
    """A rank's test rows: ``source.take(index)`` gives a batch's uint8 images (and one-hot labels), read in
    place from the mapped partition; ``label_ids`` (n,) their classes, 8 bytes a row."""

    source: RowSource
    label_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.label_ids)

    @classmethod
    def from_arrays(cls, images: np.ndarray, label_ids: np.ndarray) -> ScoringRows:
        """Rows already in memory (uint8 images (n, 28, 28, 1), class ids)."""
        return cls(ArrayRows((images,)), np.asarray(label_ids, dtype=np.int64))


def scoring_rows(table: pa.Table, spec: DataSpec | None = None) -> ScoringRows:
    """The test rows of a rank's hand-off partition (``layout == TEST_LAYOUT``; none in a frame without them)."""
    if LAYOUT_COLUMN not in table.schema.names or table.num_rows == 0:
        spec = spec or load_data_spec()
        return ScoringRows.from_arrays(np.zeros((0, *spec.image_shape), np.uint8), np.zeros(0, np.int64))
    part = layout_rows(table, TEST_LAYOUT, spec)
    return ScoringRows(part, part.images.label_ids(part.positions))


def score_weights(
    variant: VariantConfig, weights: list[np.ndarray], rows: ScoringRows, spec: DataSpec | None = None,
    progress: Callable[[], None] | None = None,
) -> ScoreSums:
    """Predict ``rows`` with ``weights`` on a plain local model of ``variant``, and sum.

    One ``predict`` over the rows in batches of ``SCORE_BATCH``, each gathered from the mapped partition and
    scaled from uint8 to float32 as the input pipeline does (``/ max_pixel_value``,
    ``training.inputs.scale_images``), so the model sees exactly the values, and the batches, the driver's
    evaluation gave it; only a batch at a time is copied out of the partition.
    ``progress`` is called after each batch (the rank's watchdog counts it).
    """
    from sparkml_mnist.launcher import keras_flavour
    from sparkml_mnist.training.models import build_model

    spec = spec or load_data_spec()
    started = time.perf_counter()
    if not len(rows):  # a test set smaller than np leaves a rank without rows
        empty = np.zeros((spec.num_classes, spec.num_classes), dtype=np.int64)
        return ScoreSums(0, 0.0, empty, time.perf_counter() - started)
    keras, tf = keras_flavour.keras(), keras_flavour.tensorflow()
    maximum = float(spec.max_pixel_value)

    def scale(images: Any) -> Any:
        return tf.cast(images, tf.float32) / maximum

    class Progress(keras.callbacks.Callback):  # type: ignore[misc, name-defined]
        def on_predict_batch_end(self, batch: int, logs: dict | None = None) -> None:
            if progress is not None:
                progress()

    def gather(index: Any) -> Any:  # a batch's uint8 pixels from the mapped partition, then float32
        images = tf.numpy_function(lambda i: rows.source.take(i)[0], [index], tf.uint8, stateful=False)
        images.set_shape((None, *spec.image_shape))
        return scale(images)

    batches = tf.data.Dataset.range(len(rows)).batch(SCORE_BATCH).map(gather)
    with _no_distribution(keras):
        model = build_model(variant, spec)
        model.set_weights(weights)
        probabilities = np.asarray(model.predict(batches, verbose=0, callbacks=[Progress()]))
    return score_probabilities(rows.label_ids, probabilities, seconds=time.perf_counter() - started)


def score_in_rank(context: RankContext, variant: VariantConfig, weights: list[np.ndarray],
                  rows: ScoringRows) -> dict[str, Any]:
    """``score_weights`` inside a rank, as the record field a rank reports (each batch counts as progress)."""
    sums = score_weights(variant, weights, rows, progress=context.report)
    return {**sums.to_record(), ATTEMPT_KEY: context.attempt}


def scored_key(variant_name: str) -> str:
    """The report key of a variant scored without training (its weights from an earlier attempt)."""
    return f"{variant_name}{SCORED_KEY_SUFFIX}"


def variant_of_key(key: str) -> str:
    """The variant a report key is about (``scored_key``'s inverse; a variant's own key is its name)."""
    return key.removesuffix(SCORED_KEY_SUFFIX)


@contextlib.contextmanager
def _no_distribution(keras: Any) -> Iterator[None]:
    """Keras 3 (the jax backend) lays out every variable by the process's distribution, and its predict then
    spans every rank: set none while the local model is built and used. tf_keras has no such setting (its
    strategy applies only inside ``strategy.scope()``, which this is not)."""
    distribution = getattr(keras, "distribution", None)
    if distribution is None or not hasattr(distribution, "set_distribution"):
        yield
        return
    current = distribution.distribution()
    distribution.set_distribution(None)
    try:
        yield
    finally:
        distribution.set_distribution(current)
