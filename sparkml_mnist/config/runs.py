"""``conf/runs/*.yaml``: one job's variants, data, worker count and output; command-line flags override fields."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from sparkml_mnist.config.files import named_or_path
from sparkml_mnist.config.loader import Invalid, from_mapping, load_file, positive, rule
from sparkml_mnist.config.variants import VariantConfig, available_variants, load_variant
from sparkml_mnist.errors import ConfigError

RUNS_FOLDER = "runs"
DEFAULT_RUN = "sample"
ALL_VARIANTS = "all"
SAMPLE_DATA = "sample"
OVERRIDDEN = " (with command-line overrides)"


def variant_names(value: Any) -> tuple[str, ...]:
    """``all``, a comma list or a list of names/paths -> the names, each once."""
    if value == ALL_VARIANTS or value == [ALL_VARIANTS]:
        return tuple(available_variants())
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError("must be 'all' or a list of variant names")
    if len(set(value)) != len(value):
        raise ValueError(f"names a variant twice: {list(value)}")
    return tuple(value)


# A registered model's name: one part for a workspace/OSS registry, or Unity Catalog's catalog.schema.model.
MODEL_NAME_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
MODEL_NAME_PARTS = (1, 3)
MAX_MODEL_NAME_CHARS = 200  # leaves room for the "_<variant>" suffix under the registries' 255


def model_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a registered model's name (None: it can): caught before Spark starts."""
    parts = name.split(".")
    if (len(parts) in MODEL_NAME_PARTS and all(MODEL_NAME_PART.match(part) for part in parts)
            and len(name) <= MAX_MODEL_NAME_CHARS):
        return None
    return (f"(--register-model) {name!r} is not a model name: use letters, digits, '_' and '-' (up to "
            f"{MAX_MODEL_NAME_CHARS} characters), or catalog.schema.model for Unity Catalog")


def _not_negative(value: int) -> str | None:
    return None if value >= 0 else f"must be 0 or more, got {value}"


@dataclass(frozen=True)
class RunConfig:
    """One job. ``np`` stays the number the user wrote: the job parses it once into a placement."""

    name: str
    np: int
    output: str
    seed: int
    backend: str  # checked against the launcher's backends where np is parsed (sparkml_mnist.job.plan)
    progress_timeout_s: float = field(metadata=rule(positive))
    variants: tuple[str, ...] = field(default=(ALL_VARIANTS,), metadata=rule(convert=variant_names))
    data: str | None = None  # "sample", a folder, or None for the environment's default
    train: str | None = None  # explicit files win over ``data``
    test: str | None = None
    epochs: int | None = field(default=None, metadata=rule(positive))  # None keeps each variant's own
    # At most this many steps in each epoch, and in each epoch's validation (a fixed cost whatever the
    # data's size: smoke runs, benchmarks/scale.py); each epoch then sees a shuffled subset. None: whole epochs.
    max_steps_per_epoch: int | None = field(default=None, metadata=rule(positive))
    max_retries: int = field(default=2, metadata=rule(_not_negative))  # attempts after a failed one
    deterministic: bool = False  # bit-identical weights for the same seed on the same machine (slower)
    allreduce: Literal["float32", "float16"] = "float32"  # the gradients' precision on the wire
    # Where rank 0 writes each epoch's checkpoint: a path every executor and the driver reach (/dbfs/...,
    # /Volumes/...) or a file:, hdfs:, s3a: URI. None: checkpoints travel to the driver's run state.
    checkpoint_dir: str | None = None
    # Register each variant's logged model as "<register_model>_<variant>" in the MLflow model registry
    # (turns MLflow tracking on); "catalog.schema.model" names a Unity Catalog model. None: nothing registered.
    register_model: str | None = field(default=None, metadata=rule(model_name_problem))
    source: str = ""

    def validate(self) -> None:
        if bool(self.train) != bool(self.test):
            raise Invalid("", "give both 'train' and 'test' files, or neither (then 'data')")

    def with_overrides(self, **overrides: Any) -> RunConfig:
        """Command-line values (None = not given) replace the file's; the result goes through the loader again."""
        given = {key: value for key, value in overrides.items() if value is not None}
        if not given:
            return self
        if "train" in given or "test" in given:
            given.setdefault("data", None)
        if "data" in given and "train" not in given:
            given.update(train=None, test=None)
        settings = {**asdict(self), **given}
        settings.pop("source")
        source = self.source if self.source.endswith(OVERRIDDEN) else self.source + OVERRIDDEN
        return from_mapping(RunConfig, settings, source)

    def load_variants(self) -> tuple[VariantConfig, ...]:
        """Every variant of the run, with the run's epochs; names must differ (they name report files)."""
        variants = tuple(load_variant(name).with_epochs(self.epochs) for name in self.variants)
        names = [variant.name for variant in variants]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ConfigError(
                f"{self.source}: field 'variants' gives two variants named {', '.join(twice)}; "
                "each variant's 'name' must be unique (it names the report's files)"
            )
        return variants


def load_run(name_or_path: str = DEFAULT_RUN) -> RunConfig:
    """A shipped run config by name (``sample``, ``lab``) or any run YAML file by path."""
    return load_file(RunConfig, named_or_path(name_or_path, RUNS_FOLDER, "run config"))
