"""``conf/variants/*.yaml``: the lab's ConvNets as data. A fifth variant is one more YAML file."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Literal, Union

from sparkml_mnist.config.files import named_or_path, shipped_names
from sparkml_mnist.config.loader import Invalid, fraction_below_one, load_file, positive, rule

VARIANTS_FOLDER = "variants"
# A variant's name becomes part of file names in the report folder: keep it to characters safe everywhere.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

Activation = Literal["relu", "softmax", "sigmoid", "tanh", "linear", "elu", "selu", "gelu"]
Padding = Literal["valid", "same"]
Optimizer = Literal["adam", "sgd", "rmsprop", "adagrad", "adadelta", "adamax", "nadam"]
Loss = Literal["categorical_crossentropy"]


def _pair(value: tuple[int, int]) -> str | None:
    return None if all(v > 0 for v in value) else f"must be two positive integers, got {list(value)}"


def safe_name(name: str) -> str | None:
    """Why ``name`` cannot name files in the report folder (None: it can)."""
    if SAFE_NAME.match(name) and name not in (".", ".."):
        return None
    return f"is {name!r}: use letters, digits, '_', '.' and '-' only (it names files in the report folder)"


@dataclass(frozen=True)
class Conv2D:
    type: Literal["conv2d"]
    filters: int = field(metadata=rule(positive))
    kernel_size: tuple[int, int] = field(metadata=rule(_pair))
    padding: Padding = "valid"
    activation: Activation | None = None
    strides: tuple[int, int] = field(default=(1, 1), metadata=rule(_pair))


@dataclass(frozen=True)
class MaxPooling2D:
    type: Literal["max_pooling2d"]
    pool_size: tuple[int, int] = field(metadata=rule(_pair))
    strides: tuple[int, int] | None = field(default=None, metadata=rule(_pair))
    padding: Padding = "valid"


@dataclass(frozen=True)
class Dropout:
    type: Literal["dropout"]
    rate: float = field(metadata=rule(fraction_below_one))


@dataclass(frozen=True)
class Flatten:
    type: Literal["flatten"]


@dataclass(frozen=True)
class Dense:
    type: Literal["dense"]
    units: int = field(metadata=rule(positive))
    activation: Activation | None = None


Layer = Union[Conv2D, MaxPooling2D, Dropout, Flatten, Dense]


@dataclass(frozen=True)
class LabReference:
    """The lab's published figures for a variant, shown beside this run's."""

    parameters: int | None = None
    test_accuracy: float | None = field(default=None, metadata=rule(fraction_below_one))


@dataclass(frozen=True)
class VariantConfig:
    """One ConvNet of the lab: its layers, optimiser and training settings."""

    name: str = field(metadata=rule(safe_name))
    layers: tuple[Layer, ...]
    optimizer: Optimizer
    loss: Loss
    epochs: int = field(metadata=rule(positive))
    batch_size: int = field(metadata=rule(positive))  # the global batch, split evenly across replicas
    validation_split: float = field(metadata=rule(fraction_below_one))
    description: str = ""
    lab: LabReference = LabReference()
    jit_compile: bool = False  # XLA; off unless measured faster at no accuracy cost (benchmarks/RESULTS.md)
    source: str = ""

    def validate(self) -> None:
        if not self.layers:
            raise Invalid("layers", "must list at least one layer")

    def with_epochs(self, epochs: int | None) -> VariantConfig:
        """The variant with a run's epochs (None keeps its own); the run config checked the value."""
        return self if epochs is None else replace(self, epochs=epochs)


def available_variants() -> list[str]:
    """Names of the variants shipped in conf/variants, in name order."""
    return shipped_names(VARIANTS_FOLDER)


def load_variant(name_or_path: str) -> VariantConfig:
    """A shipped variant by name (``variant3``) or any variant YAML file by path."""
    return load_file(VariantConfig, named_or_path(name_or_path, VARIANTS_FOLDER, "variant"))
