"""The gathered evaluation equals sklearn.metrics on the same predictions and Keras' loss on the same outputs."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from sparkml_mnist.job.metrics import KERAS_EPSILON, evaluate
from sparkml_mnist.report import Evaluation

CLASSES = 10
EXAMPLES = 500
SEED = 1234


def softmax_outputs(labels: np.ndarray, hit_rate: float, seed: int = SEED) -> np.ndarray:
    """Float32 softmax rows that favour the true class for about ``hit_rate`` of the examples."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.0, (len(labels), CLASSES))
    favoured = np.where(rng.random(len(labels)) < hit_rate, labels, rng.integers(0, CLASSES, len(labels)))
    logits[np.arange(len(labels)), favoured] += 6.0
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def predictions() -> tuple[np.ndarray, np.ndarray]:
    labels = np.random.default_rng(SEED).integers(0, CLASSES, EXAMPLES)
    return labels, softmax_outputs(labels, hit_rate=0.9)


def numpy_loss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The formula written out: renormalise, clip to [eps, 1 - eps], mean of -log p(true class)."""
    p = probabilities.astype(np.float64)
    p = p / p.sum(axis=1, keepdims=True)
    p = np.clip(p, KERAS_EPSILON, 1 - KERAS_EPSILON)
    return float(-np.mean(np.log(p[np.arange(len(labels)), labels])))


def test_metrics_equal_sklearn_on_the_same_predictions(predictions):
    labels, probs = predictions
    result = evaluate(labels, probs)
    predicted = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=list(range(CLASSES)), zero_division=0
    )
    assert result.num_examples == EXAMPLES
    assert result.accuracy == pytest.approx(accuracy_score(labels, predicted), abs=0)
    assert 0.8 < result.accuracy < 1.0  # the fixture is neither trivial nor perfect, so the checks below bite
    np.testing.assert_array_equal(result.precision, precision)
    np.testing.assert_array_equal(result.recall, recall)
    np.testing.assert_array_equal(result.f1, f1)
    np.testing.assert_array_equal(result.support, support)
    np.testing.assert_array_equal(result.confusion_matrix, confusion_matrix(labels, predicted))
    assert result.confusion_matrix.sum() == EXAMPLES
    assert np.trace(result.confusion_matrix) == round(result.accuracy * EXAMPLES)


def test_loss_equals_the_formula_written_in_numpy(predictions):
    labels, probs = predictions
    assert evaluate(labels, probs).loss == pytest.approx(numpy_loss(labels, probs), rel=1e-6)


def test_loss_matches_the_keras_docs_example():
    # tf_keras backend.categorical_crossentropy docstring: per-example [0.10536 0.11653 0.06188].
    probs = np.array([[0.9, 0.05, 0.05], [0.05, 0.89, 0.06], [0.05, 0.01, 0.94]], dtype=np.float32)
    result = evaluate(np.array([0, 1, 2]), probs)
    assert result.loss == pytest.approx(np.mean([0.10536, 0.11653, 0.06188]), abs=1e-5)


def test_loss_clips_a_zero_probability_instead_of_returning_infinity():
    probs = np.zeros((2, CLASSES), dtype=np.float64)
    probs[0, 0] = 1.0  # right and certain: loss ~ -log(1 - eps)
    probs[1, 3] = 1.0  # true class 1 got exactly 0: loss -log(eps)
    result = evaluate(np.array([0, 1]), probs)
    expected = (-np.log(1 - KERAS_EPSILON) - np.log(KERAS_EPSILON)) / 2
    assert np.isfinite(result.loss)
    assert result.loss == pytest.approx(expected, rel=1e-9)


def test_loss_renormalises_rows_like_keras():
    probs = np.full((1, CLASSES), 0.10005)  # sums to 1.0005: within tolerance, renormalised to 0.1 each
    assert evaluate(np.array([4]), probs).loss == pytest.approx(-np.log(0.1), rel=1e-9)


def test_loss_equals_tf_keras(predictions, monkeypatch):
    """The one slow test: tf_keras' own function and loss class on the same float32 outputs."""
    monkeypatch.setenv("TF_USE_LEGACY_KERAS", "1")
    tf_keras = pytest.importorskip("tf_keras")
    labels, probs = predictions
    probs = probs.copy()
    probs[0] = np.eye(CLASSES, dtype=np.float32)[labels[0]]  # exactly 1.0 for the true class: the upper clip
    probs[1] = np.eye(CLASSES, dtype=np.float32)[(labels[1] + 1) % CLASSES]  # exactly 0.0: the lower clip
    one_hot = np.eye(CLASSES, dtype=np.float32)[labels]
    per_example = tf_keras.backend.categorical_crossentropy(one_hot, probs).numpy()
    mean_loss = float(tf_keras.losses.CategoricalCrossentropy()(one_hot, probs).numpy())
    ours = evaluate(labels, probs).loss
    assert ours == pytest.approx(float(np.mean(per_example, dtype=np.float64)), abs=1e-6)
    assert ours == pytest.approx(mean_loss, abs=1e-6)


def test_one_hot_labels_give_the_same_evaluation_as_class_ids(predictions):
    labels, probs = predictions
    # The data stage hands the driver one-hot float32 rows (sparkml_mnist.data.tensors).
    assert evaluate(np.eye(CLASSES, dtype=np.float32)[labels], probs) == evaluate(labels, probs)


def test_a_class_never_predicted_scores_zero_without_warnings():
    labels = np.array([0, 1, 2, 2])
    probs = np.eye(CLASSES)[[0, 1, 1, 1]]  # class 2 is never predicted, classes 3..9 never occur
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = evaluate(labels, probs)
    assert result.precision[2] == 0.0 and result.recall[2] == 0.0
    assert result.support == (1, 1, 2) + (0,) * (CLASSES - 3)
    assert result.confusion[2][1] == 2


def test_to_dict_is_json_safe_and_round_trips(predictions):
    labels, probs = predictions
    result = evaluate(labels, probs)
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert Evaluation.from_dict(data) == result
    assert data["per_class"][3]["class"] == "3"
    assert len(data["confusion_matrix"]) == CLASSES and all(len(row) == CLASSES for row in data["confusion_matrix"])
