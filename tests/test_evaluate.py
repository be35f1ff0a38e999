"""The gathered evaluation equals sklearn.metrics on the same predictions and Keras' loss on the same outputs;
the ranks' sums, added up on the driver, give exactly the gathered evaluation."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, replace
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from sparkml_mnist.config import load_data_spec, load_variant
from sparkml_mnist.data.columns import (
    LABEL_COLUMN, LAYOUT_COLUMN, PIXELS_COLUMN, ROW_COLUMN, SHARD_COLUMN, TEST_LAYOUT, VALIDATION_COLUMN,
)
from sparkml_mnist.data.split import plan_shards
from sparkml_mnist.errors import DataError
from sparkml_mnist.job.evaluate import Evaluator
from sparkml_mnist.job.metrics import KERAS_EPSILON, evaluate, evaluation_from_sums
from sparkml_mnist.launcher.protocol import Checkpoint
from sparkml_mnist.report import Evaluation
from sparkml_mnist.training.scoring import (
    ATTEMPT_KEY, SCORE_BATCH, TEST_RECORD_KEY, ScoreSums, ScoringRows, crossentropy_sum, score_probabilities,
    score_weights, scored_key, scoring_rows,
)

CLASSES = 10
EXAMPLES = 500
SEED = 1234
KERAS_LOSS = 1e-6  # a model's loss on the ranks against the driver's predict: float32 outputs, other batches


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


# -- the ranks' sums: every figure from (loss sum, examples, confusion counts) added up over shards --------


def rank_sums(labels: np.ndarray, probs: np.ndarray, shards: int) -> ScoreSums:
    """What ``shards`` ranks report for the test rows ``i % shards`` (the hand-off's test layout), added up."""
    parts = [score_probabilities(labels[s::shards], probs[s::shards]) for s in range(shards)]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def same_figures(ours: Evaluation, reference: Evaluation, loss_tolerance: float = 1e-12) -> None:
    """Every figure equal to the bit; the loss to ``loss_tolerance`` (float64 sums added in another order; a
    model's float32 outputs in batches of other sizes)."""
    assert ours.loss == pytest.approx(reference.loss, rel=loss_tolerance, abs=1e-15)
    assert replace(ours, loss=reference.loss) == reference


@pytest.mark.parametrize("shards", [1, 2, 3, 7])
def test_summed_rank_sums_give_the_gathered_evaluation(predictions, shards):
    labels, probs = predictions  # 500 rows: 3 and 7 shards are uneven (167/167/166, 72 x 3 + 71 x 4)
    same_figures(evaluation_from_sums(rank_sums(labels, probs, shards)), evaluate(labels, probs))


def test_many_random_splits_give_exactly_the_gathered_figures():
    """Random sizes, class mixes and hit rates: precision, recall, f1, support and accuracy to the bit."""
    rng = np.random.default_rng(SEED)
    for trial in range(50):
        rows = int(rng.integers(1, 3000))
        labels = rng.integers(0, int(rng.integers(1, CLASSES + 1)), rows)  # some classes may never occur
        probs = softmax_outputs(labels, hit_rate=float(rng.uniform(0.0, 1.0)), seed=trial)
        same_figures(evaluation_from_sums(rank_sums(labels, probs, int(rng.integers(1, 5)))), evaluate(labels, probs))


def test_classes_missing_in_a_shard_or_everywhere_score_as_gathered():
    """Shard 0 holds classes 0-4 only, shard 1 classes 5-8; class 9 occurs nowhere and class 8 is never predicted."""
    labels = np.array([0, 1, 2, 3, 4] * 4 + [5, 6, 7, 8] * 5)
    predicted = labels.copy()
    predicted[labels == 8] = 7
    predicted[:3] = [1, 0, 0]
    probs = np.eye(CLASSES, dtype=np.float32)[predicted] * 0.9 + 0.01
    halves = [score_probabilities(labels[:20], probs[:20]), score_probabilities(labels[20:], probs[20:])]
    assert halves[0].confusion[5:].sum() == 0 and halves[1].confusion[:5].sum() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = evaluation_from_sums(halves[0] + halves[1])
    same_figures(ours, evaluate(labels, probs))
    assert ours.support[9] == 0 and ours.precision[8] == 0.0 and ours.recall[8] == 0.0


def test_rank_sums_cross_json_exactly(predictions):
    labels, probs = predictions
    sums = score_probabilities(labels, probs, seconds=1.25)
    back = ScoreSums.from_record(json.loads(json.dumps(sums.to_record())))
    assert (back.examples, back.loss_sum, back.seconds) == (sums.examples, sums.loss_sum, sums.seconds)
    np.testing.assert_array_equal(back.confusion, sums.confusion)
    assert sums.loss_sum == pytest.approx(crossentropy_sum(labels, probs), abs=0)


def test_no_scored_rows_is_a_data_error():
    with pytest.raises(DataError, match="no test rows were scored"):
        evaluation_from_sums(ScoreSums(0, 0.0, np.zeros((CLASSES, CLASSES), dtype=np.int64)))


# -- the driver's Evaluator: a variant is kept once every rank's sums of one attempt and its last checkpoint are in


@dataclass
class Queued:
    variant: str
    epoch: int
    sums: ScoreSums


class RecordingEvaluator(Evaluator):
    """The Evaluator's bookkeeping, without building or saving a model."""

    def __init__(self, ranks: int, epochs: int = 2) -> None:
        variant = load_variant("variant1").with_epochs(epochs)
        super().__init__([variant], np_=ranks, ranks=ranks, test_rows=EXAMPLES, seed=SEED, deterministic=False,
                         state=None, say=lambda line: None)  # type: ignore[arg-type]
        self.queued: list[Queued] = []

    def evaluate(self, variant, checkpoint, sums):  # type: ignore[override]
        self.queued.append(Queued(variant.name, checkpoint.epoch, sums))


def records_of(labels: np.ndarray, probs: np.ndarray, ranks: int, attempt: int = 1) -> list[dict]:
    """The rank records ``ranks`` ranks report for the test rows ``i % ranks`` in ``attempt``."""
    records = []
    for rank in range(ranks):
        sums = score_probabilities(labels[rank::ranks], probs[rank::ranks], seconds=1.0 + rank)
        records.append({"rank": rank, TEST_RECORD_KEY: {**sums.to_record(), ATTEMPT_KEY: attempt}})
    return records


def test_the_evaluator_waits_for_every_rank_and_the_last_checkpoint(predictions):
    labels, probs = predictions
    evaluator = RecordingEvaluator(ranks=2)
    evaluator.start()
    records = records_of(labels, probs, 2)
    evaluator.on_report("variant1", 0, {"epoch": 1}, Checkpoint(1, b"epoch 1"))
    evaluator.on_report("variant1", 1, records[1], None)  # rank 1 may finish scoring before rank 0's last checkpoint
    evaluator.on_report("variant1", 0, {"epoch": 2}, Checkpoint(2, b"epoch 2"))
    evaluator.on_report("variant0", 0, records[0], None)  # another key: not this variant's
    assert evaluator.queued == []
    evaluator.on_report("variant1", 0, records[0], None)
    evaluator.on_report("variant1", 0, records[0], None)  # a retry's ranks score it again: kept once
    evaluator.close()
    [queued] = evaluator.queued
    assert (queued.variant, queued.epoch, queued.sums.examples) == ("variant1", 2, EXAMPLES)
    assert queued.sums.seconds == 2.0  # the slowest rank's: they score in parallel
    same_figures(evaluation_from_sums(queued.sums), evaluate(labels, probs))


def test_only_one_attempts_sums_add_up(predictions):
    """Rank 1 scored in attempt 1, which then failed; attempt 2 trained the last epoch again: its sums only."""
    labels, probs = predictions
    evaluator = RecordingEvaluator(ranks=2)
    evaluator.start()
    stale = records_of(labels, 1.0 - probs, 2, attempt=1)
    fresh = records_of(labels, probs, 2, attempt=2)
    evaluator.on_report("variant1", 1, stale[1], None)
    evaluator.on_report("variant1", 0, {"epoch": 2}, Checkpoint(2, b"attempt 2"))
    evaluator.on_report("variant1", 0, fresh[0], None)
    assert evaluator.queued == []  # not attempt 2's rank 0 with attempt 1's rank 1
    evaluator.on_report("variant1", 1, stale[1], None)  # late: an older attempt's never replaces a newer one's
    evaluator.on_report("variant1", 1, fresh[1], None)
    evaluator.close()
    [queued] = evaluator.queued
    same_figures(evaluation_from_sums(queued.sums), evaluate(labels, probs))


def test_a_variant_trained_by_an_earlier_run_is_kept_from_its_scoring_reports(predictions):
    """--resume after the driver stopped between training and keeping: the ranks report under the scored key."""
    labels, probs = predictions
    evaluator = RecordingEvaluator(ranks=2)
    evaluator.start()
    evaluator.final_checkpoint("variant1", Checkpoint(2, b"from the run's state"))
    for rank, record in enumerate(records_of(labels, probs, 2)):
        evaluator.on_report(scored_key("variant1"), rank, record, None)
    evaluator.close()
    [queued] = evaluator.queued
    assert queued.epoch == 2 and queued.sums.examples == EXAMPLES


def test_kept_leaves_a_trained_but_unevaluated_variant_to_the_ranks():
    """JobRun._kept: a finished result is kept; a last-epoch checkpoint without one goes to the Evaluator."""
    from sparkml_mnist.job.run import JobRun

    variants = [load_variant(name).with_epochs(2) for name in ("variant1", "variant2", "variant3")]
    done = SimpleNamespace(evaluation=SimpleNamespace(accuracy=0.5))
    latest = {"variant1": Checkpoint(2, b"kept"), "variant2": Checkpoint(2, b"trained"), "variant3": Checkpoint(1, b"")}
    state = SimpleNamespace(checkpoints=lambda: SimpleNamespace(latest=latest.get),
                            finished=lambda name: done if name == "variant1" else None)
    noted: list[tuple[str, int]] = []
    evaluator = SimpleNamespace(final_checkpoint=lambda name, checkpoint: noted.append((name, checkpoint.epoch)))
    lines: list[str] = []
    run = JobRun(None, SimpleNamespace(variants=variants), state, lines.append)  # type: ignore[arg-type]
    assert run._kept(evaluator) == {"variant1": done}  # type: ignore[arg-type]
    assert noted == [("variant2", 2)]  # variant3 resumes training after epoch 1
    assert any("variant2: trained by an earlier attempt of this run; its ranks score it now" in line for line in lines)


# -- inside a rank: the test rows of the partition, scored on a plain local model --------------------------------


def hand_off_partition(rows: int, spec) -> pa.Table:
    """A rank's partition as the hand-off frame holds it: a few training rows of layout 0, then test rows."""
    rng = np.random.default_rng(SEED)
    pixels = rng.integers(0, spec.max_pixel_value + 1, (rows, spec.num_features), dtype=np.uint8)
    labels = np.arange(rows) % CLASSES
    layouts = np.where(np.arange(rows) < 8, 0, TEST_LAYOUT)
    return pa.table({
        SHARD_COLUMN: pa.array(np.zeros(rows, dtype=np.int32)), VALIDATION_COLUMN: pa.array(np.zeros(rows, dtype=bool)),
        ROW_COLUMN: pa.array(np.arange(rows, dtype=np.int64)), LABEL_COLUMN: pa.array(labels.astype(np.int32)),
        PIXELS_COLUMN: pa.array([bytes(row) for row in pixels], type=pa.binary()),
        LAYOUT_COLUMN: pa.array(layouts.astype(np.int32)),
    })


def test_a_rank_scores_its_test_rows_as_the_driver_would_and_a_resumed_variant_is_only_scored(monkeypatch):
    """score_weights on the test layout of a partition, in uneven shards, added up = the driver's predict; and
    train_variants on a variant an earlier attempt finished: no fit, the sums reported under the scored key."""
    monkeypatch.setenv("TF_USE_LEGACY_KERAS", "1")  # as a rank has it (test_loss_equals_tf_keras imported TF)
    from sparkml_mnist.launcher.keras_flavour import keras
    from sparkml_mnist.training import state as training_state
    from sparkml_mnist.training.loop import VariantPlan, train_variants
    from sparkml_mnist.training.models import build_model

    spec = load_data_spec()
    variant = load_variant("variant1").with_epochs(1)
    keras().utils.set_random_seed(SEED)
    model = build_model(variant)
    table = hand_off_partition(8 + SCORE_BATCH + 37, spec)  # more than one predict batch
    rows = scoring_rows(table)
    images = rows.source.take(np.arange(len(rows)))[0]
    assert len(rows) == SCORE_BATCH + 37 and images.dtype == np.uint8

    scaled = images.astype(np.float32) / np.float32(spec.max_pixel_value)  # as the driver's evaluation did
    reference = evaluate(rows.label_ids, model.predict(scaled, batch_size=SCORE_BATCH, verbose=0))
    same_figures(evaluation_from_sums(score_weights(variant, model.get_weights(), rows)), reference, KERAS_LOSS)
    shards = [ScoringRows.from_arrays(images[s::3], rows.label_ids[s::3]) for s in range(3)]
    sums = [score_weights(variant, model.get_weights(), shard) for shard in shards]
    same_figures(evaluation_from_sums(sums[0] + sums[1] + sums[2]), reference, KERAS_LOSS)
    empty = score_weights(variant, model.get_weights(), ScoringRows.from_arrays(images[:0], rows.label_ids[:0]))
    assert empty.examples == 0 and empty.confusion.sum() == 0

    reports: list[tuple[str, dict]] = []
    checkpoint = Checkpoint(1, training_state.pack(model, 1, {"loss": [1.0]}, [1.0]))
    context = SimpleNamespace(
        rank=1, host="h", attempt=2, partition=lambda: table, latest_checkpoint=lambda key: checkpoint,
        report=lambda key="", metrics=None, checkpoint=None: metrics is not None and reports.append((key, metrics)),
    )
    plan = VariantPlan(variant, plan_shards(6000, 2, 0.0), layout=0)
    assert train_variants(context, [plan], seed=SEED) == {}  # type: ignore[arg-type]
    [(key, record)] = reports
    assert key == scored_key("variant1") and record["rank"] == 1 and record["resumed_from_epoch"] == 1
    assert record[TEST_RECORD_KEY][ATTEMPT_KEY] == 2
    same_figures(evaluation_from_sums(ScoreSums.from_record(record[TEST_RECORD_KEY])), reference, KERAS_LOSS)


def test_the_test_set_rides_beside_the_training_rows_whole_and_row_mod_k(spark):
    """shard_layouts(..., test=): every test row once, in partition ``row % k`` with its shard, none dropped."""
    from pyspark.sql import functions as F

    from sparkml_mnist.data.libsvm import LibsvmData
    from sparkml_mnist.data.shards import shard_layouts

    def data(rows: int, name: str) -> LibsvmData:
        frame = spark.createDataFrame([(i, i % CLASSES, bytes(784)) for i in range(rows)],
                                      f"{ROW_COLUMN} bigint, {LABEL_COLUMN} int, {PIXELS_COLUMN} binary")
        return LibsvmData(path=name, frame=frame, num_rows=rows)

    shards = 3  # 10 test rows: 4 + 3 + 3, where training drops rows to keep its shards equal
    layouts = shard_layouts(data(62, "train"), shards, [0.0, 0.1], test=data(10, "test"))
    row, shard = F.col(ROW_COLUMN), F.col(SHARD_COLUMN)
    found = {
        (r["partition"], r[LAYOUT_COLUMN], r[SHARD_COLUMN]): (r["rows"], r["misplaced"], r["distinct"])
        for r in layouts.frame.groupBy(F.spark_partition_id().alias("partition"), LAYOUT_COLUMN, SHARD_COLUMN).agg(
            F.count("*").alias("rows"), F.sum(F.when(row % shards != shard, 1).otherwise(0)).alias("misplaced"),
            F.countDistinct(row).alias("distinct"),
        ).collect()
    }
    assert layouts.test_rows == 10
    assert {key: value for key, value in found.items() if key[1] == TEST_LAYOUT} == {
        (0, TEST_LAYOUT, 0): (4, 0, 4), (1, TEST_LAYOUT, 1): (3, 0, 3), (2, TEST_LAYOUT, 2): (3, 0, 3),
    }
    assert all(partition == shard for partition, _, shard in found)  # the training layouts too
    assert sum(rows for (_, layout, _), (rows, _, _) in found.items() if layout == 0) == 20 * shards  # 2 dropped
