"""The trained model as an MLflow pyfunc: ``mlflow.pyfunc.load_model(uri).predict(raw pixels)`` -> class probabilities.

Logged as "models from code" (MLflow runs this file when it loads the model; nothing is pickled) by
``serving.log_pyfunc``: a thin wrapper, so the model loads with the Keras this package trains with
(``keras_flavour``) in whatever process MLflow loads it. It takes raw pixels (0..255) in every form
``serving.raw_pixel_rows`` reads: a ``pixels`` column of the data stage's 784 bytes or of 784 values a row
(what ``mlflow.pyfunc.spark_udf`` hands it), or images as arrays, and scales them with training's own
function, so its predictions are the ones the report counted.
"""

from __future__ import annotations

import mlflow.models
import mlflow.pyfunc

from sparkml_mnist.job.serving import KERAS_ARTIFACT


class KerasMnistClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):  # noqa: ANN001, ANN201 - MLflow inspects these signatures: no hints
        from sparkml_mnist.config import load_data_spec
        from sparkml_mnist.launcher.keras_flavour import keras

        self._spec = load_data_spec()
        self._model = keras().models.load_model(context.artifacts[KERAS_ARTIFACT], compile=False)

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        """Untyped on purpose: MLflow's type-hint schemas take lists only; the logged signature names ``pixels``."""
        from sparkml_mnist.job.serving import class_probabilities

        return class_probabilities(self._model, model_input, self._spec, source="the model's input")


mlflow.models.set_model(KerasMnistClassifier())
