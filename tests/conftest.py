"""One local[2] SparkSession for the whole test session, made the way the entry points make it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sparkml_mnist.data.paths import DATA_DIR_ENV

# Two slots, as CI's two cores: barrier stages of two tasks fit, three do not.
TEST_MASTER = "local[2]"
TEST_CONF = {
    "spark.ui.enabled": "false",
    "spark.sql.shuffle.partitions": "4",
    "spark.driver.memory": "2g",
}


# tests/horovod_env runs only inside the Horovod environment (TF 2.15 + Horovod), started by
# tests/test_horovod.py with that environment's python and this variable set.
HOROVOD_SUITE_ENV = "SPARKML_MNIST_HOROVOD_SUITE"
HOROVOD_SUITE_DIR = "horovod_env"
collect_ignore = [] if os.environ.get(HOROVOD_SUITE_ENV) == "1" else [HOROVOD_SUITE_DIR]


# Functions defined in test modules run in Spark's Python workers, which import them by module
# name: the workers (started from the JVM that this process launches) need this folder on their path.
_TESTS_DIR = str(Path(__file__).resolve().parent)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_TESTS_DIR, os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(scope="session")
def spark():
    from sparkml_mnist.cli.session import create_spark

    session = create_spark("sparkml-mnist-tests", master=TEST_MASTER, conf=TEST_CONF)
    yield session
    session.stop()


@pytest.fixture(scope="session")
def full_data_dir() -> Path:
    """The full MNIST files (../shared/data/mnist-digits), when SPARKML_MNIST_DATA names them."""
    value = os.environ.get(DATA_DIR_ENV)
    if not value:
        pytest.skip(f"{DATA_DIR_ENV} is not set: the full-MNIST checks need it (.ci/run sets it)")
    path = Path(value)
    if not path.is_dir():
        pytest.fail(f"{DATA_DIR_ENV}={value} is not a folder")
    return path
