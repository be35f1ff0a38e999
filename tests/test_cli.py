"""The command line: the data preview works on the sample; an error is one line and an exit code that says
whether anything ran (2: fix the command or config; 1: the run failed; 130: interrupted)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sparkml_mnist import __version__

from sparkml_mnist.cli import commands as cli
from sparkml_mnist.cli.commands import EXIT_INTERRUPTED, EXIT_RUN_FAILED, EXIT_USAGE, build_parser, main
from sparkml_mnist.data.idx import DownloadError
from sparkml_mnist.launcher.failures import PreflightError, RankStalledError
from sparkml_mnist.errors import ConfigError, DataError, SparkMnistError
from sparkml_mnist.report.results import ReportError
from sparkml_mnist.job.versions import VersionError


def test_data_preview_on_the_bundled_sample(spark, capsys):
    assert main(["data", "--np", "2"]) == 0
    out = capsys.readouterr().out
    assert "6,000 valid rows" in out and "1,000 valid rows" in out
    assert "2,700 training + 300 validation rows per worker" in out


def test_data_preview_reports_a_bad_line_in_one_line(spark, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("5 1:3\n5 2:300\n")
    assert main(["data", "--train", str(bad)]) == EXIT_RUN_FAILED  # found while reading
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparkml-mnist: error: ") and len(err.splitlines()) == 1
    assert f"{bad}, line 2: pixel value 300" in err


@pytest.mark.parametrize(
    "argv,words",
    [
        (["data", "--np", "0"], "--np must be a positive number"),
        (["data", "--data", "x", "--train", "y"], "either --data DIR or --train/--test"),
        (["data", "--validation-split", "1.5"], "validation_split must be in [0, 1)"),
    ],
)
def test_bad_arguments_exit_2(spark, capsys, argv, words):
    assert main(argv) == EXIT_USAGE
    assert words in capsys.readouterr().err


def test_too_many_shards_for_the_data(spark, tmp_path, capsys):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("5 1:3\n4 2:3\n")
    assert main(["data", "--train", str(tiny), "--test", str(tiny), "--np", "2"]) == EXIT_RUN_FAILED
    assert "cannot fill 2 shards" in capsys.readouterr().err


def test_missing_file_from_a_fresh_process_is_one_line_without_traceback(tmp_path):
    # Spark's reader finds it, at run time: a path without a scheme means fs.defaultFS (HDFS, DBFS on a
    # cluster), so it cannot be checked on the driver's disk before Spark starts.
    result = subprocess.run(
        [sys.executable, "-m", "sparkml_mnist.cli", "data", "--data", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == EXIT_RUN_FAILED
    lines = [line for line in result.stderr.splitlines() if line.startswith("sparkml-mnist")]
    assert lines == [f"sparkml-mnist: error: {tmp_path / 'nowhere' / 'mnist-digits-train.txt'}: no such file or directory. Check the data path (--data, --train, --test)"]
    assert "Traceback" not in result.stderr


def test_unknown_option_is_argparse_usage_error(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["data", "--bogus"])
    assert caught.value.code == 2


@pytest.mark.parametrize("argv", [["-q", "train", "-v"], ["-v", "train", "-q"]])
def test_quiet_and_verbose_together_is_a_usage_error(capsys, argv):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2 and "not allowed with -q/--quiet" in capsys.readouterr().err


def test_on_databricks_an_error_fails_the_task_run(monkeypatch, capsys):
    # A Databricks wheel task may ignore main()'s return value: the error must raise SystemExit(code).
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "17.3")
    with pytest.raises(SystemExit) as caught:
        main(["train", "--np", "0"])
    assert caught.value.code == EXIT_USAGE
    assert "field 'np' is 0" in capsys.readouterr().err
    _handler_raises(monkeypatch, RankStalledError([1], ["host-b"], "no heartbeat", 60.0))
    with pytest.raises(SystemExit) as caught:
        main(["download-data", "unused"])
    assert caught.value.code == EXIT_RUN_FAILED


def test_on_databricks_output_must_be_reachable_through_fuse(monkeypatch, capsys):
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "17.3")
    with pytest.raises(SystemExit):
        main(["train", "--output", "s3://bucket/reports"])
    assert "--output" in capsys.readouterr().err


def _handler_raises(monkeypatch, error: BaseException) -> None:
    def fail(args) -> None:
        raise error

    monkeypatch.setattr(cli, "_run_download", fail)


@pytest.mark.parametrize(
    "error,code",
    [
        (ConfigError("conf/runs/lab.yaml: field 'np' is 0"), EXIT_USAGE),
        (VersionError("tf_keras is missing"), EXIT_USAGE),
        (PreflightError("np=3 barrier tasks need 3 slots; the cluster has 2"), EXIT_USAGE),
        (DataError("train.txt", "pixel value 999 at index 12 is outside 0..255", 3), EXIT_RUN_FAILED),
        (RankStalledError([1], ["host-b"], "no heartbeat", 60.0), EXIT_RUN_FAILED),
        (ReportError("cannot write report.json"), EXIT_RUN_FAILED),
        (DownloadError("cannot reach http://mirror.invalid/"), EXIT_RUN_FAILED),
        (SparkMnistError("anything else of the family"), EXIT_RUN_FAILED),
    ],
)
def test_the_exit_code_says_whether_the_command_or_the_run_failed(monkeypatch, capsys, error, code):
    _handler_raises(monkeypatch, error)
    assert main(["download-data", "unused"]) == code
    assert capsys.readouterr().err == f"sparkml-mnist: error: {error}\n"


def test_an_interrupt_is_one_line_and_exit_130(monkeypatch, capsys):
    _handler_raises(monkeypatch, KeyboardInterrupt())
    assert main(["download-data", "unused"]) == EXIT_INTERRUPTED == 130
    err = capsys.readouterr().err
    assert err.startswith("sparkml-mnist: interrupted") and len(err.splitlines()) == 1


def test_an_unexpected_exception_is_not_hidden(monkeypatch):
    _handler_raises(monkeypatch, ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError):  # Python prints the traceback and exits 1 (EXIT_RUN_FAILED)
        main(["download-data", "unused"])


def test_version(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out == f"sparkml-mnist {__version__}\n"


def test_run_config_option(capsys):
    assert build_parser().parse_args(["train", "--run-config", "lab"]).run_config == "lab"
    assert capsys.readouterr().err == ""
    assert build_parser().parse_args(["train"]).run_config is None  # the sample; None lets --resume tell it apart


def test_an_empty_number_means_not_given_as_a_job_parameter_cannot_be_left_out(capsys):
    args = build_parser().parse_args(["train", "--np", "2", "--epochs", "", "--seed", " "])
    assert (args.np, args.epochs, args.seed) == (2, None, None)
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["train", "--epochs", "two"])
    assert caught.value.code == EXIT_USAGE
    assert "argument --epochs: expected an integer (or an empty value for the default), got 'two'" in capsys.readouterr().err


def test_an_output_uri_is_refused_before_spark_starts(monkeypatch, capsys):
    def no_spark(*args, **kwargs):
        raise AssertionError("Spark was started")

    monkeypatch.setattr("sparkml_mnist.cli.session.create_spark", no_spark)
    assert main(["train", "--variant", "variant1", "--output", "hdfs://namenode/reports/run-1"]) == EXIT_USAGE
    assert "local filesystem, which cannot write hdfs: URIs" in capsys.readouterr().err


def test_resume_with_a_run_config_is_a_usage_error_naming_the_new_option(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--run-config", "lab"]) == EXIT_USAGE
    assert "--resume continues a run with the settings it was started with; drop --run-config" in capsys.readouterr().err


def test_a_checkpoint_dir_that_cannot_be_written_is_one_line_before_spark_starts(monkeypatch, tmp_path, capsys):
    def no_spark(*args, **kwargs):
        raise AssertionError("Spark was started")

    monkeypatch.setattr("sparkml_mnist.cli.session.create_spark", no_spark)
    (tmp_path / "a-file").write_text("")
    bad = tmp_path / "a-file" / "checkpoints"
    assert main(["train", "--variant", "variant1", "--output", str(tmp_path / "out"),
                 "--checkpoint-dir", str(bad)]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"field 'checkpoint_dir' (--checkpoint-dir) '{bad}': cannot create the folder (" in err
    assert main(["train", "--resume", str(tmp_path / "out"), "--checkpoint-dir", str(tmp_path)]) == EXIT_USAGE
    assert "drop --checkpoint-dir" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["data"], ["train", "--variant", "variant1", "--output"]])
def test_the_cli_s_sessions_write_the_jvm_s_class_archive_when_there_is_none(monkeypatch, tmp_path, capsys, command):
    seen = {}

    def no_spark(*args, **kwargs):
        seen.update(kwargs)
        raise ConfigError("stop here")

    monkeypatch.setattr("sparkml_mnist.cli.session.create_spark", no_spark)
    argv = [*command, str(tmp_path / "out")] if command[-1] == "--output" else command
    assert main(argv) == EXIT_USAGE
    assert seen["write_class_archive"] is True  # library callers and the tests' session only map it
