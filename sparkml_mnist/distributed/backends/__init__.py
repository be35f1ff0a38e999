"""Communication backends: how the ranks of one run find each other and all-reduce.

A backend is chosen by name (``HorovodRunner(..., backend="tf")``); callers stay the same for
each. ``tf``: MultiWorkerMirroredStrategy (TF 2.21 + tf_keras, the default). ``horovod``: Horovod
over Gloo (its own TF 2.15 environment). Another one: implement ``Backend``, register it here.
"""

from __future__ import annotations

from sparkml_mnist.config import DEFAULT_BACKEND
from sparkml_mnist.distributed.backends.base import Backend
from sparkml_mnist.distributed.backends.horovod import HorovodBackend
from sparkml_mnist.distributed.backends.tf import TensorFlowBackend
from sparkml_mnist.errors import ConfigError

BACKENDS: dict[str, type[Backend]] = {TensorFlowBackend.name: TensorFlowBackend, HorovodBackend.name: HorovodBackend}


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]()
    except KeyError:
        raise ConfigError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}") from None


__all__ = ["BACKENDS", "DEFAULT_BACKEND", "Backend", "get_backend"]
