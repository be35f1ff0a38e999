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

    python benchmarks/backends.py --backends tf,jax --ceiling --no-collective --result benchmarks/results/backends-jax.json

runs in the default environment with the ``jax`` extra (TF 2.21 + tf_keras for ``tf``, Keras 3 on JAX
for ``jax``) and adds each backend's ceiling efficiency: np=2 images/s (one core per rank) divided
by the machine's ceiling, two INDEPENDENT np=1 runs at one core each started together, their
images/s summed (what the two cores give with no communication at all).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
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
    from sparkml_mnist.launcher import keras_flavour
    from sparkml_mnist.launcher import get_context

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
    from sparkml_mnist.launcher import HorovodRunner
    from sparkml_mnist.cli.session import create_spark

    spark = create_spark(
        "collective-benchmark", master="local[2]", conf={"spark.task.cpus": "1", "spark.ui.enabled": "false"}
    )
    records = HorovodRunner(np=2, spark=spark, backend=backend).run_all(
        collective_main, backend=backend, shapes=VARIANT1_SHAPES, fused=fused
    ).records
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
    parser.add_argument("--backends", default="tf,horovod", help="comma list; the first is the reference")
    parser.add_argument("--ceiling", action="store_true", help="also each backend's ceiling efficiency")
    parser.add_argument("--no-collective", dest="measure_collectives", action="store_false",
                        help="skip the all-reduce timing (tf and horovod only)")
    parser.add_argument("--result", type=Path, default=RESULT_FILE)
    parser.add_argument("--collective", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.collective:  # a child process: one collective measurement, one JSON line
        backend, mode = args.collective
        print(json.dumps(measure_collective(backend, fused=mode == "fused")))
        return

    backends = args.backends.split(",")
    reference = backends[0]
    results: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": throughput.machine(),
        "date": datetime.date.today().isoformat(),
        "versions": installed_versions(),
        "rows": args.rows, "epochs": args.epochs, "np": 2, "task_cpus": 1, "training": {}, "collective": {},
    }
    with tempfile.TemporaryDirectory(prefix="mnist-backends-") as folder:
        slice_path = throughput.write_slice(Path(args.data) / throughput.TRAIN_FILE, args.rows, Path(folder))
        for variant in args.variants.split(","):
            runs: dict[str, Any] = {}
            for backend in backends:
                load = os.getloadavg()[0]  # the machine may be shared: a busy one lowers every figure
                runs[backend] = measure_once_more_on_failure("job", slice_path, variant, "2", "1", backend)
                runs[backend]["load_before"] = load
                if args.ceiling:
                    runs[backend].update(ceiling(slice_path, variant, backend, runs[backend]["img_s"]))
                print(f"[{variant}] {backend}: {describe(runs[backend])}", flush=True)
            for backend in backends[1:]:
                runs[f"{backend}_vs_{reference}"] = runs[backend]["img_s"] / runs[reference]["img_s"]
            results["training"][variant] = runs
    if args.measure_collectives:
        for backend in (name for name in backends if name in COLLECTIVE_BACKENDS):
            for mode in ("fused", "per_tensor"):
                measured = run_collective(backend, mode)
                results["collective"][f"{backend}_{mode}"] = measured
                print(f"[collective] {backend} {mode}: {measured['ms_per_allreduce']:.2f} ms", flush=True)
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


COLLECTIVE_BACKENDS = ("tf", "horovod")


def measure_once_more_on_failure(*argv: str) -> dict[str, Any]:
    """throughput.py's measurement; one failure (e.g. a rank killed on a shared machine) is retried, and said."""
    try:
        return throughput.run_measurement(*argv)
    except RuntimeError as error:
        print(f"measurement {argv} failed, retried once: {str(error)[-400:]}", flush=True)
        return {**throughput.run_measurement(*argv), "retried_after": str(error)[-400:]}


CEILING_RUNS = 2  # the machine's two cores, one independent np=1 run on each


def ceiling(slice_path: str, variant: str, backend: str, np2_img_s: float) -> dict[str, Any]:
    """Two independent np=1 runs at one core each, started together; np=2's images/s over their sum."""
    load = os.getloadavg()[0]
    together = throughput.run_together("job", slice_path, variant, "1", "1", backend, copies=CEILING_RUNS)
    return {"ceiling_runs": together["runs"], "ceiling_img_s": together["img_s"],
            "ceiling_efficiency": np2_img_s / together["img_s"], "ceiling_load_before": load}


def describe(run: dict[str, Any]) -> str:
    text = f"np=2 {run['img_s']:.0f} img/s"
    if "ceiling_img_s" in run:
        text += f", ceiling {run['ceiling_img_s']:.0f} img/s, efficiency {run['ceiling_efficiency']:.2f}"
    return text


def installed_versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in ("tensorflow", "tensorflow-cpu", "tf-keras", "keras", "horovod", "jax", "jaxlib"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def run_collective(backend: str, mode: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, __file__, "--collective", backend, mode], capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"collective {backend} {mode} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
