"""The one place that decides which Keras this package (and every training rank) imports.

Keras 3 (``import keras``, and ``tf.keras`` on TF >= 2.16) breaks in ``model.fit`` under
MultiWorkerMirroredStrategy with two or more workers (keras-team/keras#20585); tf_keras works.
TensorFlow reads ``TF_USE_LEGACY_KERAS`` once, when it is first imported, to decide what
``tf.keras`` is; so the variable must be set before anything imports TensorFlow. Import Keras
through ``keras()`` here, never ``import keras``.
"""

from __future__ import annotations

import os
import sys
import time
from types import ModuleType

LEGACY_KERAS_ENV = "TF_USE_LEGACY_KERAS"
LEGACY_KERAS_VALUE = "1"
TENSORFLOW_MODULE = "tensorflow"
LEGACY_KERAS_MODULE = "tf_keras"

_import_seconds: float | None = None


def legacy_keras_environment() -> dict[str, str]:
    """The environment variables a fresh process needs so that ``tf.keras`` is tf_keras."""
    return {LEGACY_KERAS_ENV: LEGACY_KERAS_VALUE}


def use_legacy_keras() -> None:
    """Set ``TF_USE_LEGACY_KERAS=1`` for this process; refuse if TensorFlow already decided otherwise."""
    if TENSORFLOW_MODULE in sys.modules and os.environ.get(LEGACY_KERAS_ENV) != LEGACY_KERAS_VALUE:
        raise RuntimeError(
            f"TensorFlow was imported before {LEGACY_KERAS_ENV}={LEGACY_KERAS_VALUE} was set, so tf.keras "
            "is Keras 3, which fails under MultiWorkerMirroredStrategy. Import sparkml_mnist.keras_flavour "
            f"(or set {LEGACY_KERAS_ENV}={LEGACY_KERAS_VALUE}) before importing tensorflow"
        )
    os.environ[LEGACY_KERAS_ENV] = LEGACY_KERAS_VALUE


def tensorflow() -> ModuleType:
    """``import tensorflow`` with tf_keras as ``tf.keras``; the first call records how long it took."""
    global _import_seconds
    use_legacy_keras()
    if TENSORFLOW_MODULE in sys.modules:
        return sys.modules[TENSORFLOW_MODULE]
    started = time.perf_counter()
    import tensorflow as tf  # noqa: PLC0415 - deferred on purpose: importing costs seconds

    _import_seconds = time.perf_counter() - started
    return tf


def keras() -> ModuleType:
    """The Keras this package trains with: tf_keras (Keras 2 API), with TensorFlow imported first."""
    tensorflow()
    import tf_keras  # noqa: PLC0415

    return tf_keras


def import_seconds() -> float | None:
    """Seconds the first ``tensorflow()`` call spent importing TensorFlow (None: not imported through it)."""
    return _import_seconds


# Importing this module is enough to make a later ``import tensorflow`` pick tf_keras.
if TENSORFLOW_MODULE not in sys.modules:
    use_legacy_keras()
