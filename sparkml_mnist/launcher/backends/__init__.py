"""Communication backends: how the ranks of one run find each other and all-reduce.

A backend is chosen by name (``HorovodRunner(..., backend="tf")``); callers stay the same for
each. ``tf``: MultiWorkerMirroredStrategy (TF 2.21 + tf_keras, the default). ``horovod``: Horovod
over Gloo (its own TF 2.15 environment). ``jax``: Keras 3 on JAX with Keras's distribution API
(the ``jax`` extra). Another one: a ``DriverBackend`` and a ``RankBackend``
(``base.py``), registered here.
"""

from __future__ import annotations

from sparkml_mnist.launcher.backends import horovod, jax, tf
from sparkml_mnist.launcher.backends.base import DriverBackend, RankBackend
from sparkml_mnist.launcher.spec import RankSpec
from sparkml_mnist.errors import ConfigError

DEFAULT_BACKEND = tf.NAME
DRIVER_BACKENDS: dict[str, type[DriverBackend]] = {
    tf.NAME: tf.TfDriverBackend,
    horovod.NAME: horovod.HorovodDriverBackend,
    jax.NAME: jax.JaxDriverBackend,
}
RANK_BACKENDS: dict[str, type[RankBackend]] = {
    tf.NAME: tf.TfRankBackend,
    horovod.NAME: horovod.HorovodRankBackend,
    jax.NAME: jax.JaxRankBackend,
}
BACKEND_NAMES = tuple(DRIVER_BACKENDS)


def check_backend_name(name: str, source: str | None = None) -> str:
    """``name`` if it is a backend; else a ``ConfigError`` naming the setting (``source``) and the choices."""
    if name not in DRIVER_BACKENDS:
        where = f"{source}: field 'backend'" if source else "backend"
        raise ConfigError(f"{where} is {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    return name


def driver_backend(name: str) -> DriverBackend:
    return DRIVER_BACKENDS[check_backend_name(name)]()


def rank_backend(spec: RankSpec) -> RankBackend:
    """The rank half, made from the rank's spec alone (in the rank's own process)."""
    return RANK_BACKENDS[check_backend_name(spec.backend)](spec)


__all__ = [
    "BACKEND_NAMES", "DEFAULT_BACKEND", "DriverBackend", "RankBackend", "check_backend_name", "driver_backend",
    "rank_backend",
]
