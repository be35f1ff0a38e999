"""The launcher: run a function on several ranks, as Spark barrier tasks or driver processes.

``from sparkml_mnist.distributed import HorovodRunner, get_context, log_to_driver``. Names are
imported lazily so that a rank's training process, which imports submodules of this package,
stays light (``LogCallback`` imports Keras).
"""

from __future__ import annotations

from sparkml_mnist.lazy import lazy_exports

_EXPORTS = {
    "HorovodRunner": "sparkml_mnist.distributed.runner",
    "Placement": "sparkml_mnist.distributed.placement",
    "parse_placement": "sparkml_mnist.distributed.placement",
    "RankContext": "sparkml_mnist.distributed.context",
    "get_context": "sparkml_mnist.distributed.context",
    "log_to_driver": "sparkml_mnist.distributed.context",
    "LogCallback": "sparkml_mnist.distributed.callbacks",
    "ProgressCallback": "sparkml_mnist.distributed.callbacks",
    "RankRecord": "sparkml_mnist.distributed.records",
    "RankError": "sparkml_mnist.distributed.records",
    "RankFailedError": "sparkml_mnist.distributed.records",
    "RankStalledError": "sparkml_mnist.distributed.records",
    "PreflightError": "sparkml_mnist.distributed.records",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
