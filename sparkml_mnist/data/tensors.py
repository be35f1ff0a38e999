"""Arrow rows of the data stage -> numpy tensors: images (n, 28, 28, 1), ``y`` one-hot.

Used where the tensors are needed: inside each rank on its own partition (``sparkml_mnist.training.inputs``,
``sparkml_mnist.training.scoring``). ``collect_tensors`` gathers a whole input on one machine: a reference
for checks and benchmarks; the job never calls it (the ranks score the test set). No Python loop over rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from sparkml_mnist.config import DataSpec, load_data_spec
from sparkml_mnist.data.columns import LABEL_COLUMN, PIXELS_COLUMN, ROW_COLUMN
from sparkml_mnist.data.compact import pixel_matrix
from sparkml_mnist.errors import DataError

if TYPE_CHECKING:
    from sparkml_mnist.data.libsvm import LibsvmData



def images_and_labels(
    table: pa.Table, spec: DataSpec | None = None, scaled: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Arrow ``label`` + ``pixels`` (784 bytes) -> images (n, 28, 28, 1), one-hot labels.

    ``scaled``: float32 in [0, 1], as the models take them; else the raw ``uint8`` (the ranks keep those,
    a quarter of the memory, and cast in their input pipeline: ``scale_images``).
    """
    spec = spec or load_data_spec()
    try:
        pixels = pixel_matrix(table.column(PIXELS_COLUMN), spec.num_features)
    except ValueError as error:
        raise DataError("<arrow batch>", str(error)) from None
    images = pixels.reshape((table.num_rows, *spec.image_shape))
    if scaled:
        images = images.astype(np.float32) / np.float32(spec.max_pixel_value)
    labels = table.column(LABEL_COLUMN).to_numpy(zero_copy_only=False).astype(np.int64)
    return images, np.eye(spec.num_classes, dtype=np.float32)[labels]


def collect_tensors(data: LibsvmData, spec: DataSpec | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The whole input as tensors on the driver, in file order: a one-process reference for checks and
    benchmarks. Row-sized and bound by ``spark.driver.maxResultSize``: the job never calls it."""
    table = data.frame.select(ROW_COLUMN, LABEL_COLUMN, PIXELS_COLUMN).orderBy(ROW_COLUMN).toArrow()
    return images_and_labels(table, spec)
