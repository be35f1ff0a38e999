"""Test figures -> the metrics of the report, through ``sklearn.metrics``.

The job scores the test set on the ranks, and the driver gets sums only (``training.scoring``): the
examples, the loss sum and the confusion counts of each rank. ``evaluation_from_sums`` turns the ranks'
sums, added up, into the report's figures: those of one model on the whole test set, not an average of
per-shard figures, and equal to ``evaluate`` on the same predictions gathered in one place (the
reference, kept for checks). The loss is computed exactly as tf_keras' ``categorical_crossentropy``
computes it from softmax outputs, so it matches ``model.evaluate`` on the same weights. The inputs are
the package's own (a model's softmax output, the data stage's checked labels), so they are not checked
again here.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from sparkml_mnist.errors import DataError
from sparkml_mnist.report.results import Evaluation
from sparkml_mnist.training.scoring import KERAS_EPSILON, ScoreSums, crossentropy_per_row

__all__ = ["KERAS_EPSILON", "evaluate", "evaluation_from_sums", "keras_categorical_crossentropy"]
TEST_SET = "<test set>"


def evaluate(y_true: np.ndarray, probabilities: np.ndarray) -> Evaluation:
    """Metrics of softmax ``probabilities`` (n, classes) against ``y_true``: one-hot rows (n, classes) or ids (n,).

    The classes are the probabilities' columns, named by their ids.
    """
    probs = np.asarray(probabilities)
    labels = np.asarray(y_true)
    label_ids = (labels.argmax(axis=1) if labels.ndim == 2 else labels).astype(np.int64)
    class_ids = list(range(probs.shape[1]))
    predicted = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        label_ids, predicted, labels=class_ids, zero_division=0
    )
    matrix = confusion_matrix(label_ids, predicted, labels=class_ids)
    return _evaluation(keras_categorical_crossentropy(label_ids, probs), float(accuracy_score(label_ids, predicted)),
                       len(label_ids), (precision, recall, f1, support), matrix)


def keras_categorical_crossentropy(label_ids: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean categorical cross-entropy as tf_keras computes it from softmax outputs.

    tf_keras (``backend.categorical_crossentropy``, ``from_logits=False``) first renormalises each row to sum
    to 1, then clips to [epsilon, 1 - epsilon] in the outputs' own dtype, then takes ``-sum(y * log(p))``.
    The clip is done in the input dtype so the bounds are float32's when the model's outputs are float32;
    the log and the mean are taken in float64 (the per-row math is the ranks': ``training.scoring``).
    """
    return float(np.mean(crossentropy_per_row(label_ids, probabilities)))


def evaluation_from_sums(sums: ScoreSums) -> Evaluation:
    """The report's figures from the ranks' sums added up: equal to ``evaluate`` on the same predictions.

    Precision, recall, f1 and support go through the same ``sklearn.metrics`` call as ``evaluate``, over
    (true, predicted) pairs weighted by their counts, so they are the same numbers; accuracy is the
    confusion's trace over the examples (``accuracy_score`` to the bit), the loss the loss sum over them.
    """
    if sums.examples <= 0:
        raise DataError(TEST_SET, "no test rows were scored", hint="Give the job a non-empty test file")
    matrix = np.asarray(sums.confusion, dtype=np.int64)
    class_ids = list(range(matrix.shape[0]))
    true_ids, predicted_ids = np.nonzero(matrix)
    precision, recall, f1, support = precision_recall_fscore_support(
        true_ids, predicted_ids, labels=class_ids, sample_weight=matrix[true_ids, predicted_ids], zero_division=0
    )
    return _evaluation(float(sums.loss_sum / sums.examples), float(np.trace(matrix) / sums.examples),
                       int(sums.examples), (precision, recall, f1, support), matrix)


def _evaluation(loss: float, accuracy: float, examples: int, per_class: tuple[np.ndarray, ...],
                matrix: np.ndarray) -> Evaluation:
    """The report's record of one model's figures (per_class: sklearn's precision, recall, f1, support)."""
    precision, recall, f1, support = per_class
    return Evaluation(
        loss=loss,
        accuracy=accuracy,
        num_examples=examples,
        class_names=tuple(str(i) for i in range(matrix.shape[0])),
        precision=tuple(float(v) for v in precision),
        recall=tuple(float(v) for v in recall),
        f1=tuple(float(v) for v in f1),
        support=tuple(int(v) for v in support),
        confusion=tuple(tuple(int(v) for v in row) for row in matrix),
    )
