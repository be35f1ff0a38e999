"""Where a fresh session's first read goes: the sample's files read cold, and again after a Python worker started.

    python benchmarks/cold_read.py [--repeats 2]

Each measurement is a fresh Python process (a fresh JVM and SparkSession on ``local[*]``): the session's
start, then ``load_libsvm`` on the bundled sample's train file, its test file and the train file again.
In the ``worker_first`` mode a trivial RDD job runs before the first read, which starts Spark's Python
worker: what is left of the first read's extra time is the first use of pyarrow in the worker, of the
``libsvm`` source and of code generation. Writes ``benchmarks/results/cold_read.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT_FILE = HERE / "results" / "cold_read.json"
MODES = ("cold", "worker_first")


def probe(mode: str) -> dict[str, float]:
    """One fresh session (run in its own process by ``main``): seconds per step."""
    clock = time.perf_counter()
    from sparkml_mnist.cli.session import create_spark
    from sparkml_mnist.data.libsvm import load_libsvm
    from sparkml_mnist.data.paths import sample_paths

    steps: dict[str, float] = {"imports_s": time.perf_counter() - clock}
    clock = time.perf_counter()
    spark = create_spark("cold-read", master="local[*]")
    steps["session_s"] = time.perf_counter() - clock
    paths = sample_paths()
    if mode == "worker_first":
        clock = time.perf_counter()
        spark.sparkContext.parallelize([1], 1).map(lambda value: value).count()
        steps["python_worker_s"] = time.perf_counter() - clock
    for name, path in (("train_s", paths.train), ("test_s", paths.test), ("train_again_s", paths.train)):
        clock = time.perf_counter()
        data = load_libsvm(spark, path)
        steps[name] = time.perf_counter() - clock
        data.release()
    spark.stop()
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--probe", choices=MODES, help=argparse.SUPPRESS)  # the child process's side
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe)))
        return
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            done = subprocess.run([sys.executable, __file__, "--probe", mode], capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {
        "command": "python benchmarks/cold_read.py",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runs": runs,
    }
    RESULT_FILE.parent.mkdir(exist_ok=True)
    RESULT_FILE.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
