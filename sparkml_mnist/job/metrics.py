"""Gathered test predictions -> the metrics of the report, through ``sklearn.metrics``.

Runs on the driver over the whole test set once every rank's predictions are back, so the figures
are those of one model on one data set, not an average of per-shard figures. The loss is computed
exactly as tf_keras' ``categorical_crossentropy`` computes it from softmax outputs, so it matches
``model.evaluate`` on the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from sparkml_mnist.errors import SparkMnistError

# tf_keras' backend.epsilon(): softmax outputs are clipped to [EPSILON, 1 - EPSILON] before the log.
KERAS_EPSILON = 1e-7
# A softmax row sums to 1 up to float32 rounding; anything further off is logits or garbage.
PROBABILITY_SUM_TOLERANCE = 1e-3
# How many offending rows an error message quotes.
_SHOWN_ROWS = 5


class EvaluationError(SparkMnistError, ValueError):
    """Predictions or labels cannot be evaluated (shape, class count, NaN, empty); says which input."""


@dataclass(frozen=True)
class Evaluation:
    """Test-set metrics of one model: loss and accuracy as Keras reports them, per-class scores as sklearn does."""

    loss: float
    accuracy: float
    num_examples: int
    class_names: tuple[str, ...]
    precision: tuple[float, ...]
    recall: tuple[float, ...]
    f1: tuple[float, ...]
    support: tuple[int, ...]
    confusion: tuple[tuple[int, ...], ...]  # confusion[true][predicted], sklearn's orientation

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def confusion_matrix(self) -> np.ndarray:
        """The confusion matrix as an int array (rows: true class, columns: predicted class)."""
        return np.array(self.confusion, dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values only, ready for ``json.dumps``."""
        return {
            "loss": self.loss,
            "accuracy": self.accuracy,
            "num_examples": self.num_examples,
            "class_names": list(self.class_names),
            "per_class": [
                {"class": name, "precision": p, "recall": r, "f1": f, "support": s}
                for name, p, r, f, s in zip(self.class_names, self.precision, self.recall, self.f1, self.support)
            ],
            "confusion_matrix": [list(row) for row in self.confusion],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Evaluation":
        """The inverse of :meth:`to_dict` (for reading a ``report.json`` back)."""
        per_class = data["per_class"]
        return cls(
            loss=float(data["loss"]),
            accuracy=float(data["accuracy"]),
            num_examples=int(data["num_examples"]),
            class_names=tuple(str(name) for name in data["class_names"]),
            precision=tuple(float(row["precision"]) for row in per_class),
            recall=tuple(float(row["recall"]) for row in per_class),
            f1=tuple(float(row["f1"]) for row in per_class),
            support=tuple(int(row["support"]) for row in per_class),
            confusion=tuple(tuple(int(v) for v in row) for row in data["confusion_matrix"]),
        )


def evaluate(
    labels: Any,
    probabilities: Any,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
) -> Evaluation:
    """Metrics of softmax ``probabilities`` (n, classes) against ``labels``: int ids (n,) or one-hot (n, classes).

    The class count is ``len(class_names)``, else ``num_classes``, else the data spec's (``conf/data.yaml``);
    a mismatch with the probabilities' width is an error rather than a silently smaller confusion matrix.
    """
    classes = _class_count(class_names, num_classes)
    names = tuple(str(n) for n in class_names) if class_names is not None else tuple(str(i) for i in range(classes))
    probs = _check_probabilities(probabilities, classes)
    label_ids = _label_ids(labels, classes, len(probs))

    predicted = probs.argmax(axis=1)
    class_ids = list(range(classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        label_ids, predicted, labels=class_ids, zero_division=0
    )
    matrix = confusion_matrix(label_ids, predicted, labels=class_ids)
    return Evaluation(
        loss=keras_categorical_crossentropy(label_ids, probs),
        accuracy=float(accuracy_score(label_ids, predicted)),
        num_examples=len(label_ids),
        class_names=names,
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


def _class_count(class_names: Sequence[str] | None, num_classes: int | None) -> int:
    if class_names is not None:
        if isinstance(class_names, str):
            raise EvaluationError(f"class_names must be a sequence of names, got the string {class_names!r}")
        if num_classes is not None and num_classes != len(class_names):
            raise EvaluationError(
                f"class_names has {len(class_names)} names but num_classes is {num_classes}; they must agree"
            )
        count = len(class_names)
    elif num_classes is not None:
        count = num_classes
    else:
        from sparkml_mnist.config import load_data_spec

        count = load_data_spec().num_classes
    if count < 2:
        raise EvaluationError(f"need at least 2 classes to evaluate, got {count}")
    return count


def _non_empty_array(value: Any, name: str) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:
        raise EvaluationError(f"{name}: cannot be read as an array ({error})") from None
    if array.size == 0:
        raise EvaluationError(f"{name}: empty; there is nothing to evaluate")
    return array


def _check_probabilities(probabilities: Any, classes: int) -> np.ndarray:
    probs = _non_empty_array(probabilities, "probabilities")
    if probs.ndim != 2:
        raise EvaluationError(f"probabilities: expected shape (n, {classes}), got {probs.shape}")
    if probs.shape[1] != classes:
        raise EvaluationError(
            f"probabilities: {probs.shape[1]} columns but there are {classes} classes; expected shape (n, {classes})"
        )
    if not (np.issubdtype(probs.dtype, np.floating) or np.issubdtype(probs.dtype, np.integer)):
        raise EvaluationError(f"probabilities: expected numbers, got dtype {probs.dtype}")
    _reject_rows(~np.isfinite(probs).all(axis=1), "probabilities", "NaN or infinite values")
    _reject_rows(
        ((probs < 0) | (probs > 1)).any(axis=1),
        "probabilities",
        "values outside [0, 1] (logits rather than softmax outputs?)",
    )
    _reject_rows(
        np.abs(probs.sum(axis=1, dtype=np.float64) - 1.0) > PROBABILITY_SUM_TOLERANCE,
        "probabilities",
        f"a sum further than {PROBABILITY_SUM_TOLERANCE} from 1 (softmax rows sum to 1)",
    )
    return probs


def _label_ids(labels: Any, classes: int, expected_rows: int) -> np.ndarray:
    values = _non_empty_array(labels, "labels")
    if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
        raise EvaluationError(f"labels: expected class ids or one-hot rows, got dtype {values.dtype}")
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim == 1:
        ids = _check_class_ids(values, classes)
    elif values.ndim == 2 and values.shape[1] == classes:
        ids = _check_one_hot(values)
    else:
        raise EvaluationError(f"labels: expected shape (n,) of class ids or (n, {classes}) one-hot, got {values.shape}")
    if len(ids) != expected_rows:
        raise EvaluationError(
            f"labels has {len(ids)} rows but probabilities has {expected_rows}; they must be the same examples"
        )
    return ids


def _check_class_ids(values: np.ndarray, classes: int) -> np.ndarray:
    if np.issubdtype(values.dtype, np.floating):
        _reject_rows(~np.isfinite(values), "labels", "NaN or infinite values")
        _reject_rows(values != np.round(values), "labels", "class ids that are not whole numbers")
    _reject_rows((values < 0) | (values >= classes), "labels", f"class ids outside 0..{classes - 1}")
    return values.astype(np.int64)


def _check_one_hot(values: np.ndarray) -> np.ndarray:
    if np.issubdtype(values.dtype, np.floating):
        _reject_rows(~np.isfinite(values).all(axis=1), "labels", "NaN or infinite values")
    is_binary = ((values == 0) | (values == 1)).all(axis=1)
    _reject_rows(~is_binary | (values.sum(axis=1) != 1), "labels", "one-hot rows without exactly one 1")
    return values.argmax(axis=1).astype(np.int64)


def _reject_rows(bad: np.ndarray, what: str, problem: str) -> None:
    """Raise naming how many rows are bad and the first few of them (0-based)."""
    rows = np.flatnonzero(bad)
    if rows.size:
        shown = ", ".join(str(r) for r in rows[:_SHOWN_ROWS]) + (", ..." if rows.size > _SHOWN_ROWS else "")
        raise EvaluationError(f"{what}: {rows.size} row(s) with {problem} (rows {shown})")
