"""``sparkml-mnist``: thin command line over the library; bad input exits 2 with one line, no traceback."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Sequence

from sparkml_mnist.config import DEFAULT_RUN
from sparkml_mnist.distributed.backends import BACKEND_NAMES
from sparkml_mnist.data.paths import DatasetPaths
from sparkml_mnist.errors import SparkMnistError

if TYPE_CHECKING:  # Spark is imported only by the commands that need it
    from pyspark.sql import SparkSession

    from sparkml_mnist.data.libsvm import LibsvmData

PROGRAM = "sparkml-mnist"
EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description="Train the Keras MNIST lab's ConvNets on Spark.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser(
        "data",
        help="read, validate and shard the input; print what each worker would get",
        description="Preview the data stage: LIBSVM on Spark -> validated rows -> equal shards.",
    )
    _add_data_arguments(data)
    data.add_argument("--np", type=int, default=2, help="number of shards (workers), default 2")
    data.add_argument(
        "--validation-split", type=float, default=0.1, help="last fraction of training rows held out (default 0.1)"
    )
    data.add_argument("--master", help="Spark master, or sc://HOST:PORT for Spark Connect (default: spark-submit's or SPARK_REMOTE, else local[*])")
    data.set_defaults(handler=_run_data_preview)

    train = commands.add_parser(
        "train",
        help="train the lab's ConvNets data-parallel on Spark, evaluate, write the report",
        description="Train variants through the launcher; write report.json/.md, plots and models to --output.",
    )
    train.add_argument("--conf", default=DEFAULT_RUN, metavar="FILE", help="run config: a name in conf/runs or a YAML path (default: sample)")
    train.add_argument("--variant", action="append", metavar="NAME", help="variant(s): a name, a comma list, a YAML path, or 'all'; repeatable")
    train.add_argument("--np", type=int, help="workers: > 0 barrier tasks on executors, < 0 processes on the driver")
    train.add_argument("--epochs", type=int, help="epochs for every variant (default: the run config's, else each variant's)")
    _add_data_arguments(train)
    train.add_argument("--output", metavar="DIR", help="report folder (refused if not empty, unless --overwrite)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    train.add_argument("--seed", type=int, help="random seed (same on every rank)")
    train.add_argument(
        "--backend", choices=BACKEND_NAMES,
        help="tf: MultiWorkerMirroredStrategy (default); horovod: Horovod over Gloo (its own TF 2.15 environment); "
        "jax: Keras 3 on JAX (the jax extra)",
    )
    train.add_argument("--progress-timeout", type=float, metavar="SECONDS", help="end the run if a rank makes no progress this long")
    train.add_argument("--master", help="Spark master, or sc://HOST:PORT for Spark Connect (default: spark-submit's or SPARK_REMOTE, else local[*])")
    train.set_defaults(handler=_run_training)
    _add_download_command(commands)
    return parser


def _add_download_command(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    download = commands.add_parser(
        "download-data",
        help="fetch canonical MNIST, verify its checksums, write the LIBSVM .bz2 files to DIR",
        description="Download the four MNIST IDX files (conf/download.yaml), check them, convert them to "
        "mnist-digits-{train,test}.txt.bz2 in DIR; does nothing when DIR already holds them.",
    )
    download.add_argument("dir", metavar="DIR", help="folder for the LIBSVM files (created if missing)")
    download.add_argument("--mirror", metavar="URL", help="mirror folder URL (default: conf/download.yaml's)")
    download.add_argument("--force", action="store_true", help="download and convert again even if DIR is complete")
    download.set_defaults(handler=_run_download)


def _run_download(args: argparse.Namespace) -> None:
    from sparkml_mnist.data.download import download_mnist

    paths = download_mnist(args.dir, mirror_url=args.mirror, force=args.force, say=print)
    print(f"ready: --data {args.dir}  (train: {paths.train}, test: {paths.test})")


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("input (default: the bundled sample)")
    source.add_argument("--data", metavar="DIR", help="folder with mnist-digits-{train,test}.txt[.bz2]")
    source.add_argument("--train", metavar="PATH", help="training file (any Hadoop path)")
    source.add_argument("--test", metavar="PATH", help="test file (any Hadoop path)")


def _run_training(args: argparse.Namespace) -> None:
    from sparkml_mnist import databricks
    from sparkml_mnist.config import load_run
    from sparkml_mnist.job import run_job
    from sparkml_mnist.plan import plan_job
    from sparkml_mnist.session import create_spark

    if args.data and (args.train or args.test):
        raise SparkMnistError("give either --data DIR or --train/--test PATH, not both")
    data = args.data
    if not (args.data or args.train or args.test):
        data = databricks.default_data_dir() or data  # on Databricks: the runtime's copy of MNIST
    run = load_run(args.conf)
    output = args.output
    if output is None:
        output = databricks.default_output_dir(run.name)  # None off Databricks: the run config's
    elif databricks.is_databricks():
        output = databricks.fuse_path(output, "--output")  # the report is written through /dbfs or /Volumes
    run = run.with_overrides(
        variants=",".join(args.variant) if args.variant else None,
        np=args.np,
        epochs=args.epochs,
        data=data,
        train=args.train,
        test=args.test,
        output=output,
        seed=args.seed,
        progress_timeout_s=args.progress_timeout,
        backend=args.backend,
    )
    plan = plan_job(run, overwrite=args.overwrite)  # every setting checked, before Spark starts
    spark = create_spark(f"{PROGRAM} train", master=args.master)
    run_job(spark, plan)


def _input_paths(args: argparse.Namespace) -> DatasetPaths:
    from sparkml_mnist.data.paths import resolve_inputs, sample_paths

    if args.data and (args.train or args.test):
        raise SparkMnistError("give either --data DIR or --train/--test PATH, not both")
    if args.data:
        return resolve_inputs(args.data)  # a folder, or "sample"
    default = sample_paths()
    return DatasetPaths(train=args.train or default.train, test=args.test or default.test)


def _run_data_preview(args: argparse.Namespace) -> None:
    from sparkml_mnist.data.split import plan_shards
    from sparkml_mnist.session import create_spark

    if args.np < 1:
        raise SparkMnistError(f"--np must be a positive number of shards, got {args.np}")
    paths = _input_paths(args)
    spark = create_spark(f"{PROGRAM} data", master=args.master)
    train = _preview_file(spark, "train", paths.train)
    _preview_file(spark, "test", paths.test)
    plan = plan_shards(train.num_rows, args.np, args.validation_split, paths.train)
    print(
        f"shards (np={plan.num_shards}, validation_split={plan.validation_split}): "
        f"{plan.train_per_shard:,} training + {plan.validation_per_shard:,} validation rows per worker; "
        f"left out to keep shards equal: {plan.dropped_train_rows} training, "
        f"{plan.dropped_validation_rows} validation rows"
    )


def _preview_file(spark: SparkSession, split: str, path: str) -> LibsvmData:
    from sparkml_mnist.data.libsvm import load_libsvm

    started = time.perf_counter()
    data = load_libsvm(spark, path)
    seconds = time.perf_counter() - started
    counts = data.frame.groupBy("label").count().orderBy("label").collect()
    print(f"{split}: {path}")
    print(f"  {data.num_rows:,} valid rows, read and checked in {seconds:.1f} s")
    print("  labels: " + "  ".join(f"{int(r['label'])}:{r['count']}" for r in counts))
    return data


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except SparkMnistError as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        if _on_databricks():
            # A wheel task may ignore the entry point's return value: fail the task run explicitly.
            raise SystemExit(EXIT_BAD_INPUT) from None
        return EXIT_BAD_INPUT
    return 0


def _on_databricks() -> bool:
    from sparkml_mnist import databricks

    return databricks.is_databricks()


if __name__ == "__main__":
    sys.exit(main())
