"""Benchmark: training images/s of the job (np=1, np=2) against bare tf_keras ``fit``, same data and model.

    python benchmarks/throughput.py [--data DIR] [--rows 15360] [--epochs 3] [--variants variant3,variant1]

Each configuration runs in a fresh Python process (TensorFlow's threads and Spark's
``spark.task.cpus`` are fixed per process), all in one run on one machine:

- ``bare``: ``model.fit(x, y, batch_size=128)`` on the first ``--rows`` training images, the whole
  machine's cores (``TF_NUM_INTRAOP_THREADS`` = cores);
- ``job np=1``: the job's own training path (``HorovodRunner`` + ``sparkml_mnist.training.loop.train_variants``
  on the data stage's shards) on ``local[C]`` with ``spark.task.cpus`` = C: the same cores;
- ``job np=1, 1 core`` and ``job np=2, 1 core each``: ``spark.task.cpus`` = 1, the scaling pair;
- ``ceiling``: what this machine can do at all with two 1-core workers: two independent ``job np=1,
  1 core`` runs started together, their images/s summed. ``efficiency`` = np=2 images/s / ceiling:
  how much of the machine data-parallel training keeps (1.0: none lost to the collectives);
- ``--backends tf,horovod``: the np=2 and ceiling runs with each backend (horovod in the environment
  ``--horovod-python`` names, TF 2.15); ``--allreduce float16`` adds np=2 with half-precision
  gradient all-reduce;
- ``--xla``: bare and np=1 again with XLA (``jit_compile=True``) (np=2 with XLA cannot run on CPU:
  TensorFlow has no XLA collectives for CPU devices).

Throughput is images trained per second in the last epoch (the first pays for tracing). The
validation split is set to 0 for every run so all of them do the same work. Writes
``benchmarks/results/throughput.json``.
"""

from __future__ import annotations

import argparse
import bz2
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT_FILE = HERE / "results" / "throughput.json"
TRAIN_FILE = "mnist-digits-train.txt.bz2"
THREAD_ENVS = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS")
SEED = 42
XLA = "xla"


def variant_without_validation(name: str, epochs: int, jit_compile: bool = False):
    from sparkml_mnist.config import load_variant

    return replace(load_variant(name).with_epochs(epochs), validation_split=0.0, jit_compile=jit_compile)


def measure_bare(slice_path: str, variant_name: str, epochs: int, jit_compile: bool = False) -> dict:
    """Plain tf_keras fit on the same arrays the data stage makes (sklearn parses the same file)."""
    import numpy as np
    from sklearn.datasets import load_svmlight_file

    from sparkml_mnist.launcher.keras_flavour import keras as keras_module
    from sparkml_mnist.training.models import build_model

    features, labels = load_svmlight_file(slice_path, n_features=784)
    x = (features.toarray().astype(np.float32) / 255.0).reshape(-1, 28, 28, 1)
    y = np.eye(10, dtype=np.float32)[labels.astype(int)]
    keras = keras_module()
    keras.utils.set_random_seed(SEED)
    variant = variant_without_validation(variant_name, epochs, jit_compile)
    model = build_model(variant)
    seconds: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds.append(time.perf_counter() - self.started)

    model.fit(x, y, batch_size=variant.batch_size, epochs=epochs, shuffle=True, verbose=0, callbacks=[Timer()])
    return {"images_per_epoch": len(x), "epoch_seconds": seconds, "img_s": len(x) / seconds[-1]}


def measure_job(
    slice_path: str, variant_name: str, epochs: int, np_: int, task_cpus: int, backend: str = "tf",
    jit_compile: bool = False, allreduce: str = "float32",
) -> dict:
    """The job's training path: data stage shards -> HorovodRunner -> train_variants."""
    from sparkml_mnist.cli.session import create_spark
    from sparkml_mnist.data.libsvm import load_libsvm
    from sparkml_mnist.data.shards import shard_layouts
    from sparkml_mnist.launcher import HorovodRunner
    from sparkml_mnist.training.loop import VariantPlan, train_variants

    cores = os.cpu_count() or 1
    spark = create_spark(
        "throughput-benchmark",
        master=f"local[{cores}]",
        conf={"spark.task.cpus": str(task_cpus), "spark.ui.enabled": "false"},
    )
    variant = variant_without_validation(variant_name, epochs, jit_compile)
    layouts = shard_layouts(load_libsvm(spark, slice_path), np_, [0.0])
    records = HorovodRunner(np=np_, spark=spark, data=layouts.frame, backend=backend).run_all(
        train_variants, plans=[VariantPlan(variant, layouts.plans[0])], seed=SEED, allreduce=allreduce
    ).records
    spark.stop()
    chief = records[0].value[variant.name]
    images = chief["steps_per_epoch"] * variant.batch_size
    # Every rank runs in lockstep; the slowest rank's epoch is the run's epoch.
    last = max(record.value[variant.name]["epoch_seconds"][-1] for record in records)
    return {"images_per_epoch": images, "epoch_seconds": chief["epoch_seconds"], "img_s": images / last}


def _start(argv: tuple[str, ...], threads: int | None, python: str) -> subprocess.Popen:
    env = dict(os.environ)
    if threads is not None:
        env.update({name: str(threads) for name in THREAD_ENVS})
    return subprocess.Popen([python, __file__, "--measure", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _finish(process: subprocess.Popen, argv: tuple[str, ...]) -> dict:
    out, err = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"measurement {argv} failed:\n{err[-4000:]}")
    return json.loads(out.strip().splitlines()[-1])


def run_measurement(*argv: str, threads: int | None = None, python: str = sys.executable) -> dict:
    return _finish(_start(argv, threads, python), argv)


def run_together(*argv: str, copies: int = 2, python: str = sys.executable) -> dict:
    """``copies`` independent measurements started at once: the machine's ceiling for that many workers."""
    processes = [_start(argv, None, python) for _ in range(copies)]
    runs = [_finish(process, argv) for process in processes]
    return {"runs": runs, "img_s": sum(run["img_s"] for run in runs)}


def write_slice(source: Path, rows: int, folder: Path) -> str:
    """The first ``rows`` training lines as plain text (both sklearn and Spark read it)."""
    path = folder / f"mnist-digits-train-first-{rows}.txt"
    with bz2.open(source, "rt") as lines, open(path, "w") as out:
        for count, line in enumerate(lines):
            if count == rows:
                break
            out.write(line)
    return str(path)


def machine() -> dict:
    model = "unknown"
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            model = line.split(":", 1)[1].strip()
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("SPARKML_MNIST_DATA", "../shared/data/mnist-digits"))
    parser.add_argument("--rows", type=int, default=15360, help="training images (120 global batches of 128)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--variants", default="variant3,variant1")
    parser.add_argument("--backends", default="tf", help="tf, or tf,horovod (horovod needs --horovod-python)")
    parser.add_argument("--horovod-python", default=str(Path(__file__).resolve().parents[1] / ".venv-horovod" / "bin" / "python"))
    parser.add_argument("--allreduce", default="float32", help="float16: also np=2 with half-precision all-reduce")
    parser.add_argument("--xla", action="store_true", help="also bare and np=1 with XLA")
    parser.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:  # a child process: one measurement, one JSON line
        kind, slice_path, variant, *rest = args.measure
        if kind == "bare":
            print(json.dumps(measure_bare(slice_path, variant, args.epochs, jit_compile=XLA in rest)))
        else:
            np_, task_cpus, backend, *flags = rest
            allreduce = next((flag for flag in flags if flag in ("float16", "bfloat16")), "float32")
            print(json.dumps(measure_job(
                slice_path, variant, args.epochs, int(np_), int(task_cpus), backend, jit_compile=XLA in flags,
                allreduce=allreduce,
            )))
        return

    cores = os.cpu_count() or 1
    results: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "rows": args.rows,
        "epochs": args.epochs,
        "variants": {},
    }
    with tempfile.TemporaryDirectory(prefix="mnist-throughput-") as folder:
        slice_path = write_slice(Path(args.data) / TRAIN_FILE, args.rows, Path(folder))
        for variant in args.variants.split(","):
            runs = {
                "bare": run_measurement("bare", slice_path, variant, threads=cores),
                "np1": run_measurement("job", slice_path, variant, "1", str(cores), "tf"),
                "np1_1core": run_measurement("job", slice_path, variant, "1", "1", "tf"),
                "np2_1core": run_measurement("job", slice_path, variant, "2", "1", "tf"),
            }
            if args.xla:  # np=2 with XLA cannot run on CPU (no XLA collectives there); the job refuses it
                runs["bare_xla"] = run_measurement("bare", slice_path, variant, XLA, threads=cores)
                runs["np1_xla"] = run_measurement("job", slice_path, variant, "1", str(cores), "tf", XLA)
            for name, run in runs.items():
                print(f"[{variant}] {name}: {run['img_s']:.0f} img/s (epochs: {run['epoch_seconds']})", flush=True)
            backends = {}
            for backend in args.backends.split(","):
                python = args.horovod_python if backend == "horovod" else sys.executable
                np2 = runs["np2_1core"] if backend == "tf" else run_measurement(
                    "job", slice_path, variant, "2", "1", backend, python=python)
                ceiling = run_together("job", slice_path, variant, "1", "1", backend, python=python)
                entry = {"np2_img_s": np2["img_s"], "ceiling_img_s": ceiling["img_s"],
                         "efficiency": np2["img_s"] / ceiling["img_s"], "ceiling_runs": ceiling["runs"]}
                if args.allreduce != "float32":
                    compressed = run_measurement("job", slice_path, variant, "2", "1", backend, args.allreduce,
                                                 python=python)
                    entry[f"np2_{args.allreduce}_img_s"] = compressed["img_s"]
                    entry[f"efficiency_{args.allreduce}"] = compressed["img_s"] / ceiling["img_s"]
                print(f"[{variant}] {backend}: np=2 {entry['np2_img_s']:.0f} img/s, ceiling "
                      f"{entry['ceiling_img_s']:.0f} img/s, efficiency {entry['efficiency']:.2f}", flush=True)
                backends[backend] = entry
            runs["backends"] = backends
            results["variants"][variant] = runs
    first = results["variants"][args.variants.split(",")[0]]
    results.update(
        {
            "variant": args.variants.split(",")[0],
            "bare_img_s": first["bare"]["img_s"],
            "np1_img_s": first["np1"]["img_s"],
            "np1_ratio": first["np1"]["img_s"] / first["bare"]["img_s"],
            "np2_1core_img_s": first["np2_1core"]["img_s"],
            "np1_1core_img_s": first["np1_1core"]["img_s"],
            "scaling": first["np2_1core"]["img_s"] / first["np1_1core"]["img_s"],
            "efficiency": {variant: {backend: entry["efficiency"] for backend, entry in runs["backends"].items()}
                           for variant, runs in results["variants"].items()},
            "ceiling_img_s": {variant: {backend: entry["ceiling_img_s"] for backend, entry in runs["backends"].items()}
                              for variant, runs in results["variants"].items()},
        }
    )
    RESULT_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULT_FILE.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)}, indent=2))


if __name__ == "__main__":
    main()
