"""Variant config -> compiled Keras model (build inside the backend's model scope when distributed).

Keras 2 (tf_keras) in the default backends' ranks and on the driver; Keras 3 in a ``jax`` rank
(``keras_flavour.keras()`` decides): the same layers from the same variant YAML.
"""

from __future__ import annotations

from typing import Any, Callable

from sparkml_mnist.config import Conv2D, DataSpec, Dense, Dropout, Flatten, Layer, MaxPooling2D, VariantConfig
from sparkml_mnist.config import load_data_spec
from sparkml_mnist.errors import ConfigError

ACCURACY_METRIC = "accuracy"
OUTPUT_ACTIVATION = "softmax"
KERAS_3_JIT_COMPILE = "auto"


def _conv2d(keras: Any, layer: Conv2D) -> Any:
    return keras.layers.Conv2D(
        filters=layer.filters, kernel_size=layer.kernel_size, strides=layer.strides, padding=layer.padding,
        activation=layer.activation,
    )


def _max_pooling2d(keras: Any, layer: MaxPooling2D) -> Any:
    return keras.layers.MaxPooling2D(pool_size=layer.pool_size, strides=layer.strides, padding=layer.padding)


def _dropout(keras: Any, layer: Dropout) -> Any:
    return keras.layers.Dropout(rate=layer.rate)


def _flatten(keras: Any, layer: Flatten) -> Any:
    return keras.layers.Flatten()


def _dense(keras: Any, layer: Dense) -> Any:
    return keras.layers.Dense(units=layer.units, activation=layer.activation)


LAYER_BUILDERS: dict[type, Callable[[Any, Any], Any]] = {
    Conv2D: _conv2d,
    MaxPooling2D: _max_pooling2d,
    Dropout: _dropout,
    Flatten: _flatten,
    Dense: _dense,
}


def check_output_layer(variant: VariantConfig, spec: DataSpec) -> None:
    """The last layer must be a softmax over the classes, or the loss and metrics mean nothing."""
    last: Layer = variant.layers[-1]
    if not isinstance(last, Dense) or last.units != spec.num_classes or last.activation != OUTPUT_ACTIVATION:
        raise ConfigError(
            f"{variant.source}: the last layer must be dense with units: {spec.num_classes} and "
            f"activation: {OUTPUT_ACTIVATION}, got {last}"
        )


def build_model(
    variant: VariantConfig, spec: DataSpec | None = None, wrap_optimizer: Callable[[Any], Any] | None = None
) -> Any:
    """The variant's Sequential model, compiled with its optimizer, loss and accuracy.

    ``wrap_optimizer``: what a backend does to the optimizer (Horovod's DistributedOptimizer).
    """
    from sparkml_mnist.launcher.keras_flavour import is_keras_3_process, keras as keras_module

    spec = spec or load_data_spec()
    check_output_layer(variant, spec)
    keras = keras_module()
    model = keras.Sequential(
        [keras.Input(shape=spec.image_shape)] + [LAYER_BUILDERS[type(layer)](keras, layer) for layer in variant.layers],
        name=variant.name,
    )
    optimizer = keras.optimizers.get(variant.optimizer)
    if wrap_optimizer is not None:
        optimizer = wrap_optimizer(optimizer)
    # jit_compile is TensorFlow's XLA switch; Keras 3 on JAX always compiles with XLA ("auto").
    jit_compile = KERAS_3_JIT_COMPILE if is_keras_3_process() else variant.jit_compile
    model.compile(optimizer=optimizer, loss=variant.loss, metrics=[ACCURACY_METRIC], jit_compile=jit_compile)
    return model
