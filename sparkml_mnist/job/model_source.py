"""Which trained model ``predict`` serves: a run's output folder, a saved ``.keras`` file, or an MLflow model.

Resolved once, on the driver: the model is read and loaded there (a model that does not load, or does not
take MNIST's images, is one ``ConfigError`` before any Spark work), and what the executors get is the
``.keras`` file's bytes, shipped with the tasks. So no executor needs the driver's disk, the tracking
server or its credentials, and every Python worker loads exactly the model that was checked.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sparkml_mnist.config import DataSpec, load_data_spec
from sparkml_mnist.errors import ConfigError
from sparkml_mnist.job.serving import KERAS_ARTIFACT
from sparkml_mnist.redact import redact

KERAS_SUFFIX = ".keras"
MLMODEL_FILE = "MLmodel"  # an MLflow model folder's descriptor
PYFUNC_FLAVOR = "python_function"
MLFLOW_SCHEMES = ("runs", "models")  # MLflow's own URIs; any other scheme is an artifact store's (s3, dbfs, ...)
LOCAL_SCHEMES = ("", "file")
MLFLOW_INSTALL_HINT = 'install it with `pip install ".[mlflow]"`'
MODEL_HINT = "give a run's output folder, a .keras file this tool saved, or an MLflow model URI (runs:/..., models:/...)"


@dataclass(frozen=True)
class ServedModel:
    """A trained Keras model as the executors get it: its ``.keras`` bytes, and where it came from."""

    source: str  # what was asked for, credentials masked
    data: bytes = field(repr=False)
    variant: str | None = None  # the run's variant it is, for a run's output folder
    test_accuracy: float | None = None  # that variant's accuracy in its report

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def describe(self) -> str:
        return f"{self.variant} of {self.source}" if self.variant else self.source


def resolve_model(model: str | Path | ServedModel, variant: str | None = None,
                  spec: DataSpec | None = None) -> ServedModel:
    """``model`` -> a ``ServedModel`` loaded and checked once here; ``variant`` picks one of a run's variants
    (default: the best by the report's test accuracy)."""
    from sparkml_mnist.report.folder import REPORT_JSON  # on the driver only: the report's package imports matplotlib

    if isinstance(model, ServedModel):
        return model
    spec = spec or load_data_spec()
    text = str(model)
    scheme = urlparse(text).scheme
    local = Path(text[len("file:"):] if scheme == "file" else text)
    if scheme in LOCAL_SCHEMES and local.is_dir() and (local / REPORT_JSON).is_file():
        served = _from_run(local, text, variant)
    else:
        if variant is not None:
            raise ConfigError(f"--variant {variant}: only a run's output folder holds several variants, "
                              f"and model {redact(text)} is not one")
        if scheme in LOCAL_SCHEMES and local.is_dir() and (local / MLMODEL_FILE).is_file():
            served = _from_mlflow_folder(local, redact(text))
        elif scheme in LOCAL_SCHEMES and local.is_file():
            served = ServedModel(redact(text), _read(local, redact(text)))
        elif scheme in LOCAL_SCHEMES and not local.exists():
            raise ConfigError(f"model {redact(text)}: no such file or folder; {MODEL_HINT}")
        elif scheme in LOCAL_SCHEMES:
            raise ConfigError(f"model {redact(text)} is a folder without {REPORT_JSON} or {MLMODEL_FILE}; {MODEL_HINT}")
        else:
            served = _from_mlflow_uri(text)
    check_model(load_keras(served), served, spec)
    return served


def load_keras(model: ServedModel) -> Any:
    """The Keras model of ``model``'s bytes (written to a private temporary file: Keras loads from a path)."""
    from sparkml_mnist.launcher.keras_flavour import keras

    with tempfile.TemporaryDirectory(prefix="sparkml-mnist-model-") as folder:
        path = Path(folder) / f"model{KERAS_SUFFIX}"
        path.write_bytes(model.data)
        try:
            return keras().models.load_model(path, compile=False)
        except Exception as error:  # a corrupt or foreign file fails in many ways
            raise ConfigError(f"model {model.describe()} does not load as a Keras model "
                              f"({type(error).__name__}: {_first_line(error)}); {MODEL_HINT}") from None


def check_model(keras_model: Any, model: ServedModel, spec: DataSpec) -> None:
    """The model must take MNIST's images and give one probability per class."""
    takes = tuple(keras_model.input_shape[1:]) if isinstance(keras_model.input_shape, tuple) else None
    gives = keras_model.output_shape[-1] if isinstance(keras_model.output_shape, tuple) else None
    if takes != tuple(spec.image_shape) or gives != spec.num_classes:
        raise ConfigError(f"model {model.describe()} takes {takes} and gives {gives} values a row; MNIST's need "
                          f"{tuple(spec.image_shape)} images and {spec.num_classes} class probabilities")


# -- the sources ---------------------------------------------------------------------------------------------


def _from_run(folder: Path, text: str, variant: str | None) -> ServedModel:
    """A run's output folder: the variant asked for, else the best by test accuracy (the first on a tie)."""
    from sparkml_mnist.report.folder import MODELS_DIR, REPORT_JSON

    try:
        report = json.loads((folder / REPORT_JSON).read_text(encoding="utf-8"))
        entries = [entry for entry in report["variants"] if entry.get("files", {}).get("models")]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConfigError(f"model {redact(text)}: {REPORT_JSON} cannot be read as this tool's report "
                          f"({type(error).__name__}: {_first_line(error)}); {MODEL_HINT}") from None
    if not entries:
        raise ConfigError(f"model {redact(text)}: its {REPORT_JSON} names no saved model; {MODEL_HINT}")
    if variant is not None:
        chosen = next((entry for entry in entries if entry["name"] == variant), None)
        if chosen is None:
            raise ConfigError(f"--variant {variant}: run {redact(text)} has no model of that name "
                              f"(it has {', '.join(entry['name'] for entry in entries)})")
    else:
        chosen = max(entries, key=lambda entry: entry["test"]["accuracy"])  # max keeps the first of equals
    relative = Path(chosen["files"]["models"][0])
    if relative.is_absolute() or ".." in relative.parts or relative.parts[:1] != (MODELS_DIR,):
        raise ConfigError(f"model {redact(text)}: {REPORT_JSON} names {relative}, outside its {MODELS_DIR}/ folder")
    source = redact(text)
    return ServedModel(source, _read(folder / relative, f"{source}/{relative}"), chosen["name"],
                       float(chosen["test"]["accuracy"]))


def _from_mlflow_uri(uri: str) -> ServedModel:
    """``runs:/...``, ``models:/...`` or an artifact store's URI: downloaded on the driver only."""
    try:
        import mlflow.artifacts
    except ImportError:
        raise ConfigError(f"model {redact(uri)} is an MLflow model, but mlflow is not installed: "
                          f"{MLFLOW_INSTALL_HINT}") from None
    with tempfile.TemporaryDirectory(prefix="sparkml-mnist-mlflow-") as folder:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=folder)
        except Exception as error:  # MLflow raises its own and the stores' errors
            raise ConfigError(f"model {redact(uri)} cannot be fetched from MLflow ({type(error).__name__}: "
                              f"{redact(_first_line(error))}); check the URI and MLFLOW_TRACKING_URI") from None
        return _from_mlflow_folder(Path(local), redact(uri))


def _from_mlflow_folder(folder: Path, source: str) -> ServedModel:
    """An MLflow model folder this tool logged: its pyfunc's ``keras_model`` artifact."""
    import yaml

    try:
        flavor = yaml.safe_load((folder / MLMODEL_FILE).read_text(encoding="utf-8"))["flavors"][PYFUNC_FLAVOR]
        relative = Path(flavor["artifacts"][KERAS_ARTIFACT]["path"])
    except (OSError, yaml.YAMLError, KeyError, TypeError) as error:
        raise ConfigError(f"model {source} is an MLflow model, but not one this tool logged (no "
                          f"'{KERAS_ARTIFACT}' artifact: {type(error).__name__} {_first_line(error)}); {MODEL_HINT}") from None
    if relative.is_absolute() or ".." in relative.parts:
        raise ConfigError(f"model {source}: its {MLMODEL_FILE} names {relative}, outside the model's folder")
    return ServedModel(source, _read(folder / relative, f"{source}/{relative}"))


def _read(path: Path, shown: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ConfigError(f"model {shown} cannot be read ({error.strerror or error}); {MODEL_HINT}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
