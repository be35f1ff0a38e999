"""Where a fresh session's first read goes: the sample's files read cold, and again after a Python worker started.

    python benchmarks/cold_read.py [--repeats 2] [--jvm]

Each measurement is a fresh Python process (a fresh JVM and SparkSession on ``local[*]``): the session's
start, then ``load_libsvm`` on the bundled sample's train file, its test file and the train file again.
In the ``worker_first`` mode a trivial RDD job runs before the first read, which starts Spark's Python
worker: what is left of the first read's extra time is the first use of pyarrow in the worker, of the
``libsvm`` source and of code generation. Writes ``benchmarks/results/cold_read.json``.

``--jvm`` instead measures the cold mode under each way of starting the driver JVM
(sparkml_mnist.cli.jvm): without the class archive, with it (the default; the archive must exist: a
CLI run writes it), each with and without the quick C1 compiler only; and the archive's first writing
(a JVM that writes it as it exits: how long that process's JVM lives after Python's exit).
Writes ``benchmarks/results/jvm_start.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT_FILE = HERE / "results" / "cold_read.json"
MODES = ("cold", "worker_first")
JVM_RESULT_FILE = HERE / "results" / "jvm_start.json"
QUICK_JIT = "-XX:TieredStopAtLevel=1"
# How the driver JVM starts, as environment settings of the measured process (sparkml_mnist.cli.jvm).
JVM_STARTS = {
    "plain": {"SPARKML_MNIST_JVM_CACHE": "none", "SPARKML_MNIST_JVM_OPTIONS": ""},
    "archive": {"SPARKML_MNIST_JVM_OPTIONS": ""},
    "c1": {"SPARKML_MNIST_JVM_CACHE": "none", "SPARKML_MNIST_JVM_OPTIONS": QUICK_JIT},
    "archive_c1": {"SPARKML_MNIST_JVM_OPTIONS": QUICK_JIT},
}


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


def run_probe(mode: str, env: dict[str, str] | None = None) -> dict[str, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--probe", mode], capture_output=True, text=True, check=True,
                          env={**os.environ, **(env or {})})
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - started}


def measure_jvm_starts(repeats: int) -> dict:
    """The cold mode under each JVM start, interleaved; then one archive written from scratch."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in JVM_STARTS}
    for _ in range(repeats):
        for name, env in JVM_STARTS.items():
            runs[name].append(run_probe("cold", env))
    return {"runs": runs, "first_writing": measure_archive_writing()}


def measure_archive_writing() -> dict[str, float]:
    """A writer's run in a fresh cache folder: its own time, and how long its JVM then writes."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "SPARKML_MNIST_JVM_CACHE": cache, "SPARKML_MNIST_JVM_OPTIONS": ""}
        started = time.perf_counter()
        # Not captured: a pipe on the CLI's output stays open until its JVM, which inherits it, is done writing.
        subprocess.run([sys.executable, "-m", "sparkml_mnist.cli", "data"], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=True)
        ended = time.perf_counter()
        (lock,) = Path(cache).glob("*.lock")
        jvm_pid = int(lock.read_text().split()[-1])
        while Path(f"/proc/{jvm_pid}").exists():
            time.sleep(0.1)
        written = list(Path(cache).glob("*.writing"))
        return {"cli_data_s": ended - started, "jvm_writing_after_exit_s": time.perf_counter() - ended,
                "archive_mb": written[0].stat().st_size / 2**20 if written else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--jvm", action="store_true", help="compare the ways of starting the driver JVM")
    parser.add_argument("--probe", choices=MODES, help=argparse.SUPPRESS)  # the child process's side
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe)))
        return
    if args.jvm:
        result = {
            "command": "python benchmarks/cold_read.py --jvm",
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **measure_jvm_starts(args.repeats),
        }
        JVM_RESULT_FILE.parent.mkdir(exist_ok=True)
        JVM_RESULT_FILE.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=1))
        return
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            runs[mode].append(run_probe(mode))
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
