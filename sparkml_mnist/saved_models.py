"""Rank 0's trained model on the driver, whichever Keras the ranks trained with.

Keras 2 ranks (``tf``, ``horovod``) send their weights: the driver rebuilds the variant with tf_keras
and saves it. Keras 3 ranks (``jax``) send rank 0's own saved ``.keras`` file: the driver, a Keras 2
process, loads it with Keras 3 (on TensorFlow's backend, beside tf_keras: ``keras_flavour.keras_3``),
so the report evaluates and keeps exactly the model that was trained.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from sparkml_mnist import keras_flavour
from sparkml_mnist.config import VariantConfig

KERAS_3_MODEL = "keras3_model"  # the key of rank 0's saved Keras 3 model (bytes) in its training result
MODEL_FILE_SUFFIX = ".keras"


def keras3_model_bytes(model: Any) -> bytes | None:
    """In a Keras 3 rank: the model as a ``.keras`` file's bytes (None in a Keras 2 rank: weights suffice).

    Saving makes a throw-away optimizer, whose variables the process's distribution would lay out
    across all ranks (a collective that hangs when one rank saves alone); so the distribution is
    lifted while this rank saves.
    """
    if not keras_flavour.is_keras_3_process():
        return None
    distribution = keras_flavour.keras().distribution
    in_force = distribution.distribution()
    distribution.set_distribution(None)
    try:
        with tempfile.TemporaryDirectory(prefix="sparkml-mnist-model-") as folder:
            path = Path(folder) / f"model{MODEL_FILE_SUFFIX}"
            model.save(path)
            return path.read_bytes()
    finally:
        distribution.set_distribution(in_force)


def rank_zero_model(variant: VariantConfig, chief: dict[str, Any], model_file: Path) -> Any:
    """Rank 0's trained model, saved to ``model_file`` and loaded for the driver's evaluation."""
    saved = chief.get(KERAS_3_MODEL)
    if saved:
        model_file.write_bytes(saved)
        model = keras_flavour.keras_3().models.load_model(model_file)
        model.jit_compile = False  # the driver predicts on TensorFlow's backend, where XLA costs on CPU
        return model
    from sparkml_mnist.models import build_model

    model = build_model(variant)
    model.set_weights(chief["weights"])
    model.save(model_file)
    return model
