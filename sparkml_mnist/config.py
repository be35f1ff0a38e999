"""YAML configuration -> typed, validated objects; every error names the file and the field."""

from __future__ import annotations

import atexit
import math
import shutil
import tempfile
from dataclasses import dataclass, replace
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
    databricks_data_dir: str

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any], source: str) -> "DataSpec":
        known = {
            "num_features", "image_shape", "num_classes", "max_pixel_value", "train_file", "test_file",
            "databricks_data_dir",
        }
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
            databricks_data_dir=require_field(settings, "databricks_data_dir", str, source),
        )


def default_conf_file(name: str) -> Path:
    """A file of the configuration shipped with the package (the repository's ``conf/``)."""
    return package_folder(DEFAULT_CONF_PACKAGE) / name


@lru_cache(maxsize=None)
def package_folder(package: str, *parts: str) -> Path:
    """A folder shipped inside a package, as a real directory.

    Installed, that is the folder itself. Imported from a zip (the wheel that ``spark-submit
    --py-files`` puts on ``sys.path``) it has no file-system path: it is copied once per
    process into a temporary folder, removed at exit.
    """
    source = resources.files(package)
    for part in parts:
        source = source.joinpath(part)
    path = Path(str(source))
    if path.is_dir():
        return path
    copy = Path(tempfile.mkdtemp(prefix="sparkml-mnist-" + "-".join((package, *parts)).replace(".", "-") + "-"))
    atexit.register(shutil.rmtree, copy, True)
    _copy_tree(source, copy)
    return copy


def _copy_tree(source: Any, target: Path) -> None:
    for item in source.iterdir():
        if item.is_dir():
            (target / item.name).mkdir()
            _copy_tree(item, target / item.name)
        else:
            (target / item.name).write_bytes(item.read_bytes())


@lru_cache(maxsize=None)
def load_data_spec(path: str | None = None) -> DataSpec:
    """The data layout from ``conf/data.yaml`` (or ``path``), read once per process."""
    source = Path(path) if path is not None else default_conf_file(DATA_CONF_FILE)
    return DataSpec.from_mapping(load_yaml(source), str(source))


# ---------------------------------------------------------------------------------------------
# Model variants (conf/variants/*.yaml): a fifth variant is one more YAML file.
# ---------------------------------------------------------------------------------------------

VARIANTS_FOLDER = "variants"
YAML_SUFFIX = ".yaml"

# Layer type -> (required fields with their types, optional fields with their types).
LAYER_FIELDS: dict[str, tuple[dict[str, type], dict[str, type]]] = {
    "conv2d": ({"filters": int, "kernel_size": list}, {"padding": str, "activation": str, "strides": list}),
    "max_pooling2d": ({"pool_size": list}, {"strides": list, "padding": str}),
    "dropout": ({"rate": float}, {}),
    "flatten": ({}, {}),
    "dense": ({"units": int}, {"activation": str}),
}
ACTIVATIONS = ("relu", "softmax", "sigmoid", "tanh", "linear", "elu", "selu", "gelu")
PADDINGS = ("valid", "same")
OPTIMIZERS = ("adam", "sgd", "rmsprop", "adagrad", "adadelta", "adamax", "nadam")
LOSSES = ("categorical_crossentropy",)


@dataclass(frozen=True)
class LayerSpec:
    type: str
    options: tuple[tuple[str, Any], ...]  # frozen (name, value) pairs, in the file's order

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)


@dataclass(frozen=True)
class VariantConfig:
    """One ConvNet of the lab: its layers, optimiser and training settings."""

    name: str
    description: str
    layers: tuple[LayerSpec, ...]
    optimizer: str
    loss: str
    epochs: int
    batch_size: int  # the global batch, split evenly across replicas
    validation_split: float
    lab_parameters: int | None
    lab_test_accuracy: float | None
    source: str
    jit_compile: bool = False  # XLA; off unless measured faster at no accuracy cost (benchmarks/RESULTS.md)

    def check_replicas(self, replicas: int) -> None:
        """The global batch must split evenly, or ranks would disagree on per-replica batches."""
        if self.batch_size % replicas:
            raise ConfigError(
                f"{self.source}: field 'batch_size' ({self.batch_size}) is not divisible by the "
                f"{replicas} replicas; choose a batch size that is a multiple of np"
            )

    def check_xla(self, replicas: int, on_gpus: bool, backend: str) -> None:
        """XLA with several ranks needs XLA collectives: TensorFlow has them on GPUs only (tf backend)."""
        if not self.jit_compile or replicas <= 1:
            return
        if backend != DEFAULT_BACKEND:
            reason = f"the {backend!r} backend's all-reduce cannot be compiled by XLA"
        elif not on_gpus:
            reason = "TensorFlow has no XLA collectives for CPU devices ('Collectives are not yet implemented')"
        else:
            return
        raise ConfigError(
            f"{self.source}: field 'jit_compile' is true, but {replicas} ranks cannot train with XLA here: {reason}; "
            "set jit_compile: false, or train with np=1"
        )

    def with_epochs(self, epochs: int | None) -> "VariantConfig":
        if epochs is None:
            return self
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0:
            raise ConfigError(f"--epochs must be a positive integer, got {epochs!r}")
        return replace(self, epochs=epochs)

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any], source: str) -> "VariantConfig":
        known = {
            "name", "description", "layers", "optimizer", "loss", "epochs", "batch_size", "validation_split", "lab",
            "jit_compile",
        }
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}; expected {sorted(known)}")
        layers = require_field(settings, "layers", list, source)
        if not layers:
            raise ConfigError(f"{source}: field 'layers' must list at least one layer")
        optimizer = require_field(settings, "optimizer", str, source)
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"{source}: field 'optimizer' is {optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        loss = require_field(settings, "loss", str, source)
        if loss not in LOSSES:
            raise ConfigError(f"{source}: field 'loss' is {loss!r}; expected one of {', '.join(LOSSES)}")
        validation_split = require_field(settings, "validation_split", float, source)
        if not 0 <= validation_split < 1:
            raise ConfigError(f"{source}: field 'validation_split' must be in [0, 1), got {validation_split}")
        lab = settings.get("lab") or {}
        if not isinstance(lab, dict):
            raise ConfigError(f"{source}: field 'lab' must be a mapping (parameters, test_accuracy)")
        return cls(
            name=require_field(settings, "name", str, source),
            description=str(settings.get("description", "")),
            layers=tuple(_layer(layer, index, source) for index, layer in enumerate(layers)),
            optimizer=optimizer,
            loss=loss,
            epochs=require_positive_int(settings, "epochs", source),
            batch_size=require_positive_int(settings, "batch_size", source),
            validation_split=float(validation_split),
            lab_parameters=_optional(lab, "parameters", int, f"{source}: lab"),
            lab_test_accuracy=_optional(lab, "test_accuracy", float, f"{source}: lab"),
            source=source,
            jit_compile=bool(_optional(settings, "jit_compile", bool, source) or False),
        )


def _optional(settings: Mapping[str, Any], name: str, kind: type, source: str) -> Any:
    return None if settings.get(name) is None else require_field(settings, name, kind, source)


def _layer(layer: Any, index: int, source: str) -> LayerSpec:
    where = f"{source}: layers[{index}]"
    if not isinstance(layer, dict) or not isinstance(layer.get("type"), str):
        raise ConfigError(f"{where}: each layer must be a mapping with a 'type'")
    kind = layer["type"]
    if kind not in LAYER_FIELDS:
        raise ConfigError(f"{where}: unknown layer type {kind!r}; expected one of {', '.join(LAYER_FIELDS)}")
    required, optional = LAYER_FIELDS[kind]
    unknown = sorted(set(layer) - {"type"} - set(required) - set(optional))
    if unknown:
        raise ConfigError(f"{where} ({kind}): unknown field(s) {', '.join(unknown)}")
    options = {name: require_field(layer, name, typ, f"{where} ({kind})") for name, typ in required.items()}
    options.update({name: require_field(layer, name, typ, f"{where} ({kind})") for name, typ in optional.items() if name in layer})
    for name in ("filters", "units"):
        if name in options and options[name] <= 0:
            raise ConfigError(f"{where} ({kind}): field '{name}' must be positive, got {options[name]}")
    for name in ("kernel_size", "pool_size", "strides"):
        value = options.get(name)
        if value is not None and (len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
            raise ConfigError(f"{where} ({kind}): field '{name}' must be two positive integers, got {value!r}")
    if "rate" in options and not 0 <= options["rate"] < 1:
        raise ConfigError(f"{where} ({kind}): field 'rate' must be in [0, 1), got {options['rate']}")
    if options.get("activation", "relu") not in ACTIVATIONS:
        raise ConfigError(f"{where} ({kind}): activation {options['activation']!r} is not one of {', '.join(ACTIVATIONS)}")
    if options.get("padding", "valid") not in PADDINGS:
        raise ConfigError(f"{where} ({kind}): padding {options['padding']!r} is not one of {', '.join(PADDINGS)}")
    return LayerSpec(type=kind, options=tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))


def available_variants() -> list[str]:
    """Names of the variants shipped in conf/variants, in name order."""
    folder = default_conf_file(VARIANTS_FOLDER)
    return sorted(path.stem for path in folder.glob(f"*{YAML_SUFFIX}"))


def load_variant(name_or_path: str) -> VariantConfig:
    """A shipped variant by name (``variant3``) or any variant YAML file by path."""
    path = Path(name_or_path)
    if path.suffix != YAML_SUFFIX:
        path = default_conf_file(VARIANTS_FOLDER) / f"{name_or_path}{YAML_SUFFIX}"
        if not path.exists():
            raise ConfigError(
                f"unknown variant {name_or_path!r}; available: {', '.join(available_variants())} "
                "(or give the path of a variant YAML file)"
            )
    variant = VariantConfig.from_mapping(load_yaml(path), str(path))
    return variant


# ---------------------------------------------------------------------------------------------
# Run configs (conf/runs/*.yaml): what to train, on which data, with how many workers.
# ---------------------------------------------------------------------------------------------

RUNS_FOLDER = "runs"
DEFAULT_BACKEND = "tf"
BACKEND_NAMES = ("tf", "horovod")  # sparkml_mnist.distributed.backends.BACKENDS (a test keeps them equal)
DEFAULT_RUN = "sample"
ALL_VARIANTS = "all"
SAMPLE_DATA = "sample"


@dataclass(frozen=True)
class RunConfig:
    """One job: its variants, data, worker count and output folder; CLI flags override fields."""

    name: str
    data: str | None  # "sample", a folder, or None for the environment's default
    train: str | None  # explicit files win over ``data``
    test: str | None
    variants: tuple[str, ...]
    np: int
    epochs: int | None  # None keeps each variant's own epochs
    output: str
    seed: int
    progress_timeout_s: float
    source: str
    backend: str = DEFAULT_BACKEND  # "tf" (MultiWorkerMirroredStrategy) or "horovod" (its own environment)

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any], source: str) -> "RunConfig":
        known = {
            "name", "data", "train", "test", "variants", "np", "epochs", "output", "seed", "progress_timeout_s",
            "backend",
        }
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}; expected {sorted(known)}")
        run = cls(
            name=require_field(settings, "name", str, source),
            data=_optional(settings, "data", str, source),
            train=_optional(settings, "train", str, source),
            test=_optional(settings, "test", str, source),
            variants=_variant_names(settings.get("variants", ALL_VARIANTS), source),
            np=require_field(settings, "np", int, source),
            epochs=_optional(settings, "epochs", int, source),
            output=require_field(settings, "output", str, source),
            seed=require_field(settings, "seed", int, source),
            progress_timeout_s=float(require_field(settings, "progress_timeout_s", float, source)),
            source=source,
            backend=_optional(settings, "backend", str, source) or DEFAULT_BACKEND,
        )
        run.validate()
        return run

    def validate(self) -> None:
        """Checks that hold for the file and for command-line overrides alike."""
        if self.np == 0:
            raise ConfigError(f"{self.source}: field 'np' is 0; use np > 0 for executors or np < 0 for driver processes")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"{self.source}: field 'epochs' must be a positive integer or null, got {self.epochs}")
        if self.progress_timeout_s <= 0:
            raise ConfigError(f"{self.source}: field 'progress_timeout_s' must be positive, got {self.progress_timeout_s}")
        if self.backend not in BACKEND_NAMES:
            raise ConfigError(
                f"{self.source}: field 'backend' is {self.backend!r}; choose one of {', '.join(BACKEND_NAMES)}"
            )
        if bool(self.train) != bool(self.test):
            raise ConfigError(f"{self.source}: give both 'train' and 'test' files, or neither (then 'data')")
        for name in self.variants:
            load_variant(name)  # an unknown name or a bad file fails here, before Spark starts

    def with_overrides(self, **overrides: Any) -> "RunConfig":
        """Command-line values (None = not given) replace the file's; the result is re-validated."""
        given = {key: value for key, value in overrides.items() if value is not None}
        if "variants" in given:
            given["variants"] = _variant_names(given["variants"], "--variant")
        if "train" in given or "test" in given:
            given.setdefault("data", None)
        if "data" in given and "train" not in given:
            given.update(train=None, test=None)
        run = replace(self, **given, source=f"{self.source} (with command-line overrides)" if given else self.source)
        run.validate()
        return run

    def load_variants(self) -> list[VariantConfig]:
        return [load_variant(name).with_epochs(self.epochs) for name in self.variants]


def _variant_names(value: Any, source: str) -> tuple[str, ...]:
    if value == ALL_VARIANTS or value == [ALL_VARIANTS]:
        return tuple(available_variants())
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{source}: field 'variants' must be 'all' or a list of variant names")
    if len(set(value)) != len(value):
        raise ConfigError(f"{source}: field 'variants' names a variant twice: {list(value)}")
    return tuple(value)


def load_run(name_or_path: str = DEFAULT_RUN) -> RunConfig:
    """A shipped run config by name (``sample``, ``lab``) or any run YAML file by path."""
    path = Path(name_or_path)
    if path.suffix != YAML_SUFFIX:
        path = default_conf_file(RUNS_FOLDER) / f"{name_or_path}{YAML_SUFFIX}"
        if not path.exists():
            shipped = sorted(p.stem for p in default_conf_file(RUNS_FOLDER).glob(f"*{YAML_SUFFIX}"))
            raise ConfigError(f"unknown run config {name_or_path!r}; available: {', '.join(shipped)} (or a YAML path)")
    return RunConfig.from_mapping(load_yaml(path), str(path))
