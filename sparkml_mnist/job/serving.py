"""What a trained model is served with: raw pixels, in every form, scaled exactly as training scaled them.

The data stage keeps an image as its 784 raw pixel values (``uint8``, 0..255), and training and the ranks'
scoring scale them to float32 in [0, 1] inside their own pipelines (``training.inputs.scale_images``).
Whatever serves a trained model (``predict`` on the executors, the logged MLflow pyfunc) takes the same raw
values and scales them with that same function, so a served prediction is the one the report counted.

Raw pixels may come as the data stage's binary column (784 bytes a row), as rows of 784 values (arrays,
lists, a (n, 784) or (n, 28, 28[, 1]) array, 784 DataFrame columns), or as a DataFrame or dict holding a
``pixels`` column of either. Values already scaled to [0, 1] are refused instead of being scaled twice:
raw pixels are whole numbers, scaled ones are not.

Nothing here imports MLflow or TensorFlow at import time: executors and the MLflow loader import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from sparkml_mnist.config import DataSpec, load_data_spec
from sparkml_mnist.data.columns import PIXELS_COLUMN
from sparkml_mnist.errors import ConfigError

# The pyfunc's one named input: the data stage's column, so ``spark_udf(spark, uri)()`` finds it by itself.
PYFUNC_INPUT = PIXELS_COLUMN
PYFUNC_OUTPUT = "probability"  # the class probabilities, as ``predict`` names them
PYFUNC_CODE = Path(__file__).resolve().parent / "mlflow_model.py"  # "models from code": MLflow runs this file
PYFUNC_CODE_PATHS = [str(PYFUNC_CODE.parent)]
KERAS_ARTIFACT = "keras_model"  # the pyfunc's artifact: the trained .keras file
PYFUNC_NAME = "model"
# Packages the logged model's environment pins (looked up without importing them).
PYFUNC_PACKAGES = ("tensorflow-cpu", "tensorflow", "tf-keras", "numpy", "pandas", "PyYAML")
# Rows a predict call takes at once: the ranks' scoring batch, so the kernels see the shapes the report's did.
PREDICT_BATCH = 1024
BYTES_TYPES = (bytes, bytearray, memoryview)


def raw_pixel_rows(values: Any, spec: DataSpec | None = None, source: str = "the input") -> np.ndarray:
    """Raw pixels in any of the forms above -> ``uint8`` (n, num_features), checked: width, whole numbers, range.

    ``source`` names the input in errors (a column, a file). A ``ConfigError`` names what is wrong and where.
    """
    spec = spec or load_data_spec()
    values = _pixel_values(values, spec, source)
    if isinstance(values, np.ndarray) and values.dtype != object:
        return _checked(_as_rows(values, spec, source), spec, source)
    rows = list(values)
    if not rows:
        return np.zeros((0, spec.num_features), dtype=np.uint8)
    missing = next((index for index, row in enumerate(rows) if row is None), None)
    if missing is not None:
        raise ConfigError(f"{source}: row {missing} has no pixels (null); give every row its {spec.num_features} pixels")
    if isinstance(rows[0], BYTES_TYPES):
        widths = np.fromiter((len(row) if isinstance(row, BYTES_TYPES) else -1 for row in rows), np.int64, len(rows))
        _check_widths(widths, spec, source, "pixel bytes")
        return np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(len(rows), spec.num_features)
    arrays = [np.asarray(row) for row in rows]
    if not np.issubdtype(arrays[0].dtype, np.number):  # the first row says what the rows are
        raise ConfigError(f"{source}: rows of {type(rows[0]).__name__} ({arrays[0].dtype}) are not pixels; "
                          f"give {spec.num_features} bytes or {spec.num_features} numbers 0..{spec.max_pixel_value} a row")
    _check_widths(np.fromiter((array.size for array in arrays), np.int64, len(arrays)), spec, source, "values")
    return _checked(np.concatenate([array.reshape(-1) for array in arrays]).reshape(len(arrays), spec.num_features),
                    spec, source)


def model_input(rows: np.ndarray, spec: DataSpec | None = None) -> Any:
    """``uint8`` (n, num_features) rows -> float32 images in [0, 1], through training's own scaling function."""
    from sparkml_mnist.training.inputs import scale_images

    spec = spec or load_data_spec()
    images, _ = scale_images(spec)(rows.reshape((len(rows), *spec.image_shape)), None)
    return images


def class_probabilities(model: Any, values: Any, spec: DataSpec | None = None, source: str = "the input") -> np.ndarray:
    """Raw pixels in any form -> the model's class probabilities, float32 (n, num_classes)."""
    spec = spec or load_data_spec()
    rows = raw_pixel_rows(values, spec, source)
    if not len(rows):
        return np.zeros((0, spec.num_classes), dtype=np.float32)
    predicted = model.predict(model_input(rows, spec), batch_size=PREDICT_BATCH, verbose=0)
    return np.asarray(predicted, dtype=np.float32)


# -- the MLflow pyfunc: its signature, example and logging (mlflow imported only when called) -------------


def pyfunc_signature() -> Any:
    """Input: one ``pixels`` column of any type (bytes or 784 values a row: MLflow's tensor signatures refuse
    a binary column, and a typed column refuses one form or the other; ``raw_pixel_rows`` checks the rows).
    Output: a row's class probabilities as one ``array<float>`` (what ``spark_udf`` then returns by itself; a
    (-1, 10) tensor spec would make it ``array<array<float>>``). ``predict`` returns them as (n, 10) float32."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Schema

    return ModelSignature(inputs=Schema([ColSpec(AnyType(), PYFUNC_INPUT)]),
                          outputs=Schema([ColSpec(Array(DataType.float), PYFUNC_OUTPUT)]))


def pyfunc_input_example(images: Any, spec: DataSpec | None = None) -> Any:
    """A few raw images as the pyfunc's input example: a ``pixels`` column of 784 whole numbers a row (JSON)."""
    import pandas as pd

    rows = raw_pixel_rows(images, spec, "the input example")
    return pd.DataFrame({PYFUNC_INPUT: [row.tolist() for row in rows]})


def pyfunc_requirements() -> list[str]:
    from sparkml_mnist.launcher.packages import installed_version

    found = {name: installed_version(name) for name in PYFUNC_PACKAGES}
    return [f"{name}=={version}" for name, version in found.items() if version is not None]


def log_pyfunc(keras_file: str | Path, examples: Any, name: str = PYFUNC_NAME) -> Any:
    """Log ``keras_file`` as this package's pyfunc into the active MLflow run; ``examples``: a few raw images.

    The one way the model is logged (the job's tracking and the tests), so what is served is what was tested.
    """
    import mlflow

    return mlflow.pyfunc.log_model(
        name=name, python_model=str(PYFUNC_CODE), artifacts={KERAS_ARTIFACT: str(keras_file)},
        signature=pyfunc_signature(), input_example=pyfunc_input_example(examples),
        code_paths=PYFUNC_CODE_PATHS, pip_requirements=pyfunc_requirements(),
    )


# -- the forms -----------------------------------------------------------------------------------------------


def _pixel_values(values: Any, spec: DataSpec, source: str) -> Any:
    """A DataFrame or dict -> its pixels (the ``pixels`` column, its only column, or its 784 columns)."""
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas comes with pyspark and MLflow
        pd = None
    if pd is not None and isinstance(values, pd.DataFrame):
        if PYFUNC_INPUT in values.columns:
            return values[PYFUNC_INPUT]
        if len(values.columns) == 1:
            return values.iloc[:, 0]
        if len(values.columns) == spec.num_features:
            return values.to_numpy()
        raise ConfigError(f"{source}: a DataFrame of {len(values.columns)} columns without a '{PYFUNC_INPUT}' column; "
                          f"give a '{PYFUNC_INPUT}' column or {spec.num_features} pixel columns")
    if isinstance(values, Mapping):
        if PYFUNC_INPUT not in values:
            raise ConfigError(f"{source}: no '{PYFUNC_INPUT}' entry (it has {sorted(map(str, values))[:5]})")
        return _pixel_values(values[PYFUNC_INPUT], spec, source)
    if pd is not None and isinstance(values, pd.Series):
        return values.to_numpy() if values.dtype != object else values
    if isinstance(values, BYTES_TYPES):
        return [values]
    if isinstance(values, np.ndarray) or not isinstance(values, Sequence):
        return np.asarray(values) if not isinstance(values, np.ndarray) else values
    return values


def _as_rows(values: np.ndarray, spec: DataSpec, source: str) -> np.ndarray:
    """A numeric array of images -> (n, num_features): (n, 784), (n, 28, 28) or (n, 28, 28, 1)."""
    image_shapes = {(spec.num_features,), tuple(spec.image_shape), tuple(spec.image_shape[:-1])}
    if values.ndim >= 2 and tuple(values.shape[1:]) in image_shapes:
        return values.reshape(len(values), spec.num_features)
    if values.ndim == 1 and values.size == spec.num_features:
        return values.reshape(1, spec.num_features)
    raise ConfigError(f"{source}: an array of shape {values.shape} is not images of {spec.num_features} pixels; "
                      f"give (n, {spec.num_features}) or (n, {', '.join(map(str, spec.image_shape))})")


def _check_widths(widths: np.ndarray, spec: DataSpec, source: str, unit: str) -> None:
    wrong = np.flatnonzero(widths != spec.num_features)
    if wrong.size:
        first = int(wrong[0])
        held = "no pixels (not bytes)" if widths[first] < 0 else f"{int(widths[first])} {unit}"
        raise ConfigError(f"{source}: row {first} holds {held}, not {spec.num_features}; MNIST images have "
                          f"{spec.num_features} pixels ({'x'.join(map(str, spec.image_shape))})")


def _checked(rows: np.ndarray, spec: DataSpec, source: str) -> np.ndarray:
    """Numeric rows -> ``uint8``, refusing what raw pixels cannot be: outside 0..max, not whole, not finite."""
    if rows.dtype == np.uint8:
        return rows
    if not (np.issubdtype(rows.dtype, np.integer) or np.issubdtype(rows.dtype, np.floating)):
        raise ConfigError(f"{source}: {rows.dtype} values are not pixels; give whole numbers 0..{spec.max_pixel_value}")
    bad = (rows < 0) | (rows > spec.max_pixel_value)
    if np.issubdtype(rows.dtype, np.floating):
        with np.errstate(invalid="ignore"):
            bad |= ~np.isfinite(rows) | (rows != np.floor(rows))
    if bad.any():
        row, column = (int(i) for i in np.argwhere(bad)[0])
        value = rows[row, column].item()
        scaled = " (already scaled? give the raw values: the model scales them as training did)" \
            if isinstance(value, float) and 0 <= value <= 1 else ""
        raise ConfigError(f"{source}: row {row}, pixel {column} is {value}, not a whole number "
                          f"0..{spec.max_pixel_value}{scaled}")
    return rows.astype(np.uint8)
