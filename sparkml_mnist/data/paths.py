"""Where the input files are: the bundled sample, a data folder, or the environment's default."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from sparkml_mnist.config import platform as databricks
from sparkml_mnist.config import DataSpec, load_data_spec, package_folder
from sparkml_mnist.errors import ConfigError

DATA_DIR_ENV = "SPARKML_MNIST_DATA"
SAMPLE_PACKAGE = "sparkml_mnist.data"
SAMPLE_FOLDER = "sample"
SAMPLE_FILES = {"train": "mnist-digits-train-sample.txt.bz2", "test": "mnist-digits-test-sample.txt.bz2"}
COMPRESSED_SUFFIX = ".bz2"


@dataclass(frozen=True)
class DatasetPaths:
    train: str
    test: str


def sample_dir() -> Path:
    return package_folder(SAMPLE_PACKAGE, SAMPLE_FOLDER)  # a real folder, also from a zipped wheel


def sample_paths() -> DatasetPaths:
    """The bundled slice of real MNIST (first 6,000 train and 1,000 test rows): the default input."""
    folder = sample_dir()
    return DatasetPaths(train=str(folder / SAMPLE_FILES["train"]), test=str(folder / SAMPLE_FILES["test"]))


def dataset_paths(data_dir: str, spec: DataSpec | None = None) -> DatasetPaths:
    """Train and test files inside a folder in the Databricks layout.

    A local folder may hold the ``.txt`` files or their ``.bz2`` (Spark reads both); for a remote
    URI (``dbfs:/``, ``s3a://``, ...) the Databricks names are used as they are.
    """
    spec = spec or load_data_spec()
    return DatasetPaths(train=_pick(data_dir, spec.train_file), test=_pick(data_dir, spec.test_file))


def _pick(data_dir: str, name: str) -> str:
    scheme = urlparse(data_dir).scheme
    if scheme not in ("", "file"):
        return f"{data_dir.rstrip('/')}/{name}"
    folder = Path(data_dir[len("file:") :] if scheme == "file" else data_dir)
    plain, compressed = folder / name, folder / (name + COMPRESSED_SUFFIX)
    if not plain.exists() and compressed.exists():
        return str(compressed)
    return str(plain)  # a missing file is reported by the reader, naming this path


def resolve_inputs(
    data: str | None, train: str | None = None, test: str | None = None, spec: DataSpec | None = None
) -> DatasetPaths:
    """Explicit files, else a folder ("sample" = the bundled sample), else the environment's default:
    ``SPARKML_MNIST_DATA``, or on Databricks the runtime's copy of the dataset (``sparkml_mnist.config.platform``)."""
    spec = spec or load_data_spec()
    if train and test:
        return DatasetPaths(train=train, test=test)
    if data == SAMPLE_FOLDER:
        return sample_paths()
    if data:
        return dataset_paths(data, spec)
    folder = data_dir_from_env() or databricks.default_data_dir()
    if folder is None:
        raise ConfigError(
            f"no input data: give --data DIR (or 'sample'), --train/--test PATH, or set {DATA_DIR_ENV}"
        )
    return dataset_paths(folder, spec)


def data_dir_from_env() -> str | None:
    """The folder of the full MNIST files, when ``SPARKML_MNIST_DATA`` points at one."""
    value = os.environ.get(DATA_DIR_ENV, "").strip()
    return value or None
