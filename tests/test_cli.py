"""The command line: the data preview works on the sample; bad input exits 2 with one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sparkml_mnist.cli import EXIT_BAD_INPUT, main


def test_data_preview_on_the_bundled_sample(spark, capsys):
    assert main(["data", "--np", "2"]) == 0
    out = capsys.readouterr().out
    assert "6,000 valid rows" in out and "1,000 valid rows" in out
    assert "2,700 training + 300 validation rows per worker" in out


def test_data_preview_reports_a_bad_line_in_one_line(spark, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("5 1:3\n5 2:300\n")
    assert main(["data", "--train", str(bad)]) == EXIT_BAD_INPUT
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
    assert main(argv) == EXIT_BAD_INPUT
    assert words in capsys.readouterr().err


def test_too_many_shards_for_the_data(spark, tmp_path, capsys):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("5 1:3\n4 2:3\n")
    assert main(["data", "--train", str(tiny), "--test", str(tiny), "--np", "2"]) == EXIT_BAD_INPUT
    assert "cannot fill 2 shards" in capsys.readouterr().err


def test_missing_file_from_a_fresh_process_is_one_line_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sparkml_mnist.cli", "data", "--data", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == EXIT_BAD_INPUT
    lines = [line for line in result.stderr.splitlines() if line.startswith("sparkml-mnist")]
    assert lines == [f"sparkml-mnist: error: {tmp_path / 'nowhere' / 'mnist-digits-train.txt'}: no such file or directory. Check the data path (--data, --train, --test)"]
    assert "Traceback" not in result.stderr


def test_unknown_option_is_argparse_usage_error(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["data", "--bogus"])
    assert caught.value.code == 2


def test_on_databricks_an_error_fails_the_task_run(monkeypatch, capsys):
    # A Databricks wheel task may ignore main()'s return value: the error must raise SystemExit(2).
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "17.3")
    with pytest.raises(SystemExit) as caught:
        main(["train", "--np", "0"])
    assert caught.value.code == EXIT_BAD_INPUT
    assert "field 'np' is 0" in capsys.readouterr().err


def test_on_databricks_output_must_be_reachable_through_fuse(monkeypatch, capsys):
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "17.3")
    with pytest.raises(SystemExit):
        main(["train", "--output", "s3://bucket/reports"])
    assert "--output" in capsys.readouterr().err
