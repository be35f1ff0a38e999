"""Gathered test predictions -> the metrics of the report, through ``sklearn.metrics``.

Runs on the driver over the whole test set once a variant's final weights are back, so the figures
are those of one model on one data set, not an average of per-shard figures. The loss is computed
exactly as tf_keras' ``categorical_crossentropy`` computes it from softmax outputs, so it matches
``model.evaluate`` on the same weights. The inputs are the package's own (a model's softmax output,
the data stage's checked labels), so they are not checked again here.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from sparkml_mnist.report.results import Evaluation

# tf_keras' backend.epsilon(): softmax outputs are clipped to [EPSILON, 1 - EPSILON] before the log.
KERAS_EPSILON = 1e-7


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
    return Evaluation(
        loss=keras_categorical_crossentropy(label_ids, probs),
        accuracy=float(accuracy_score(label_ids, predicted)),
        num_examples=len(label_ids),
        class_names=tuple(str(i) for i in class_ids),
        precision=tuple(float(v) for v in precision),
        recall=tuple(float(v) for v in recall),
        f1=tuple(float(v) for v in f1),
        support=tuple(int(v) for v in support),
        confusion=tuple(tuple(int(v) for v in row) for row in matrix),
    )


def keras_categorical_crossentropy(label_ids: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean categorical cross-entropy as tf_keras computes it from softmax outputs.

    tf_keras (``backend.categorical_crossentropy``, ``from_logits=False``) first renormalises each row to sum
    to 1, then clips to [epsilon, 1 - epsilon] in the outputs' own dtype, then takes ``-sum(y * log(p))``.
    The clip is done in the input dtype so the bounds are float32's when the model's outputs are float32;
    the log and the mean are taken in float64.
    """
    probs = np.asarray(probabilities)
    if not np.issubdtype(probs.dtype, np.floating):
        probs = probs.astype(np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)
    epsilon = probs.dtype.type(KERAS_EPSILON)
    probs = np.clip(probs, epsilon, probs.dtype.type(1) - epsilon)
    true_class_probs = probs[np.arange(len(probs)), np.asarray(label_ids)].astype(np.float64)
    return float(np.mean(-np.log(true_class_probs)))
