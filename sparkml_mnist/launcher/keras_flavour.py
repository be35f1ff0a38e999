"""The one place that decides which Keras this package (and every training rank) imports.

Keras 3 (``import keras``, and ``tf.keras`` on TF >= 2.16) breaks in ``model.fit`` under
MultiWorkerMirroredStrategy with two or more workers (keras-team/keras#20585); tf_keras works.
TensorFlow reads ``TF_USE_LEGACY_KERAS`` once, when it is first imported, to decide what
``tf.keras`` is; so the variable must be set before anything imports TensorFlow. Import Keras
through ``keras()`` here, never ``import keras``.

Two environments are supported: TF 2.21 + tf_keras (the default), and TF 2.15, whose own
``tf.keras`` is Keras 2 (the ``keras`` 2.15 package; Horovod's environment). Both give the same
Keras 2 API.

A rank of the ``jax`` backend is a Keras 3 process instead: its launcher sets
``SPARKML_MNIST_KERAS=3``, ``KERAS_BACKEND`` and ``TF_USE_LEGACY_KERAS=0`` before it starts
(``keras3_environment``), and there ``keras()`` is Keras 3 and ``tensorflow()`` (for ``tf.data``)
leaves ``tf.keras`` as Keras 3. The driver stays a Keras 2 process: it evaluates a Keras 3 rank's
weights in the same variant built with tf_keras (the layers' weights have the same shapes and order).
"""

from __future__ import annotations

import os
import sys
import time
from functools import lru_cache
from types import ModuleType

LEGACY_KERAS_ENV = "TF_USE_LEGACY_KERAS"
LEGACY_KERAS_VALUE = "1"
TENSORFLOW_MODULE = "tensorflow"
LEGACY_KERAS_MODULE = "tf_keras"
BUILTIN_KERAS_MODULE = "keras"  # what tf.keras is on TF <= 2.15
KERAS_2_MODULES = (LEGACY_KERAS_MODULE, BUILTIN_KERAS_MODULE)  # one of them is this process's Keras 2
KERAS_3_FROM = (2, 16)  # from this TensorFlow on, tf.keras is Keras 3 unless tf_keras is used

KERAS_FLAVOUR_ENV = "SPARKML_MNIST_KERAS"  # "3": this process trains with Keras 3 (set by the launcher)
KERAS_3 = "3"
KERAS_BACKEND_ENV = "KERAS_BACKEND"  # Keras 3 reads it once, when it is first imported
NOT_LEGACY_KERAS_VALUE = "0"  # TensorFlow then leaves tf.keras as Keras 3

# The distributions that install the ``tensorflow`` module (first found wins).
TENSORFLOW_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-macos", "tensorflow-intel")

_import_seconds: float | None = None


@lru_cache(maxsize=1)
def installed_tensorflow() -> str | None:
    """The installed TensorFlow's version from package metadata (no import; None: no metadata).

    Read once per process: every ``tensorflow()`` call consults it, and scanning metadata costs ms.
    """
    from sparkml_mnist.launcher.packages import installed_version

    return next(filter(None, (installed_version(name) for name in TENSORFLOW_DISTRIBUTIONS)), None)


def needs_legacy_keras() -> bool:
    """True unless the installed TensorFlow's own tf.keras is Keras 2 (TF <= 2.15).

    TF 2.15 already reads ``TF_USE_LEGACY_KERAS`` and would then import tf_keras, which its
    environment (Horovod's) does not have: there the variable must stay unset.
    """
    version = installed_tensorflow()
    return version is None or not builtin_keras_2(version)


def legacy_keras_environment() -> dict[str, str]:
    """The environment variables a fresh process needs so that ``tf.keras`` is Keras 2."""
    return {LEGACY_KERAS_ENV: LEGACY_KERAS_VALUE} if needs_legacy_keras() else {}


def keras3_environment(backend: str) -> dict[str, str]:
    """The environment variables a fresh process needs to train with Keras 3 on ``backend`` (e.g. "jax")."""
    return {KERAS_FLAVOUR_ENV: KERAS_3, KERAS_BACKEND_ENV: backend, LEGACY_KERAS_ENV: NOT_LEGACY_KERAS_VALUE}


def is_keras_3_process() -> bool:
    """True in a process the launcher started to train with Keras 3 (a ``jax`` backend rank)."""
    return os.environ.get(KERAS_FLAVOUR_ENV) == KERAS_3


def use_legacy_keras() -> None:
    """Set ``TF_USE_LEGACY_KERAS=1`` for this process; refuse if TensorFlow already decided otherwise.

    Not in a Keras 3 process: there ``tf.keras`` stays Keras 3, like the ``keras`` its code imports.
    """
    if is_keras_3_process():
        return
    if not needs_legacy_keras():
        os.environ.pop(LEGACY_KERAS_ENV, None)  # tf.keras is Keras 2 already; the variable could only break it
        return
    if TENSORFLOW_MODULE in sys.modules and os.environ.get(LEGACY_KERAS_ENV) != LEGACY_KERAS_VALUE:
        raise RuntimeError(
            f"TensorFlow was imported before {LEGACY_KERAS_ENV}={LEGACY_KERAS_VALUE} was set, so tf.keras "
            "is Keras 3, which fails under MultiWorkerMirroredStrategy. Import sparkml_mnist.launcher.keras_flavour "
            f"(or set {LEGACY_KERAS_ENV}={LEGACY_KERAS_VALUE}) before importing tensorflow"
        )
    os.environ[LEGACY_KERAS_ENV] = LEGACY_KERAS_VALUE


def tensorflow() -> ModuleType:
    """``import tensorflow`` with tf_keras as ``tf.keras``; the first call records how long it took."""
    global _import_seconds
    use_legacy_keras()
    if TENSORFLOW_MODULE in sys.modules:
        return sys.modules[TENSORFLOW_MODULE]
    from sparkml_mnist.launcher.tf_notices import quiet_native_notices

    started = time.perf_counter()
    with quiet_native_notices():  # the oneDNN / cpu_feature_guard / cuInit notices come now, not later
        import tensorflow as tf  # noqa: PLC0415 - deferred on purpose: importing costs seconds

        if needs_legacy_keras() and not is_keras_3_process():
            import tf_keras  # noqa: F401, PLC0415 - loads TensorFlow's libraries a second time, with notices

        tf.config.list_physical_devices()  # device discovery: where cuInit fails on a machine without GPUs
    _import_seconds = time.perf_counter() - started
    return tf


def keras() -> ModuleType:
    """The Keras this process trains with, with TensorFlow imported first (Keras 2).

    tf_keras on TensorFlow >= 2.16; TensorFlow's own ``tf.keras`` (Keras 2) on TF <= 2.15. In a
    Keras 3 process: Keras 3 on the backend ``KERAS_BACKEND`` names (TensorFlow is not imported).
    """
    if is_keras_3_process():
        import keras as keras_3_module  # noqa: PLC0415 - Keras 3 reads KERAS_BACKEND now

        return keras_3_module
    tf = tensorflow()
    if builtin_keras_2(tf.__version__):
        return tf.keras
    import tf_keras  # noqa: PLC0415

    return tf_keras


def builtin_keras_2(tensorflow_version: str) -> bool:
    """True when this TensorFlow's own ``tf.keras`` is Keras 2 (TF <= 2.15), so tf_keras is not needed."""
    parts = tensorflow_version.split(".")
    try:
        return (int(parts[0]), int(parts[1])) < KERAS_3_FROM
    except (IndexError, ValueError):
        return False


def is_keras_2(module: ModuleType) -> bool:
    """Whether an imported ``tf_keras`` / ``keras`` module is a Keras 2 (the API this package trains with)."""
    return str(getattr(module, "__version__", "")).startswith("2.")


def import_seconds() -> float | None:
    """Seconds the first ``tensorflow()`` call spent importing TensorFlow (None: not imported through it)."""
    return _import_seconds


# Importing this module is enough to make a later ``import tensorflow`` pick tf_keras.
if TENSORFLOW_MODULE not in sys.modules:
    use_legacy_keras()
