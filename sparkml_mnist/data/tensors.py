"""Arrow rows of the data stage -> numpy tensors: ``x`` float32 (n, 28, 28, 1) in [0, 1], ``y`` one-hot.

Used where the tensors are needed: inside each rank on its own partition (``sparkml_mnist.inputs``)
and on the driver for the test set (``collect_tensors``). No Python loop over rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sparkml_mnist.config import DataSpec, load_data_spec
from sparkml_mnist.data.columns import LABEL_COLUMN, PIXELS_COLUMN, ROW_COLUMN
from sparkml_mnist.errors import DataError

if TYPE_CHECKING:
    from sparkml_mnist.data.libsvm import LibsvmData



def images_and_labels(
    table: pa.Table, spec: DataSpec | None = None, pixels_column: str = PIXELS_COLUMN
) -> tuple[np.ndarray, np.ndarray]:
    """Arrow ``label`` + ``pixels`` (array<float>, raw 0..255) -> scaled images, one-hot labels."""
    spec = spec or load_data_spec()
    count = table.num_rows
    pixels = pc.list_flatten(table.column(pixels_column)).to_numpy(zero_copy_only=False)
    if pixels.size != count * spec.num_features:
        raise DataError(
            "<arrow batch>", f"expected {spec.num_features} pixels per row, got {pixels.size} for {count} rows"
        )
    images = (pixels.astype(np.float32, copy=False) / np.float32(spec.max_pixel_value)).reshape(
        (count, *spec.image_shape)
    )
    labels = table.column(LABEL_COLUMN).to_numpy(zero_copy_only=False).astype(np.int64)
    return images, np.eye(spec.num_classes, dtype=np.float32)[labels]


def collect_tensors(data: LibsvmData, spec: DataSpec | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The whole input as tensors on the driver, in file order (for the test set's evaluation)."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as F

    table = (
        data.frame.select(
            ROW_COLUMN,
            F.col("label").cast("int").alias(LABEL_COLUMN),
            vector_to_array(F.col("features"), "float32").alias(PIXELS_COLUMN),
        )
        .orderBy(ROW_COLUMN)
        .toArrow()
    )
    return images_and_labels(table, spec)
