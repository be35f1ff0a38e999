"""YAML configuration -> typed, validated objects; every error names the file and the field."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from sparkml_mnist.errors import ConfigError

DEFAULT_CONF_PACKAGE = "sparkml_mnist.conf"
DATA_CONF_FILE = "data.yaml"


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read one YAML mapping; a missing file or a syntax error names the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read configuration file ({error.strerror})") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    """Parse YAML text that must hold a mapping at the top level."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{source}, line {mark.line + 1}" if mark is not None else source
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"{where}: invalid YAML ({problem})") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: expected a mapping of settings at the top level")
    return document


def require_field(settings: Mapping[str, Any], name: str, kind: type, source: str) -> Any:
    """Fetch a required field and check its type (bool is not accepted as a number)."""
    if name not in settings:
        raise ConfigError(f"{source}: missing required field '{name}'")
    value = settings[name]
    accepted = (int, float) if kind is float else kind
    wrong_bool = isinstance(value, bool) and kind is not bool
    if wrong_bool or not isinstance(value, accepted):
        raise ConfigError(
            f"{source}: field '{name}' must be {kind.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def require_positive_int(settings: Mapping[str, Any], name: str, source: str) -> int:
    value = require_field(settings, name, int, source)
    if value <= 0:
        raise ConfigError(f"{source}: field '{name}' must be a positive integer, got {value}")
    return value


@dataclass(frozen=True)
class DataSpec:
    """The layout of the input files and of the tensors made from them."""

    num_features: int
    image_shape: tuple[int, int, int]
    num_classes: int
    max_pixel_value: int
    train_file: str
    test_file: str

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any], source: str) -> "DataSpec":
        known = {"num_features", "image_shape", "num_classes", "max_pixel_value", "train_file", "test_file"}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}; expected {sorted(known)}")
        num_features = require_positive_int(settings, "num_features", source)
        shape = require_field(settings, "image_shape", list, source)
        if len(shape) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise ConfigError(f"{source}: field 'image_shape' must be three positive integers, got {shape!r}")
        if math.prod(shape) != num_features:
            raise ConfigError(
                f"{source}: field 'image_shape' {shape} holds {math.prod(shape)} values but "
                f"'num_features' is {num_features}; they must agree"
            )
        return cls(
            num_features=num_features,
            image_shape=(shape[0], shape[1], shape[2]),
            num_classes=require_positive_int(settings, "num_classes", source),
            max_pixel_value=require_positive_int(settings, "max_pixel_value", source),
            train_file=require_field(settings, "train_file", str, source),
            test_file=require_field(settings, "test_file", str, source),
        )


def default_conf_file(name: str) -> Path:
    """A file of the configuration shipped with the package (the repository's ``conf/``)."""
    return Path(str(resources.files(DEFAULT_CONF_PACKAGE).joinpath(name)))


@lru_cache(maxsize=None)
def load_data_spec(path: str | None = None) -> DataSpec:
    """The data layout from ``conf/data.yaml`` (or ``path``), read once per process."""
    source = Path(path) if path is not None else default_conf_file(DATA_CONF_FILE)
    return DataSpec.from_mapping(load_yaml(source), str(source))
