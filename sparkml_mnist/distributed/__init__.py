"""The launcher: run a function on several ranks, as Spark barrier tasks or driver processes.

``from sparkml_mnist.distributed import HorovodRunner, get_context``. Names are imported lazily
so that a rank's training process, which imports submodules of this package, stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "HorovodRunner": "sparkml_mnist.distributed.runner",
    "RankContext": "sparkml_mnist.distributed.context",
    "get_context": "sparkml_mnist.distributed.context",
    "RankRecord": "sparkml_mnist.distributed.records",
    "RankError": "sparkml_mnist.distributed.records",
    "RankFailedError": "sparkml_mnist.distributed.records",
    "RankStalledError": "sparkml_mnist.distributed.records",
    "PreflightError": "sparkml_mnist.distributed.records",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
