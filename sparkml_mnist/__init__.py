"""Distributed training of the Keras MNIST lab's ConvNets on Apache Spark.

The public API (imported lazily, so ``import sparkml_mnist`` stays cheap and imports neither Spark
nor TensorFlow):

- the launcher, sparkdl-compatible: ``HorovodRunner``, ``get_context``, ``log_to_driver``, ``LogCallback``
- the data stage: ``read_libsvm``, ``load_libsvm``, ``shard_frame`` (also in ``sparkml_mnist.data``)
- the job: ``run_job``, ``plan_job``, ``load_run``, ``load_variant``
- scoring on the executors: ``predict(frame, model)`` (raw pixels -> ``prediction``, ``probability``)
- errors: ``SparkMnistError`` and its family
"""

from __future__ import annotations

from sparkml_mnist.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "HorovodRunner": "sparkml_mnist.launcher.runner",
    "get_context": "sparkml_mnist.launcher.rank.context",
    "log_to_driver": "sparkml_mnist.launcher.rank.context",
    "LogCallback": "sparkml_mnist.launcher.rank.callbacks",
    "read_libsvm": "sparkml_mnist.data.libsvm",
    "load_libsvm": "sparkml_mnist.data.libsvm",
    "shard_frame": "sparkml_mnist.data.shards",
    "run_job": "sparkml_mnist.job.run",
    "plan_job": "sparkml_mnist.job.plan",
    "predict": "sparkml_mnist.job.predict",
    "load_run": "sparkml_mnist.config.runs",
    "load_variant": "sparkml_mnist.config.variants",
    "SparkMnistError": "sparkml_mnist.errors",
    "ConfigError": "sparkml_mnist.errors",
    "DataError": "sparkml_mnist.errors",
    "LaunchError": "sparkml_mnist.errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


__getattr__ = lazy_exports(__name__, _EXPORTS)
