"""Scoring on the executors (issue 25): ``predict`` on local[1] and local[2] against one driver process's predict.

    python benchmarks/scoring.py [--data ../shared/data/mnist-digits] [--repeat 4] [--cache DIR]

Data: full MNIST's test file (``--data``, default ``$SPARKML_MNIST_DATA`` or ../shared/data/mnist-digits)
decompressed and written ``--repeat`` times one after the other (x4: 40,000 rows), uncompressed LIBSVM
under ``--cache`` (default: the temporary folder), made once and reused; never part of the repository.
Models: variant1 (the smallest) and variant3 (the largest) with their seeded initial weights, saved as
``.keras`` in a temporary folder (the time does not depend on the weights; every way must give the same
predictions, which is checked).

Each way runs in a fresh process (so no TensorFlow is imported before it is counted where it counts):

- **executors** (``local[1]``, then ``local[2]``: 1 and 2 task slots): the x4 file through the data stage
  (read, checked and kept once, not timed), then ``sparkml_mnist.predict(frame, model)`` and an action
  that counts the correct predictions (one row reaches the driver). Timed from the action's submission
  to its result, twice per model: ``cold`` (the first stage: Python workers import TensorFlow and load
  the model) and ``warm`` (the same again: the workers and their loaded model are reused). Then the
  command's whole flow once, ``predict_to_path`` with variant3 (read and check the LIBSVM file, load
  and check the model on the driver, score, write Parquet, count the output).
- **driver**: one process reads the same rows into memory (sklearn's LIBSVM reader, not timed), loads the
  model, and times ``serving.class_probabilities``: training's scaling and one ``model.predict`` over
  all rows in batches of 1,024, TensorFlow's default threads (every core). Twice: the first call traces
  the predict function.

Images/s = rows / seconds. Writes ``benchmarks/results/scoring.json``; RESULTS.md quotes it.
"""

from __future__ import annotations

import argparse
import bz2
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from job_overhead import commit_of  # a sibling script: benchmarks/ is on sys.path when run

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULT_FILE = HERE / "results" / "scoring.json"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mnist-digits"
DATA_ENV = "SPARKML_MNIST_DATA"
TEST_FILE = "mnist-digits-test.txt"
VARIANTS = ("variant1", "variant3")  # the smallest and the largest model
CLI_VARIANT = "variant3"
SEED = 42
MASTERS = ("local[1]", "local[2]")
RUNS = ("cold", "warm")
CHUNK_BYTES = 1 << 24


def scaled_file(data: Path, repeat: int, cache: Path) -> Path:
    """The test file written ``repeat`` times, once per cache folder (a partial file is never left as done)."""
    target = cache / f"mnist-digits-test-x{repeat}.txt"
    if target.exists():
        return target
    source = data / TEST_FILE
    opener = open if source.exists() else bz2.open
    source = source if source.exists() else data / f"{TEST_FILE}.bz2"
    partial = target.with_suffix(".partial")
    with open(partial, "wb") as out:
        for _ in range(repeat):
            with opener(source, "rb") as lines:
                shutil.copyfileobj(lines, out, CHUNK_BYTES)
    partial.rename(target)
    return target


def seeded_models(folder: Path) -> dict[str, str]:
    from sparkml_mnist.config import load_variant
    from sparkml_mnist.launcher.keras_flavour import keras
    from sparkml_mnist.training.models import build_model

    files = {}
    for name in VARIANTS:
        keras().utils.set_random_seed(SEED)
        files[name] = str(folder / f"{name}.keras")
        build_model(load_variant(name)).save(files[name])
    return files


# -- one way per process -----------------------------------------------------------------------------------


def measure_executors(master: str, data: str, models: dict[str, str], output: str) -> dict[str, Any]:
    from pyspark.sql import functions as F

    from sparkml_mnist import predict
    from sparkml_mnist.cli.session import create_spark
    from sparkml_mnist.data.libsvm import load_libsvm
    from sparkml_mnist.job.predict import predict_to_path

    spark = create_spark("scoring-benchmark", master=master, conf={"spark.ui.enabled": "false"})
    try:
        test = load_libsvm(spark, data)
        partitions = test.frame.rdd.getNumPartitions()
        out: dict[str, Any] = {"rows": test.num_rows, "partitions": partitions,
                               "task_slots": spark.sparkContext.defaultParallelism}
        for name, model in models.items():
            scored = predict(test, model)  # the model is loaded and checked on the driver here, not timed
            for run in RUNS:
                started = time.perf_counter()
                correct = scored.agg(F.sum((F.col("label") == F.col("prediction")).cast("long"))).collect()[0][0]
                seconds = time.perf_counter() - started
                out.setdefault(name, {})[run] = {"seconds": round(seconds, 2),
                                                 "images_per_s": round(test.num_rows / seconds)}
            out[name]["correct"] = int(correct)
        test.release()
        started = time.perf_counter()
        summary = predict_to_path(spark, models[CLI_VARIANT], data, output)
        out["predict_to_path"] = {"variant": CLI_VARIANT, "seconds": round(time.perf_counter() - started, 2),
                                  "rows": summary.rows, "correct": summary.correct}
    finally:
        spark.stop()
    return out


def measure_driver(data: str, models: dict[str, str]) -> dict[str, Any]:
    import numpy as np
    from sklearn.datasets import load_svmlight_file

    from sparkml_mnist.config import load_data_spec
    from sparkml_mnist.job import serving
    from sparkml_mnist.launcher.keras_flavour import keras

    spec = load_data_spec()
    features, labels = load_svmlight_file(data, n_features=spec.num_features)
    rows = features.toarray().astype(np.uint8)
    out: dict[str, Any] = {"rows": len(rows)}
    for name, model_file in models.items():
        started = time.perf_counter()
        model = keras().models.load_model(model_file, compile=False)
        out.setdefault(name, {})["load_s"] = round(time.perf_counter() - started, 2)
        for run in RUNS:
            started = time.perf_counter()
            probabilities = serving.class_probabilities(model, rows, spec)
            seconds = time.perf_counter() - started
            out[name][run] = {"seconds": round(seconds, 2), "images_per_s": round(len(rows) / seconds)}
        out[name]["correct"] = int((probabilities.argmax(axis=1) == labels).sum())
    return out


def in_fresh_process(*argv: str) -> dict[str, Any]:
    """This script again with ``argv``; its result is its last stdout line (JSON)."""
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], capture_output=True, text=True,
                          cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:2])} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get(DATA_ENV) or DEFAULT_DATA))
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "sparkml-mnist-scoring")
    parser.add_argument("--measure", choices=("executors", "driver"), help=argparse.SUPPRESS)  # a child's part
    parser.add_argument("--master", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--models", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure == "executors":
        print(json.dumps(measure_executors(args.master, args.input, json.loads(args.models), args.output)))
        return
    if args.measure == "driver":
        print(json.dumps(measure_driver(args.input, json.loads(args.models))))
        return

    args.cache.mkdir(parents=True, exist_ok=True)
    data = scaled_file(args.data, args.repeat, args.cache)
    load_before = os.getloadavg()[0]  # the machine is shared: how busy it was says how far to trust the times
    with tempfile.TemporaryDirectory(prefix="scoring-benchmark-") as scratch:
        models = json.dumps(seeded_models(Path(scratch)))
        result: dict[str, Any] = {"data": f"{TEST_FILE} x{args.repeat}", "variants": list(VARIANTS)}
        for master in MASTERS:
            output = str(Path(scratch) / f"predictions-{master.strip('local[]')}")
            result[f"executors {master}"] = in_fresh_process("--measure", "executors", "--master", master,
                                                             "--input", str(data), "--models", models,
                                                             "--output", output)
        result["driver"] = in_fresh_process("--measure", "driver", "--input", str(data), "--models", models)
    for name in VARIANTS:  # one model, three ways: the same predictions
        counts = {way: result[way][name]["correct"] for way in ("driver", *(f"executors {m}" for m in MASTERS))}
        assert len(set(counts.values())) == 1, (name, counts)
    result.update({
        "source": commit_of(REPO),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    RESULT_FILE.parent.mkdir(exist_ok=True)
    RESULT_FILE.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
