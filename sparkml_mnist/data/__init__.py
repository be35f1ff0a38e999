"""The data stage: LIBSVM files on Spark -> validated DataFrames -> equal shards, one per partition.

``from sparkml_mnist.data import read_libsvm, load_libsvm, shard_frame``.
"""

from __future__ import annotations

from sparkml_mnist.lazy import lazy_exports

_EXPORTS = {
    "read_libsvm": "sparkml_mnist.data.libsvm",
    "load_libsvm": "sparkml_mnist.data.libsvm",
    "LibsvmData": "sparkml_mnist.data.libsvm",
    "shard_frame": "sparkml_mnist.data.shards",
    "plan_shards": "sparkml_mnist.data.shards",
    "ShardPlan": "sparkml_mnist.data.shards",
    "ShardedFrame": "sparkml_mnist.data.shards",
    "collect_tensors": "sparkml_mnist.data.tensors",
    "images_and_labels": "sparkml_mnist.data.tensors",
    "resolve_inputs": "sparkml_mnist.data.paths",
    "sample_paths": "sparkml_mnist.data.paths",
    "download_mnist": "sparkml_mnist.data.download",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
