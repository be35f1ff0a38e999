"""``sparkml-mnist``: thin command line over the library; an error is one line, no traceback, and an exit
code that tells a scheduler whether retrying can help (see ``EXIT_*`` and README's exit-code table)."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from sparkml_mnist import __version__
from sparkml_mnist.config import DEFAULT_RUN, RunConfig
from sparkml_mnist.launcher.backends import BACKEND_NAMES
from sparkml_mnist.launcher.failures import PreflightError
from sparkml_mnist.data.paths import DatasetPaths
from sparkml_mnist.errors import ConfigError, SparkMnistError
from sparkml_mnist.redact import redact
from sparkml_mnist.job.versions import VersionError

if TYPE_CHECKING:  # Spark is imported only by the commands that need it
    from pyspark.sql import SparkSession

    from sparkml_mnist.data.libsvm import LibsvmData

PROGRAM = "sparkml-mnist"
EXIT_OK = 0
# The run started and failed: bad data found while reading, a rank failed or stalled, a download or the
# report write failed (Python's own code for an unexpected exception, too). Retrying may help.
EXIT_RUN_FAILED = 1
# Nothing ran: the command line, a config file or what it asks of this environment or cluster is wrong
# (argparse exits with 2 as well). The same command fails the same way until something is changed.
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as shells report it
# Handled like Ctrl-C (ranks stopped, the state kept for --resume): a scheduler's stop, a closed terminal or
# SSH session. SIGHUP is left alone where it was ignored when the process started (nohup).
INTERRUPT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
# Errors that are found before any work and that only a change to the command, config or cluster fixes.
USAGE_ERRORS = (ConfigError, VersionError, PreflightError)


def optional_int(text: str) -> int | None:
    """An integer, or an empty value for "not given": a job scheduler's parameter cannot be left out."""
    if not text.strip():
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer (or an empty value for the default), got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description="Train the Keras MNIST lab's ConvNets on Spark.")
    parser.add_argument("--version", action="version", version=f"{PROGRAM} {__version__}")
    _add_loudness(parser, default=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser(
        "data",
        help="read, validate and shard the input; print what each worker would get",
        description="Preview the data stage: LIBSVM on Spark -> validated rows -> equal shards.",
    )
    _add_loudness(data, argparse.SUPPRESS)
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
    _add_loudness(train, argparse.SUPPRESS)
    train.add_argument(
        "--run-config", dest="run_config", metavar="FILE",
        help="run config: a name in conf/runs or a YAML path (default: sample)",
    )
    train.add_argument("--variant", action="append", metavar="NAME", help="variant(s): a name, a comma list, a YAML path, or 'all'; repeatable")
    train.add_argument("--np", type=optional_int, help="workers: > 0 barrier tasks on executors, < 0 processes on the driver")
    train.add_argument("--epochs", type=optional_int, help="epochs for every variant (default: the run config's, else each variant's)")
    train.add_argument("--max-steps-per-epoch", type=optional_int, metavar="N",
                       help="at most N steps in each epoch and in its validation (default: whole epochs)")
    _add_data_arguments(train)
    train.add_argument("--output", metavar="DIR", help="report folder, a local path of the driver (refused if not empty, unless --overwrite)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace an earlier report of this tool in --output (a folder holding anything else is refused)")
    train.add_argument("--seed", type=optional_int, help="random seed (same on every rank)")
    train.add_argument(
        "--backend", choices=BACKEND_NAMES,
        help="tf: MultiWorkerMirroredStrategy (default); horovod: Horovod over Gloo (its own TF 2.15 environment); "
        "jax: Keras 3 on JAX (the jax extra)",
    )
    train.add_argument("--progress-timeout", type=float, metavar="SECONDS", help="end the run if a rank makes no progress this long")
    train.add_argument("--max-retries", type=int, metavar="N", help="attempts after a failed one, each resuming from the last epoch (default 2)")
    train.add_argument("--deterministic", action="store_true", default=None, help="bit-identical weights for the same seed on the same machine (slower)")
    train.add_argument("--allreduce", choices=("float32", "float16"),
                       help="the gradients' precision on the wire: float16 sends half the bytes a step (default float32)")
    train.add_argument("--checkpoint-dir", metavar="URI",
                       help="where rank 0 writes each epoch's checkpoint: a folder the driver and every executor "
                       "reach (/dbfs/..., /Volumes/..., file:, hdfs:, s3a:); default: they travel to the driver")
    train.add_argument("--resume", metavar="OUTPUT", help="continue the unfinished run into OUTPUT with its own settings: finished variants are kept, the one in flight resumes from its last epoch")
    train.add_argument("--master", help="Spark master, or sc://HOST:PORT for Spark Connect (default: spark-submit's or SPARK_REMOTE, else local[*])")
    train.add_argument("--mlflow", action="store_true", default=None,
                       help="log the run to MLflow (also on when MLFLOW_TRACKING_URI is set; needs the mlflow extra)")
    train.add_argument("--mlflow-experiment", metavar="NAME", help="MLflow experiment (default: sparkml-mnist)")
    train.add_argument("--register-model", metavar="NAME",
                       help="register each variant's model as NAME_<variant> in MLflow's model registry (turns "
                            "--mlflow on; catalog.schema.model for Unity Catalog)")
    train.set_defaults(handler=_run_training)
    _add_download_command(commands)
    _add_predict_command(commands)
    return parser


def _add_loudness(parser: argparse.ArgumentParser, default: Any) -> None:
    """-v/-q, before or after the command (``sparkml-mnist -q train`` and ``sparkml-mnist train -q``)."""
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="store_true", default=default,
                          help="more detail: debug lines, times, TensorFlow's native notices, Spark's warnings")
    loudness.add_argument("-q", "--quiet", action="store_true", default=default,
                          help="only the result table and errors")


def _add_download_command(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    download = commands.add_parser(
        "download-data",
        help="fetch canonical MNIST, verify its checksums, write the LIBSVM .bz2 files to DIR",
        description="Download the four MNIST IDX files (conf/download.yaml), check them, convert them to "
        "mnist-digits-{train,test}.txt.bz2 in DIR; does nothing when DIR already holds them.",
    )
    _add_loudness(download, argparse.SUPPRESS)
    download.add_argument("dir", metavar="DIR", help="folder for the LIBSVM files (created if missing)")
    download.add_argument("--mirror", metavar="URL", help="mirror folder URL (default: conf/download.yaml's)")
    download.add_argument("--force", action="store_true", help="download and convert again even if DIR is complete")
    download.set_defaults(handler=_run_download)


def _run_download(args: argparse.Namespace) -> None:
    from sparkml_mnist.data.download import download_mnist

    paths = download_mnist(args.dir, mirror_url=args.mirror, force=args.force, say=print)
    print(f"ready: --data {args.dir}  (train: {paths.train}, test: {paths.test})")


def _add_predict_command(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    predict = commands.add_parser(
        "predict",
        help="score images with a trained model on Spark's executors; write the predictions",
        description="Predict with a run's best model (or --variant), a .keras file or an MLflow model, on the "
        "executors; write the input's columns (but the pixels) with prediction and probability to --output.",
    )
    _add_loudness(predict, argparse.SUPPRESS)
    predict.add_argument("--model", required=True, metavar="M",
                         help="a run's output folder, a .keras file, or an MLflow model (runs:/..., models:/..., "
                         "a local MLflow model folder)")
    predict.add_argument("--variant", metavar="NAME", help="which of the run's models (default: the best by test accuracy)")
    predict.add_argument("--data", required=True, metavar="PATH",
                         help="a LIBSVM file (read and checked as training reads it; 'sample': the bundled test "
                         "sample), or Parquet/Delta with a column of raw pixels")
    predict.add_argument("--data-format", metavar="FORMAT",
                         help="libsvm, parquet or delta (default: from the path: .parquet or a folder of Parquet "
                         "files is Parquet, a folder with _delta_log Delta, else LIBSVM)")
    predict.add_argument("--column", metavar="NAME",
                         help="the raw pixels: binary, 784 bytes a row, or an array of 784 values 0..255 "
                         "(default: 'pixels', else the input's only such column)")
    predict.add_argument("--output", required=True, metavar="PATH",
                         help="where the predictions go, any Hadoop path (refused if it exists, unless --overwrite)")
    predict.add_argument("--overwrite", action="store_true", help="replace an earlier output of predictions")
    predict.add_argument("--format", dest="output_format", default="parquet", metavar="FORMAT",
                         help="parquet (default), or delta where the session has Delta Lake")
    predict.add_argument("--master", help="Spark master, or sc://HOST:PORT for Spark Connect (default: spark-submit's or SPARK_REMOTE, else local[*])")
    predict.set_defaults(handler=_run_predict)


def _run_predict(args: argparse.Namespace) -> None:
    from sparkml_mnist.cli.session import create_spark
    from sparkml_mnist.job.model_source import resolve_model
    from sparkml_mnist.job.predict import check_output, predict_to_path

    check_output(args.output, args.overwrite, args.data)  # before the model is loaded or Spark starts
    model = resolve_model(args.model, args.variant)  # loaded and checked on the driver, before Spark starts
    spark = create_spark(f"{PROGRAM} predict", master=args.master, verbose=args.verbose, write_class_archive=True)
    summary = predict_to_path(spark, model, args.data, args.output, overwrite=args.overwrite, column=args.column,
                              data_format=args.data_format, output_format=args.output_format)
    print(summary.line())


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("input (default: the bundled sample)")
    source.add_argument("--data", metavar="DIR", help="folder with mnist-digits-{train,test}.txt[.bz2]")
    source.add_argument("--train", metavar="PATH", help="training file (any Hadoop path)")
    source.add_argument("--test", metavar="PATH", help="test file (any Hadoop path)")


RUN_SETTINGS = ("run_config", "variant", "np", "epochs", "max_steps_per_epoch", "data", "train", "test", "output",
                "seed", "backend", "progress_timeout", "max_retries", "deterministic", "allreduce", "checkpoint_dir",
                "overwrite", "register_model")


def _run_training(args: argparse.Namespace) -> None:
    from sparkml_mnist.job.plan import plan_job
    from sparkml_mnist.cli.session import create_spark

    if args.resume:
        given = [f"--{name.replace('_', '-')}" for name in RUN_SETTINGS if getattr(args, name) not in (None, False)]
        if given:
            raise ConfigError(
                f"--resume continues a run with the settings it was started with; drop {', '.join(given)}"
            )
        from sparkml_mnist.job.state import stored_overwrite, stored_run

        output = Path(args.resume)
        plan = plan_job(stored_run(output), overwrite=stored_overwrite(output), resume=True)
    else:
        plan = plan_job(_run_config(args), overwrite=args.overwrite)  # every setting checked, before Spark starts
    tracking = _tracking(args, plan.run.register_model)  # MLflow asked for but missing: a usage error, before Spark
    job_modules = _import_aside(JOB_MODULE)
    spark = create_spark(f"{PROGRAM} train", master=args.master, verbose=args.verbose, write_class_archive=True)
    job_modules.join()
    from sparkml_mnist.job.run import run_job

    folder = run_job(spark, plan, tracking=tracking)
    if args.quiet:  # the progress log (and its table) is off: the result still is the output
        print(_summary_table(folder))


JOB_MODULE = "sparkml_mnist.job.run"


def _import_aside(module: str) -> threading.Thread:
    """Import ``module`` in a thread while this one waits for the JVM to start (about 1 s of scikit-learn and
    matplotlib on the other core). A failure is left to the caller's own import, which raises it in full."""

    def load() -> None:
        try:
            importlib.import_module(module)
        except BaseException:  # noqa: BLE001 - raised again, with its traceback, by the caller's import
            pass

    thread = threading.Thread(target=load, name=f"import {module}", daemon=True)
    thread.start()
    return thread


def _tracking(args: argparse.Namespace, register_model: str | None = None) -> Any:
    from sparkml_mnist.job.tracking import Tracking, tracking_wanted

    if not tracking_wanted(args.mlflow or bool(register_model)) and not args.mlflow_experiment:
        return None
    return Tracking(experiment=args.mlflow_experiment)


def _summary_table(folder: Path) -> str:
    import json

    from sparkml_mnist.report import VariantResult, format_summary_table

    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    return format_summary_table([VariantResult.from_dict(entry) for entry in report["variants"]])


def _run_config(args: argparse.Namespace) -> RunConfig:
    from sparkml_mnist.config import platform as databricks
    from sparkml_mnist.config import load_run

    if args.data and (args.train or args.test):
        raise ConfigError("give either --data DIR or --train/--test PATH, not both")
    data = args.data
    if not (args.data or args.train or args.test):
        data = databricks.default_data_dir() or data  # on Databricks: the runtime's copy of MNIST
    run = load_run(args.run_config or DEFAULT_RUN)
    output = args.output
    if output is None:
        output = databricks.default_output_dir(run.name)  # None off Databricks: the run config's
    elif databricks.is_databricks():
        output = databricks.fuse_path(output, "--output")  # the report is written through /dbfs or /Volumes
    return run.with_overrides(
        variants=",".join(args.variant) if args.variant else None,
        np=args.np,
        epochs=args.epochs,
        max_steps_per_epoch=args.max_steps_per_epoch,
        data=data,
        train=args.train,
        test=args.test,
        output=output,
        seed=args.seed,
        progress_timeout_s=args.progress_timeout,
        backend=args.backend,
        max_retries=args.max_retries,
        deterministic=args.deterministic,
        allreduce=args.allreduce,
        checkpoint_dir=args.checkpoint_dir,
        register_model=args.register_model,
    )


def _input_paths(args: argparse.Namespace) -> DatasetPaths:
    from sparkml_mnist.data.paths import resolve_inputs, sample_paths

    if args.data and (args.train or args.test):
        raise ConfigError("give either --data DIR or --train/--test PATH, not both")
    if args.data:
        return resolve_inputs(args.data)  # a folder, or "sample"
    default = sample_paths()
    return DatasetPaths(train=args.train or default.train, test=args.test or default.test)


def _run_data_preview(args: argparse.Namespace) -> None:
    from sparkml_mnist.data.split import plan_shards
    from sparkml_mnist.cli.session import create_spark

    if args.np < 1:
        raise ConfigError(f"--np must be a positive number of shards, got {args.np}")
    paths = _input_paths(args)
    spark = create_spark(f"{PROGRAM} data", master=args.master, write_class_archive=True)
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
    print(f"{split}: {redact(path)}")
    print(f"  {data.num_rows:,} valid rows, read and checked in {seconds:.1f} s")
    print("  labels: " + "  ".join(f"{int(r['label'])}:{r['count']}" for r in counts))
    return data


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (a scheduler stopping the job) and SIGHUP (its terminal gone) are handled like Ctrl-C: ranks
    stopped, nothing half written, the run's state kept for --resume (not killed mid-write)."""
    raise KeyboardInterrupt(f"signal {signum}")


def _install_interrupt_handlers() -> dict[int, Any]:
    """``_interrupt`` for ``INTERRUPT_SIGNALS`` (in the main thread only); returns the handlers it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for number in INTERRUPT_SIGNALS:
        if number == signal.SIGHUP and signal.getsignal(number) == signal.SIG_IGN:
            continue  # started under nohup: hangups are meant to be ignored
        previous[number] = signal.signal(number, _interrupt)
    return previous


def exit_code(error: SparkMnistError) -> int:
    """``EXIT_USAGE`` for what only a change to the command, config or cluster fixes; else ``EXIT_RUN_FAILED``."""
    return EXIT_USAGE if isinstance(error, USAGE_ERRORS) else EXIT_RUN_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # a usage error exits here with EXIT_USAGE (argparse's 2)
    if getattr(args, "verbose", False) and getattr(args, "quiet", False):  # -q before the command, -v after
        parser.error("-v/--verbose: not allowed with -q/--quiet")
    from sparkml_mnist.cli import console

    verbosity = console.VERBOSE if args.verbose else console.QUIET if args.quiet else console.NORMAL
    with console.configured(verbosity):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    previous = _install_interrupt_handlers()
    try:
        args.handler(args)
    except SparkMnistError as error:
        print(f"{PROGRAM}: error: {redact(str(error))}", file=sys.stderr)
        return _finish(exit_code(error))
    except KeyboardInterrupt:
        output = getattr(args, "resume", None) or getattr(args, "output", None)
        hint = f"; `{PROGRAM} train --resume {output}` continues it" if output and args.command == "train" else ""
        print(f"{PROGRAM}: interrupted: the ranks were stopped, finished variants and checkpoints are kept{hint}",
              file=sys.stderr)
        return _finish(EXIT_INTERRUPTED)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return EXIT_OK


def _finish(code: int) -> int:
    if _on_databricks():
        # A wheel task may ignore the entry point's return value: fail the task run explicitly.
        raise SystemExit(code)
    return code


def _on_databricks() -> bool:
    from sparkml_mnist.config import platform as databricks

    return databricks.is_databricks()


if __name__ == "__main__":
    sys.exit(main())
