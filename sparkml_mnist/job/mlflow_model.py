"""The trained model as an MLflow pyfunc: ``mlflow.pyfunc.load_model(uri).predict(images)`` -> class probabilities.

Logged as "models from code" (MLflow runs this file when it loads the model; nothing is pickled): a thin
wrapper, so the model loads with the Keras this package trains with (``keras_flavour``) in whatever
process MLflow loads it; images may come as (n, 28, 28, 1) or as (n, 784) rows.
"""

from __future__ import annotations

import mlflow.models
import mlflow.pyfunc
import numpy as np

KERAS_ARTIFACT = "keras_model"


class KerasMnistClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):  # noqa: ANN001, ANN201 - MLflow inspects these signatures: no hints
        from sparkml_mnist.config import load_data_spec
        from sparkml_mnist.launcher.keras_flavour import keras

        self._shape = load_data_spec().image_shape
        self._model = keras().models.load_model(context.artifacts[KERAS_ARTIFACT], compile=False)

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        """Untyped on purpose: MLflow's type-hint schemas take lists only; the logged signature says (n, 28, 28, 1)."""
        images = np.asarray(model_input, dtype=np.float32).reshape((-1, *self._shape))
        return self._model.predict(images, verbose=0)


mlflow.models.set_model(KerasMnistClassifier())
