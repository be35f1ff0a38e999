"""Communication backends: how the ranks of one run find each other and all-reduce.

A backend is chosen by name (``HorovodRunner(..., backend="tf")``) so that callers stay the same
when another one (Horovod with a Gloo rendezvous, #7) is added: implement ``Backend`` and
register it in ``BACKENDS``.
"""

from __future__ import annotations

from sparkml_mnist.distributed.backends.base import Backend
from sparkml_mnist.distributed.backends.tf import TensorFlowBackend
from sparkml_mnist.errors import ConfigError

DEFAULT_BACKEND = "tf"
BACKENDS: dict[str, type[Backend]] = {TensorFlowBackend.name: TensorFlowBackend}


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]()
    except KeyError:
        raise ConfigError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}") from None


__all__ = ["BACKENDS", "DEFAULT_BACKEND", "Backend", "get_backend"]
