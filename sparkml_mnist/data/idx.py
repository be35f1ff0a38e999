"""MNIST's IDX files (the canonical distribution format) -> numpy arrays, checked."""

from __future__ import annotations

import gzip
import math
import zlib

import numpy as np

from sparkml_mnist.errors import SparkMnistError

# IDX header: two zero bytes, a data-type code, the number of dimensions, then one big-endian
# uint32 per dimension; the data follows in C order (http://yann.lecun.com/exdb/mnist/).
IDX_TYPE_UBYTE = 0x08
IDX_MAGIC_BYTES = 4
IDX_DIM_BYTES = 4
IDX_BYTE_ORDER = "big"
MIRROR_HINT = "use --mirror URL to pick another mirror (alternatives are listed in conf/download.yaml)"


class DownloadError(SparkMnistError):
    """A download, checksum, IDX file or write failed; the message names the URL or file and what to do."""


def parse_idx(payload: bytes, name: str) -> np.ndarray:
    """A gzip-compressed IDX file of unsigned bytes as an array of its declared shape."""
    try:
        raw = gzip.decompress(payload)
    except (OSError, EOFError, zlib.error) as error:
        raise DownloadError(f"{name}: not a complete gzip file ({error}); {MIRROR_HINT}") from error
    if len(raw) < IDX_MAGIC_BYTES or raw[0] or raw[1]:
        raise DownloadError(f"{name}: not an IDX file (magic number {raw[:IDX_MAGIC_BYTES].hex() or 'missing'})")
    data_type, num_dims = raw[2], raw[3]
    if data_type != IDX_TYPE_UBYTE:
        raise DownloadError(f"{name}: IDX data type 0x{data_type:02x} is not unsigned bytes (0x{IDX_TYPE_UBYTE:02x})")
    header = IDX_MAGIC_BYTES + IDX_DIM_BYTES * num_dims
    if len(raw) < header:
        raise DownloadError(f"{name}: IDX header declares {num_dims} dimensions but the file ends after {len(raw)} bytes")
    dims = tuple(
        int.from_bytes(raw[IDX_MAGIC_BYTES + IDX_DIM_BYTES * i : IDX_MAGIC_BYTES + IDX_DIM_BYTES * (i + 1)], IDX_BYTE_ORDER)
        for i in range(num_dims)
    )
    if len(raw) - header != math.prod(dims):
        raise DownloadError(
            f"{name}: IDX header declares shape {dims} ({math.prod(dims):,} bytes of data) but the file holds "
            f"{len(raw) - header:,}; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
