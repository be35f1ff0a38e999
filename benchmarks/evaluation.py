"""Evaluation where the data lies (issue 23): the ranks score the test set against the ways they could not.

    python benchmarks/evaluation.py sample [--source DIR] [--label before|after]
    python benchmarks/evaluation.py full --data ../shared/data/mnist-digits

``sample`` runs README's first command (``sparkml-mnist train``: four variants, 5 epochs, np=2 on the
bundled sample) in a fresh process and reads each variant's ``seconds["evaluate"]``, test accuracy and
loss from its report.json; ``--source`` runs another checkout with this interpreter (the commit before
the change: ``git archive`` it into a folder and link its ``conf`` into its package).

``full`` scores full MNIST's 10,000 test rows with one set of weights (variant1's and variant3's,
seeded initial weights: the figures must agree, the time does not depend on them) three ways on
``local[2]``:

- **ranks**: what the job does now. Two barrier ranks each score their ``row % 2`` share of the test
  rows in the hand-off frame on a plain local model (``training.scoring.score_weights``) and return
  sums; the time is the slowest rank's scoring (its TensorFlow is already imported, as in a job, where
  the ranks trained first).
- **mapInArrow**: a Spark stage after training: the test frame in 2 partitions, the weights shipped
  with the task, each Python worker builds the model, scores its partition and yields its sums. Timed
  from the stage's submission to the sums on the driver, cold (the workers import TensorFlow) and warm
  (a second stage on the same, reused workers).
- **driver**: what the job did before: the test set collected to the driver (``collect_tensors``:
  ``orderBy(row).toArrow()``), scaled to float32 and predicted there, then scored with sklearn; with
  the driver's resident memory before and after the collect.

Writes benchmarks/results/evaluation.json (each mode keeps the other's figures); RESULTS.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from job_overhead import commit_of, epochs_seconds, run_sample  # a sibling script: benchmarks/ is on sys.path when run

HERE = Path(__file__).resolve().parent
RESULT_FILE = HERE / "results" / "evaluation.json"
MASTER = "local[2]"
NP = 2
VARIANTS = ("variant1", "variant3")  # the smallest and the largest model
SEED = 42
SUMS_SCHEMA = "sums string"  # one JSON row of sums per partition


def vm_rss_mb() -> float:
    """This process's resident memory now (VmRSS), to see what a collect keeps on the driver."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# -- sample: README's first command, before and after -----------------------------------------------------


def measure_sample(source: Path | None) -> dict[str, Any]:
    wall, report = run_sample(source)
    variants = report["variants"]
    epochs = epochs_seconds(report)  # the slowest rank's epochs
    return {
        "wall_s": round(wall, 1),
        "epochs_s": round(epochs, 1),
        "overhead_s (wall - epochs)": round(wall - epochs, 1),
        "evaluate_s": {v["name"]: round(v["seconds"]["evaluate"], 3) for v in variants},
        "evaluate_total_s": round(sum(v["seconds"]["evaluate"] for v in variants), 3),
        "test_accuracy": {v["name"]: v["test"]["accuracy"] for v in variants},
        "test_loss": {v["name"]: v["test"]["loss"] for v in variants},
        "read_and_validate_s": round(report["timings"]["read_and_validate_s"], 1),
    }


# -- full: 10,000 test rows, three ways -------------------------------------------------------------------


def seeded_weights(names: tuple[str, ...]) -> dict[str, list[Any]]:
    """Each variant's initial weights from the seed (the driver builds them once; every way scores these)."""
    from sparkml_mnist.config import load_variant
    from sparkml_mnist.launcher.keras_flavour import keras
    from sparkml_mnist.training.models import build_model

    weights = {}
    for name in names:
        keras().utils.set_random_seed(SEED)
        weights[name] = build_model(load_variant(name)).get_weights()
    return weights


def figures(sums: Any) -> dict[str, float]:
    from sparkml_mnist.job.metrics import evaluation_from_sums

    evaluation = evaluation_from_sums(sums)
    return {"accuracy": evaluation.accuracy, "loss": evaluation.loss, "examples": evaluation.num_examples}


def rank_scoring(context: Any, weights: dict[str, list[Any]]) -> dict[str, Any]:
    """Inside each barrier rank: score this rank's test rows, variant after variant, as train_variants does."""
    from sparkml_mnist.config import load_variant
    from sparkml_mnist.launcher import keras_flavour
    from sparkml_mnist.training.scoring import score_weights, scoring_rows

    keras_flavour.keras()  # TensorFlow imported before the clock starts: a job's ranks trained first
    clock = time.perf_counter()
    rows = scoring_rows(context.partition())
    rows_s = time.perf_counter() - clock
    return {"rows": len(rows), "rows_s": rows_s,
            "sums": {name: score_weights(load_variant(name), weights[name], rows).to_record() for name in weights}}


def measure_ranks(spark: Any, test: Any, weights: dict[str, list[Any]]) -> dict[str, Any]:
    from sparkml_mnist.data.shards import shard_layouts
    from sparkml_mnist.launcher import HorovodRunner
    from sparkml_mnist.training.scoring import ScoreSums

    layouts = shard_layouts(test, NP, [0.0], test=test)  # the test rows as the job lays them out (layout -1)
    frame = layouts.frame.cache()
    frame.count()
    started = time.perf_counter()
    records = HorovodRunner(np=NP, data=frame, spark=spark).run_all(rank_scoring, weights=weights).records
    run_s = time.perf_counter() - started
    frame.unpersist()
    out: dict[str, Any] = {"run_all_s (launch + TF import + scoring)": round(run_s, 2),
                           "rows_per_rank": [record.value["rows"] for record in records]}
    for name in weights:
        per_rank = [ScoreSums.from_record(record.value["sums"][name]) for record in records]
        total = per_rank[0]
        for more in per_rank[1:]:
            total = total + more
        out[name] = {"scoring_s": round(total.seconds, 3), "per_rank_s": [round(s.seconds, 3) for s in per_rank],
                     **figures(total)}
    return out


def partition_scorer(name: str, weights: list[Any]) -> Callable[[Iterator[Any]], Iterator[Any]]:
    """A mapInArrow function: this partition's rows -> one row of sums (the model built in the Python worker)."""

    def score(batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa

        from sparkml_mnist.config import load_variant
        from sparkml_mnist.launcher import keras_flavour
        from sparkml_mnist.training.scoring import ScoringRows, score_weights
        from sparkml_mnist.data.tensors import images_and_labels

        keras_flavour.keras()
        table = pa.Table.from_batches(list(batches))
        images, one_hot = images_and_labels(table, scaled=False)
        sums = score_weights(load_variant(name), weights, ScoringRows.from_arrays(images, one_hot.argmax(axis=1)))
        yield pa.RecordBatch.from_pydict({"sums": [json.dumps(sums.to_record())]})

    return score


def measure_map_in_arrow(test: Any, weights: dict[str, list[Any]]) -> dict[str, Any]:
    from sparkml_mnist.training.scoring import ScoreSums

    frame = test.frame.repartition(NP).cache()
    frame.count()
    out: dict[str, Any] = {}
    for run in ("cold", "warm"):
        for name in weights:
            started = time.perf_counter()
            rows = frame.mapInArrow(partition_scorer(name, weights[name]), SUMS_SCHEMA).collect()
            stage_s = time.perf_counter() - started
            per_partition = [ScoreSums.from_record(json.loads(row["sums"])) for row in rows]
            total = per_partition[0]
            for more in per_partition[1:]:
                total = total + more
            out.setdefault(name, {})[f"{run}_stage_s"] = round(stage_s, 3)
            out[name].update(figures(total))
    frame.unpersist()
    return out


def measure_driver(test: Any, weights: dict[str, list[Any]]) -> dict[str, Any]:
    from sparkml_mnist.config import load_variant
    from sparkml_mnist.data.tensors import collect_tensors
    from sparkml_mnist.job.metrics import evaluate
    from sparkml_mnist.training.models import build_model
    from sparkml_mnist.training.scoring import score_probabilities

    rss_before = vm_rss_mb()
    started = time.perf_counter()
    x_test, y_test = collect_tensors(test)
    collect_s = time.perf_counter() - started
    out: dict[str, Any] = {"collect_s": round(collect_s, 3), "rss_before_collect_mb": round(rss_before, 1),
                           "rss_after_collect_mb": round(vm_rss_mb(), 1),
                           "collected_mb (float32 images + one-hot labels)": round((x_test.nbytes + y_test.nbytes) / 2**20, 1)}
    for name in weights:
        started = time.perf_counter()
        model = build_model(load_variant(name))
        model.set_weights(weights[name])
        probabilities = model.predict(x_test, batch_size=1024, verbose=0)
        evaluation = evaluate(y_test, probabilities)
        predict_s = time.perf_counter() - started
        sums = score_probabilities(y_test.argmax(axis=1), probabilities)
        out[name] = {"predict_s": round(predict_s, 3), "accuracy": evaluation.accuracy, "loss": evaluation.loss,
                     "examples": evaluation.num_examples, "loss_sum_mean": sums.loss_sum / sums.examples}
    return out


def measure_full(data: Path) -> dict[str, Any]:
    from sparkml_mnist.cli.session import create_spark
    from sparkml_mnist.data.libsvm import load_libsvm
    from sparkml_mnist.data.paths import dataset_paths

    spark = create_spark("evaluation-benchmark", master=MASTER, conf={"spark.ui.enabled": "false"})
    try:
        test = load_libsvm(spark, dataset_paths(str(data)).test)
        weights = seeded_weights(VARIANTS)
        ranks = measure_ranks(spark, test, weights)
        map_in_arrow = measure_map_in_arrow(test, weights)
        driver = measure_driver(test, weights)
        test.release()
    finally:
        spark.stop()
    for name in VARIANTS:  # one model, three ways: the same figures
        assert ranks[name]["accuracy"] == driver[name]["accuracy"] == map_in_arrow[name]["accuracy"], name
        assert abs(ranks[name]["loss"] - driver[name]["loss"]) < 1e-6, name
    return {"test_rows": test.num_rows, "np": NP, "master": MASTER, "ranks": ranks, "mapInArrow": map_in_arrow,
            "driver": driver}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("sample", "full"))
    parser.add_argument("--source", type=Path, help="sample: another checkout to run (PYTHONPATH)")
    parser.add_argument("--label", default="after", choices=("before", "after"), help="sample: which side this is")
    parser.add_argument("--data", type=Path, help="full: the folder of mnist-digits-test.txt[.bz2]")
    args = parser.parse_args()
    result = json.loads(RESULT_FILE.read_text()) if RESULT_FILE.exists() else {}
    checkout = args.source or HERE.parent
    load_before = os.getloadavg()[0]  # the machine is shared: how busy it was says how far to trust the times
    if args.mode == "sample":
        measured = {**measure_sample(args.source), "source": commit_of(checkout)}
        result.setdefault("sample", {"command": "sparkml-mnist train --output TMP   (README's first command)"})
        result["sample"][args.label] = measured
    else:
        if args.data is None:
            parser.error("full needs --data DIR")
        measured = {**measure_full(args.data), "source": commit_of(checkout)}
        result["full"] = measured
    measured["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # before, after
    result.update({
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    RESULT_FILE.parent.mkdir(exist_ok=True)
    RESULT_FILE.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(measured, indent=2))


if __name__ == "__main__":
    main()
