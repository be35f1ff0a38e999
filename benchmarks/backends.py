"""Benchmark: the ``horovod`` backend against ``tf`` (same variant, same np, same run), and the cost
of one gradient all-reduce, packed and unpacked, under each.

    .venv-horovod/bin/python benchmarks/backends.py [--data DIR] [--rows 15360] [--epochs 3]

Runs in the Horovod environment (TF 2.15 + Horovod 0.28.1; scripts/make_horovod_env.sh), where
both backends work, so the two are compared on the same TensorFlow. Training throughput uses
throughput.py's measurement (a fresh process per configuration, np=2 with one core per rank,
images/s in the last epoch, no validation split). The collective measurement times one all-reduce
of variant 1's gradients (149,010 float32 in 6 tensors, what every training step exchanges) at
np=2: ``tf`` with the gradients in one pack (MultiWorkerMirroredStrategy concatenates a pack
into one collective; Keras sends all gradients as one pack by default) and with one pack per
tensor; ``horovod`` with its tensor fusion (``grouped_allreduce``) and tensor by tensor. Writes
``benchmarks/results/backends.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import throughput  # noqa: E402 - the sibling benchmark's measurement helpers

RESULT_FILE = HERE / "results" / "backends.json"
VARIANT1_SHAPES = [(4, 4, 1, 8), (8,), (1152, 128), (128,), (128, 10), (10,)]  # conv, dense, dense kernels/biases
COLLECTIVE_WARMUP = 20
COLLECTIVE_REPEATS = 300
ONE_PACK = 0  # CommunicationOptions.bytes_per_pack: 0 = all tensors in one pack
PACK_PER_TENSOR = 1  # any positive size below the smallest tensor: one pack (one collective) per tensor


def collective_main(backend: str, shapes: list[tuple[int, ...]], fused: bool) -> dict[str, Any]:
    """Time one all-reduce of ``shapes`` (ms), on this rank; the launcher runs it at np=2."""
    from sparkml_mnist import keras_flavour
    from sparkml_mnist.distributed import get_context

    tf = keras_flavour.tensorflow()
    context = get_context()
    if backend == "horovod":
        if not fused:  # Horovod fuses whatever is ready in a cycle; a threshold of 0 turns fusion off
            os.environ["HOROVOD_FUSION_THRESHOLD"] = "0"
        import horovod.tensorflow as hvd

        hvd.init()

        @tf.function
        def step(values: list[Any]) -> Any:
            if fused:
                return hvd.grouped_allreduce(values, op=hvd.Sum)
            return [hvd.allreduce(v, op=hvd.Sum) for v in values]
    else:
        strategy = context.strategy  # first: TF's collectives must be set up before any eager op
        options = tf.distribute.experimental.CommunicationOptions(bytes_per_pack=ONE_PACK if fused else PACK_PER_TENSOR)

        constants = [tf.ones(shape) * (context.rank + 1) for shape in shapes]

        @tf.function
        def step(values: list[Any]) -> Any:  # the replica function reduces the captured tensors
            def reduce() -> Any:
                return tf.distribute.get_replica_context().all_reduce("sum", constants, options=options)

            return strategy.run(reduce)

    tensors = [tf.ones(shape) * (context.rank + 1) for shape in shapes]  # Horovod's ops take them as inputs
    for _ in range(COLLECTIVE_WARMUP):
        step(tensors)
    started = time.perf_counter()
    for _ in range(COLLECTIVE_REPEATS):
        result = step(tensors)
    seconds = time.perf_counter() - started
    first = result[0] if isinstance(result, (list, tuple)) else result
    return {"ms": 1000 * seconds / COLLECTIVE_REPEATS, "check": float(tf.reduce_max(first))}


def measure_collective(backend: str, fused: bool) -> dict[str, Any]:
    from sparkml_mnist.distributed import HorovodRunner
    from sparkml_mnist.session import create_spark

    spark = create_spark(
        "collective-benchmark", master="local[2]", conf={"spark.task.cpus": "1", "spark.ui.enabled": "false"}
    )
    records = HorovodRunner(np=2, spark=spark, backend=backend, log_sink=None).run_all(
        collective_main, backend=backend, shapes=VARIANT1_SHAPES, fused=fused
    )
    spark.stop()
    values = [record.value for record in records]
    if any(v["check"] != 3.0 for v in values):  # ones * 1 + ones * 2
        raise RuntimeError(f"the all-reduce gave a wrong sum: {values}")
    return {"ms_per_allreduce": max(v["ms"] for v in values), "floats": sum(_size(s) for s in VARIANT1_SHAPES),
            "tensors": len(VARIANT1_SHAPES)}


def _size(shape: tuple[int, ...]) -> int:
    size = 1
    for dim in shape:
        size *= dim
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("SPARKML_MNIST_DATA", "../shared/data/mnist-digits"))
    parser.add_argument("--rows", type=int, default=15360)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--variants", default="variant3,variant1")
    parser.add_argument("--collective", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.collective:  # a child process: one collective measurement, one JSON line
        backend, mode = args.collective
        print(json.dumps(measure_collective(backend, fused=mode == "fused")))
        return

    import horovod
    import tensorflow as tf

    results: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": throughput.machine(),
        "date": datetime.date.today().isoformat(),
        "versions": {"tensorflow": tf.__version__, "horovod": horovod.__version__},
        "rows": args.rows, "epochs": args.epochs, "np": 2, "task_cpus": 1, "training": {}, "collective": {},
    }
    with tempfile.TemporaryDirectory(prefix="mnist-backends-") as folder:
        slice_path = throughput.write_slice(Path(args.data) / throughput.TRAIN_FILE, args.rows, Path(folder))
        for variant in args.variants.split(","):
            runs = {backend: throughput.run_measurement("job", slice_path, variant, "2", "1", backend)
                    for backend in ("tf", "horovod")}
            runs["horovod_vs_tf"] = runs["horovod"]["img_s"] / runs["tf"]["img_s"]
            print(f"[{variant}] tf {runs['tf']['img_s']:.0f} img/s, horovod {runs['horovod']['img_s']:.0f} img/s",
                  flush=True)
            results["training"][variant] = runs
    for backend in ("tf", "horovod"):
        for mode in ("fused", "per_tensor"):
            measured = run_collective(backend, mode)
            results["collective"][f"{backend}_{mode}"] = measured
            print(f"[collective] {backend} {mode}: {measured['ms_per_allreduce']:.2f} ms", flush=True)
    RESULT_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULT_FILE.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def run_collective(backend: str, mode: str) -> dict[str, Any]:
    import subprocess

    result = subprocess.run(
        [sys.executable, __file__, "--collective", backend, mode], capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"collective {backend} {mode} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
