"""``conf/data.yaml``: the layout of the input files and of the tensors made from them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from sparkml_mnist.config.files import default_conf_file
from sparkml_mnist.config.loader import Invalid, load_file, positive, rule

DATA_CONF_FILE = "data.yaml"


def _dimensions(shape: tuple[int, int, int]) -> str | None:
    return None if all(d > 0 for d in shape) else f"must be three positive integers, got {list(shape)}"


@dataclass(frozen=True)
class DataSpec:
    num_features: int = field(metadata=rule(positive))
    image_shape: tuple[int, int, int] = field(metadata=rule(_dimensions))
    num_classes: int = field(metadata=rule(positive))
    max_pixel_value: int = field(metadata=rule(positive))
    train_file: str
    test_file: str
    databricks_data_dir: str

    def validate(self) -> None:
        if math.prod(self.image_shape) != self.num_features:
            raise Invalid(
                "image_shape",
                f"{list(self.image_shape)} holds {math.prod(self.image_shape)} values but 'num_features' is "
                f"{self.num_features}; they must agree",
            )


@lru_cache(maxsize=None)
def load_data_spec(path: str | None = None) -> DataSpec:
    """The data layout from ``conf/data.yaml`` (or ``path``), read once per process."""
    return load_file(DataSpec, Path(path) if path is not None else default_conf_file(DATA_CONF_FILE))
