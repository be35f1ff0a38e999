"""Databricks runtime detection and the defaults that follow it, with the environment faked."""

from __future__ import annotations

import pytest

from sparkml_mnist.config import platform as databricks
from sparkml_mnist.config import load_data_spec
from sparkml_mnist.config.platform import DATABRICKS_RUNTIME_ENV
from sparkml_mnist.errors import ConfigError

RUNTIME = "17.3"
ON_DATABRICKS = {DATABRICKS_RUNTIME_ENV: RUNTIME}
VOLUME_ROOT = "/Volumes/main/ml/reports/sparkml-mnist"


@pytest.fixture
def off_databricks(monkeypatch):
    monkeypatch.delenv(DATABRICKS_RUNTIME_ENV, raising=False)
    monkeypatch.delenv(databricks.DATABRICKS_OUTPUT_ENV, raising=False)


@pytest.fixture
def on_databricks(monkeypatch):
    monkeypatch.setenv(DATABRICKS_RUNTIME_ENV, RUNTIME)
    monkeypatch.delenv(databricks.DATABRICKS_OUTPUT_ENV, raising=False)


def test_detection_reads_the_process_environment(on_databricks):
    assert databricks.is_databricks()
    assert databricks.runtime_version() == RUNTIME


def test_not_databricks_without_the_variable(off_databricks):
    assert not databricks.is_databricks()
    assert databricks.runtime_version() is None
    assert databricks.default_data_dir() is None
    assert databricks.default_output_dir("lab") is None


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_runtime_variable_is_not_databricks(value):
    assert not databricks.is_databricks({DATABRICKS_RUNTIME_ENV: value})


def test_an_explicit_environment_wins_over_the_process_one(on_databricks):
    assert not databricks.is_databricks({})
    assert databricks.runtime_version({DATABRICKS_RUNTIME_ENV: " 15.4 "}) == "15.4"


def test_databricks_data_default_is_the_runtime_copy(on_databricks):
    assert databricks.default_data_dir() == load_data_spec().databricks_data_dir
    assert databricks.default_data_dir().startswith("dbfs:/databricks-datasets/mnist-digits/")


def test_databricks_output_default_comes_from_conf(on_databricks):
    root = databricks.load_platform_settings().databricks_output_root
    assert root.startswith(databricks.DBFS_FUSE_ROOT + "/")
    assert databricks.default_output_dir("lab") == f"{root}/lab"


def test_output_root_from_the_environment(on_databricks, monkeypatch):
    monkeypatch.setenv(databricks.DATABRICKS_OUTPUT_ENV, VOLUME_ROOT)
    assert databricks.default_output_dir("sample") == f"{VOLUME_ROOT}/sample"


def test_output_root_given_as_dbfs_uri_becomes_its_fuse_path():
    environ = {**ON_DATABRICKS, databricks.DATABRICKS_OUTPUT_ENV: "dbfs:/tmp/reports"}
    assert databricks.default_output_dir("lab", environ) == "/dbfs/tmp/reports/lab"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("dbfs:/tmp/x", "/dbfs/tmp/x"),
        ("dbfs:///tmp/x", "/dbfs/tmp/x"),
        ("dbfs:/", "/dbfs"),
        (VOLUME_ROOT, VOLUME_ROOT),
        ("/dbfs/tmp/x", "/dbfs/tmp/x"),
    ],
)
def test_fuse_path(path, expected):
    assert databricks.fuse_path(path) == expected


@pytest.mark.parametrize(("path", "says"), [("s3://bucket/reports", "s3://"), ("reports/run-1", "absolute")])
def test_paths_the_report_writer_cannot_use_are_refused(path, says):
    with pytest.raises(ConfigError, match=says):
        databricks.fuse_path(path)


def test_a_bad_output_root_in_the_environment_names_the_variable():
    environ = {**ON_DATABRICKS, databricks.DATABRICKS_OUTPUT_ENV: "abfss://c@a.dfs.core.windows.net/r"}
    with pytest.raises(ConfigError, match=databricks.DATABRICKS_OUTPUT_ENV):
        databricks.default_output_dir("lab", environ)


@pytest.mark.parametrize("name", ["", "a/b", ".."])
def test_a_run_name_that_is_not_a_folder_name_is_refused(name):
    with pytest.raises(ConfigError, match="--output"):
        databricks.default_output_dir(name, ON_DATABRICKS)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("databricks_output_root: /dbfs/x\nextra: 1\n", "unknown field"),
        ("databricks_output_root: output\n", "databricks_output_root"),
        ("databricks_output_root: 3\n", "must be str"),
        ("{}\n", "missing required field"),
    ],
)
def test_platform_conf_errors_name_the_file_and_field(tmp_path, text, says):
    conf = tmp_path / "databricks.yaml"
    conf.write_text(text)
    with pytest.raises(ConfigError, match=says) as error:
        databricks.load_platform_settings(str(conf))
    assert str(conf) in str(error.value)


def test_platform_conf_accepts_a_dbfs_uri(tmp_path):
    conf = tmp_path / "databricks.yaml"
    conf.write_text("databricks_output_root: dbfs:/r\n"
                    "local_jvm: {java_options: '', class_archive: false, keep_unused_archive_days: 1}\n")
    settings = databricks.load_platform_settings(str(conf))
    assert databricks.default_output_dir("lab", ON_DATABRICKS, settings) == "/dbfs/r/lab"
