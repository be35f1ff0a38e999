"""Spark's parsed LIBSVM rows -> compact, validated rows: a label and the image's pixels as 784 bytes.

Runs inside Spark's tasks (``mapInArrow``), once per input row: the vectors Spark's ``libsvm`` source
parsed (doubles, sparse) become ``uint8`` pixels, an exact encoding of MNIST's whole numbers 0..255,
and every row says whether its label or a pixel breaks the layout. From here on, 784 bytes a row cross
the shuffle instead of sparse doubles, and the rank casts to float32 in its own input pipeline.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sparkml_mnist.data.columns import LABEL_COLUMN, PIXELS_COLUMN

ID_COLUMN = "_id"
BAD_COLUMN = "_bad"
COMPACT_SCHEMA = f"{ID_COLUMN} bigint, {LABEL_COLUMN} int, {PIXELS_COLUMN} binary, {BAD_COLUMN} boolean"
SPARSE = 0  # Spark ML's vector struct: type 0 sparse (indices + values), 1 dense (values)


def compact_rows(
    num_features: int, num_classes: int, max_pixel_value: int
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The ``mapInArrow`` function: (label, features, _id) batches -> COMPACT_SCHEMA batches."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            yield compact_batch(batch, num_features, num_classes, max_pixel_value)

    return run


def compact_batch(batch: pa.RecordBatch, num_features: int, num_classes: int, max_pixel_value: int) -> pa.RecordBatch:
    count = batch.num_rows
    labels = batch.column(LABEL_COLUMN).to_numpy(zero_copy_only=False).astype(np.float64)
    with np.errstate(invalid="ignore"):
        bad = np.isnan(labels) | (labels < 0) | (labels >= num_classes) | (labels != np.floor(labels))
    features = batch.column("features")
    values = features.field("values")
    lengths = pc.fill_null(pc.list_value_length(values), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(values).to_numpy(zero_copy_only=False).astype(np.float64)
    owner = np.repeat(np.arange(count), lengths)  # the row each value belongs to
    sparse = features.field("type").to_numpy(zero_copy_only=False) == SPARSE
    positions = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # dense: the offset
    from_indices = sparse[owner]
    if from_indices.any():
        positions[from_indices] = pc.list_flatten(features.field("indices")).to_numpy(zero_copy_only=False)
    with np.errstate(invalid="ignore"):
        broken = np.isnan(flat) | (flat < 0) | (flat > max_pixel_value) | (flat != np.floor(flat))
    broken |= (positions < 0) | (positions >= num_features)
    bad |= np.bincount(owner[broken], minlength=count).astype(bool)
    pixels = np.zeros((count, num_features), dtype=np.uint8)
    keep = ~broken
    pixels[owner[keep], positions[keep]] = flat[keep].astype(np.uint8)
    offsets = np.arange(count + 1, dtype=np.int32) * num_features
    return pa.RecordBatch.from_arrays(
        [
            batch.column(ID_COLUMN),
            pa.array(np.where(bad, -1, labels).astype(np.int32)),
            pa.Array.from_buffers(pa.binary(), count, [None, pa.py_buffer(offsets), pa.py_buffer(pixels)]),
            pa.array(bad),
        ],
        names=[ID_COLUMN, LABEL_COLUMN, PIXELS_COLUMN, BAD_COLUMN],
    )


def pixel_matrix(column: pa.ChunkedArray | pa.Array, num_features: int) -> np.ndarray:
    """A binary column of ``num_features``-byte images -> ``uint8`` (n, num_features), without a row loop."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = []
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
        if not np.all(np.diff(offsets) == num_features):
            raise ValueError(f"every image must hold {num_features} pixels")
        data = np.frombuffer(chunk.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
        parts.append(data.reshape(len(chunk), num_features))
    return np.concatenate(parts) if parts else np.zeros((0, num_features), dtype=np.uint8)
