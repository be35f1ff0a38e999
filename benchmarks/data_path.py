"""Benchmark: full MNIST train+test -> per-shard tensors, Spark data stage against the lab's sklearn way.

    python benchmarks/data_path.py [--data DIR] [--shards 2] [--repeats 2]

Every measurement runs in a fresh Python process, so each reports its own peak RSS and pays its
own start-up: the sklearn reference (``load_svmlight_file(...).toarray()`` + the lab's reshape
and scaling) and the Spark path (validating read, split, equal shards, and the Arrow -> numpy
tensors built inside each task) on the Databricks layout; and, from Spark's stage metrics, the bytes
the training file's data stage reads and shuffles (plain ``.txt``, decompressed to a
temporary folder first) and on the ``.bz2`` files. Writes ``benchmarks/results/data_path.json``;
RESULTS.md quotes it.
"""

from __future__ import annotations

import argparse
import bz2
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
RESULT_FILE = HERE / "results" / "data_path.json"
FILES = ("mnist-digits-train.txt", "mnist-digits-test.txt")
VALIDATION_SPLIT = 0.1  # the lab's validation split for variants 1 and 2
TASK_REPORT = "shard bigint, train bigint, validation bigint, pixel_sum double"


def peak_rss_mb() -> float:
    """This process's own peak resident memory: VmHWM, the high-water mark of its address space.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries that over ``exec`` from the process that
    forked it, so every measurement child reported the orchestrator's peak (which had imported
    sklearn and pyspark) instead of its own.
    """
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the best there is


# --- the measured work, each run in its own process ---------------------------------------------


def measure_sklearn(folder: Path, suffix: str) -> dict:
    import numpy as np
    from sklearn.datasets import load_svmlight_file

    started = time.perf_counter()
    total = 0
    for name in FILES:
        features, labels = load_svmlight_file(str(folder / (name + suffix)), n_features=784)
        images = features.toarray().reshape(-1, 28, 28, 1).astype(np.float32) / 255.0
        one_hot = np.eye(10, dtype=np.float32)[labels.astype(int)]
        total += len(images) if len(one_hot) == len(images) else 0
    return {"seconds": time.perf_counter() - started, "rows": total, "peak_rss_mb": peak_rss_mb()}


def _task_summary(batches: Iterator) -> Iterator:
    import pyarrow as pa

    import numpy as np

    from sparkml_mnist.training.inputs import shard_rows

    shard = shard_rows(pa.Table.from_batches(list(batches)))
    parts = [part.take(np.arange(len(part)))[0] for part in (shard.train, shard.validation)]
    yield pa.RecordBatch.from_pylist(
        [
            {
                "shard": shard.shard,
                "train": len(shard.train),
                "validation": len(shard.validation),
                "pixel_sum": float(sum(part.sum(dtype=np.int64) for part in parts)),
            }
        ]
    )


def spark_pipeline(spark, folder: Path, suffix: str, shards: int, barrier: bool) -> int:
    """What the job does before training: read + validate, split, shard, tensors in each task."""
    from sparkml_mnist.data.libsvm import load_libsvm
    from sparkml_mnist.data.shards import shard_frame

    rows = 0
    for name, fraction in zip(FILES, (VALIDATION_SPLIT, 0.0)):
        data = load_libsvm(spark, str(folder / (name + suffix)))
        sharded = shard_frame(data, shards, fraction)
        reports = sharded.frame.mapInArrow(_task_summary, TASK_REPORT, barrier=barrier).collect()
        data.release()  # the job releases its parsed rows too; a repeat must not find them cached
        if sorted(r["shard"] for r in reports) != list(range(shards)):
            raise RuntimeError(f"expected one report per shard, got {reports}")
        rows += sum(r["train"] + r["validation"] for r in reports)
    return rows


def measure_shuffle(folder: Path, suffix: str, shards: int) -> dict:
    """What the training file's data stage reads and shuffles, from Spark's own stage metrics (its REST API)."""
    import urllib.request

    from sparkml_mnist.data.libsvm import load_libsvm
    from sparkml_mnist.data.shards import shard_frame
    from sparkml_mnist.cli.session import create_spark

    spark = create_spark("data-path-shuffle", master="local[2]", conf={"spark.ui.enabled": "true", "spark.ui.port": "0"})
    data = load_libsvm(spark, str(folder / (FILES[0] + suffix)))
    sharded = shard_frame(data, shards, VALIDATION_SPLIT)
    sharded.frame.mapInArrow(_task_summary, TASK_REPORT, barrier=True).collect()
    context = spark.sparkContext
    url = f"{context.uiWebUrl}/api/v1/applications/{context.applicationId}/stages"
    for _ in range(20):  # the status store records a finished stage's metrics shortly after the job returns
        stages = json.load(urllib.request.urlopen(url))
        if stages and all(stage["status"] != "ACTIVE" for stage in stages):
            break
        time.sleep(0.5)
    spark.stop()
    return {"file": FILES[0] + suffix, "shards": shards,
            "shuffle_write_bytes": sum(stage["shuffleWriteBytes"] for stage in stages),
            "input_bytes": sum(stage["inputBytes"] for stage in stages),
            "stages": len(stages)}


def measure_spark(folder: Path, suffix: str, master: str, shards: int, barrier: bool, repeats: int) -> dict:
    started = time.perf_counter()
    from sparkml_mnist.cli.session import create_spark

    spark = create_spark("data-path-benchmark", master=master, conf={"spark.ui.enabled": "false"})
    session_s = time.perf_counter() - started
    timings, rows = [], 0
    for _ in range(1 + repeats):
        started = time.perf_counter()
        rows = spark_pipeline(spark, folder, suffix, shards, barrier)
        timings.append(time.perf_counter() - started)
    spark.stop()
    return {
        "session_s": session_s,
        "first_s": timings[0],
        "repeat_s": statistics.median(timings[1:]),
        "all_s": timings,
        "rows": rows,
        "peak_rss_mb": peak_rss_mb(),
    }


# --- orchestration ---------------------------------------------------------------------------------


def run_measurement(*argv: str) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--measure", *argv], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"measurement {argv} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def machine() -> dict:
    model = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import numpy
    import pyspark
    import sklearn

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "pyspark": pyspark.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("SPARKML_MNIST_DATA", "../shared/data/mnist-digits"))
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:  # a child process: one measurement, one JSON line
        kind, folder, suffix, *rest = args.measure
        if kind == "sklearn":
            print(json.dumps(measure_sklearn(Path(folder), suffix)))
        elif kind == "shuffle":
            print(json.dumps(measure_shuffle(Path(folder), suffix, args.shards)))
        else:
            master, barrier = rest
            print(json.dumps(measure_spark(Path(folder), suffix, master, args.shards, barrier == "barrier", args.repeats)))
        return

    source = Path(args.data).resolve()
    results: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine()}
    results["date"] = datetime.date.today().isoformat()
    with tempfile.TemporaryDirectory(prefix="mnist-txt-") as plain:
        for name in FILES:  # the Databricks layout: uncompressed .txt (not timed)
            with bz2.open(source / (name + ".bz2"), "rb") as packed, open(Path(plain) / name, "wb") as out:
                shutil.copyfileobj(packed, out, length=1 << 22)
        for label, folder, suffix in (("txt", plain, ""), ("bz2", str(source), ".bz2")):
            entry: dict = {"sklearn": run_measurement("sklearn", folder, suffix)}
            print(f"[{label}] sklearn: {entry['sklearn']}", flush=True)
            for master, barrier in (("local[2]", "barrier"), ("local[2]", "plain"), ("local[1]", "plain")):
                key = f"spark_{master}_{barrier}"
                entry[key] = run_measurement("spark", folder, suffix, master, barrier)
                print(f"[{label}] {key}: {entry[key]}", flush=True)
            results[label] = entry
        results["shuffle_txt"] = run_measurement("shuffle", plain, "")
        print(f"[txt] shuffle: {results['shuffle_txt']}", flush=True)

        # The same job on the bundled 7,000-row sample: the driver's peak RSS must not grow with the data.
        from sparkml_mnist.data.paths import sample_paths

        small = Path(plain) / "sample"
        small.mkdir()
        for name, path in zip(FILES, (sample_paths().train, sample_paths().test)):
            (small / (name + ".bz2")).symlink_to(path)
        results["sample_bz2"] = {"spark_local[2]_barrier": run_measurement("spark", str(small), ".bz2", "local[2]", "barrier")}
        print(f"[sample] {results['sample_bz2']}", flush=True)

    txt = results["txt"]
    job = txt["spark_local[2]_barrier"]
    results.update(
        {
            "sklearn_s": txt["sklearn"]["seconds"],
            "spark_first_s": job["first_s"],
            "spark_repeat_s": job["repeat_s"],
            "ratio_first": txt["sklearn"]["seconds"] / job["first_s"],
            "ratio_repeat": txt["sklearn"]["seconds"] / job["repeat_s"],
            "parallel_speedup": txt["spark_local[1]_plain"]["repeat_s"] / txt["spark_local[2]_plain"]["repeat_s"],
            "driver_peak_rss_mb": job["peak_rss_mb"],
            "spark_session_s": job["session_s"],
            "driver_peak_rss_mb_sample": results["sample_bz2"]["spark_local[2]_barrier"]["peak_rss_mb"],
            "train_shuffle_write_bytes": results["shuffle_txt"]["shuffle_write_bytes"],
            "train_input_bytes": results["shuffle_txt"]["input_bytes"],
        }
    )
    RESULT_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULT_FILE.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)}, indent=2))


if __name__ == "__main__":
    main()
