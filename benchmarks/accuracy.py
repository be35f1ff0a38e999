"""The accuracy table: the lab's four variants, the lab's epochs, full MNIST, at np=1 and np=2.

    python benchmarks/accuracy.py [--data DIR] [--nps 1,2]

Runs the job itself (``sparkml-mnist train --run-config lab``) once per ``np`` on local Spark, each rank
getting an equal share of the machine's cores (``spark.task.cpus`` = cores / np, through
``PYSPARK_SUBMIT_ARGS``). Writes ``benchmarks/results/accuracy.json`` (a list of
``{variant, np, epochs, test_accuracy, test_loss, seconds}``) and, beside it, each run's
``report.md`` and ``comparison.png`` (the models stay in a temporary folder: they are large).

    python benchmarks/accuracy.py --seeds 1,2,3 --variants variant2 [--nps 1,2]

repeats the lab run of the given variant(s) with other seeds (``accuracy-seeds.json``): the
spread that chance alone gives, against which an np=1 / np=2 difference is judged.

    python benchmarks/accuracy.py --backend jax --nps 2 --variants variant1

the same lab run under another backend (``accuracy-<backend>.json``, ``accuracy-<backend>-np<N>-*``).

    python benchmarks/accuracy.py --allreduce float16 --nps 2 --variants variant1,variant3

the same lab run with the gradients all-reduced in half precision (``accuracy-float16.json``); with
``--prefix accuracy-float32`` and no ``--allreduce``, the float32 run to hold it against (same seed,
same code).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SEEDS_FILE = RESULTS / "accuracy-seeds.json"
KEPT_FILES = ("report.md", "comparison.png")


DEFAULT_BACKEND = "tf"
FULL_PRECISION = "float32"
SEED_SPREAD_VARIANT = "variant2"


def run_lab(
    data: str, np_: int, output: Path, variants: str | None = None, seed: int | None = None,
    backend: str = DEFAULT_BACKEND, allreduce: str = FULL_PRECISION, prefix: str | None = None,
) -> list[dict]:
    cores = os.cpu_count() or 1
    env = dict(os.environ, PYSPARK_SUBMIT_ARGS=f"--conf spark.task.cpus={max(1, cores // np_)} pyspark-shell")
    command = [
        str(Path(sys.executable).with_name("sparkml-mnist")),
        "train", "--run-config", "lab", "--data", data, "--np", str(np_), "--output", str(output),
    ]
    if variants:
        command += ["--variant", variants]
    if seed is not None:
        command += ["--seed", str(seed)]
    if backend != DEFAULT_BACKEND:
        command += ["--backend", backend]
    if allreduce != FULL_PRECISION:
        command += ["--allreduce", allreduce]
    print(" ".join(command), flush=True)
    subprocess.run(command, env=env, check=True)
    report = json.loads((output / "report.json").read_text())
    rows = []
    for variant in report["variants"]:
        rows.append(
            {
                "variant": variant["name"],
                "np": np_,
                "epochs": variant["epochs"],
                "test_accuracy": variant["test"]["accuracy"],
                "test_loss": variant["test"]["loss"],
                "seconds": variant["seconds"].get("total"),
                "lab_reference_accuracy": variant.get("lab_reference_accuracy"),
                "seed": report["config"]["run"]["seed"],
                "backend": backend,
                "allreduce": allreduce,
            }
        )
    if seed is not None:  # a seed-spread run: the figures are enough
        return rows
    prefix = prefix or results_prefix(backend, allreduce)
    for name in KEPT_FILES:
        shutil.copyfile(output / name, RESULTS / f"{prefix}-np{np_}-{name}")
    return rows


def results_prefix(backend: str, allreduce: str) -> str:
    """accuracy, accuracy-jax, accuracy-float16, accuracy-horovod-float16: one file set per way of training."""
    parts = ["accuracy"]
    parts += [backend] if backend != DEFAULT_BACKEND else []
    parts += [allreduce] if allreduce != FULL_PRECISION else []
    return "-".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("SPARKML_MNIST_DATA", "../shared/data/mnist-digits"))
    parser.add_argument("--nps", default="1,2", help="comma list of np values")
    parser.add_argument("--seeds", help="seed spread instead: comma list of seeds, each a run of --variants")
    parser.add_argument("--variants", help=f"the variant(s) (default: all; with --seeds: {SEED_SPREAD_VARIANT})")
    parser.add_argument("--backend", default=DEFAULT_BACKEND, help="the launcher's backend (tf, horovod, jax)")
    parser.add_argument("--allreduce", default=FULL_PRECISION, choices=(FULL_PRECISION, "float16"),
                        help="the gradients' precision on the wire")
    parser.add_argument("--prefix", help="name of the result files (default: from --backend and --allreduce)")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.seeds:
        seed_spread(args.data, [int(n) for n in args.nps.split(",")], [int(s) for s in args.seeds.split(",")],
                    args.variants or SEED_SPREAD_VARIANT)
        return
    prefix = args.prefix or results_prefix(args.backend, args.allreduce)
    result_file = RESULTS / f"{prefix}.json"
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="mnist-accuracy-") as folder:
        for np_ in (int(n) for n in args.nps.split(",")):
            rows += run_lab(args.data, np_, Path(folder) / f"np{np_}", args.variants, backend=args.backend,
                            allreduce=args.allreduce, prefix=prefix)
            result_file.write_text(json.dumps(rows, indent=2) + "\n")  # keep what is done if a later run fails
    for row in rows:
        print(f"{row['variant']} np={row['np']}: {row['test_accuracy']:.4f} ({row['seconds']:.0f} s)")


def seed_spread(data: str, nps: list[int], seeds: list[int], variants: str) -> None:
    """The same lab runs with other seeds: how far test accuracy moves by chance alone."""
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="mnist-seeds-") as folder:
        for np_ in nps:
            for seed in seeds:
                rows += run_lab(data, np_, Path(folder) / f"np{np_}-seed{seed}", variants, seed)
                SEEDS_FILE.write_text(json.dumps(rows, indent=2) + "\n")
    for row in rows:
        print(f"{row['variant']} np={row['np']} seed={row['seed']}: {row['test_accuracy']:.4f}")


if __name__ == "__main__":
    main()
