"""Variant config -> compiled Keras 2 model (build inside the backend's model scope when distributed)."""

from __future__ import annotations

from typing import Any, Callable

from sparkml_mnist.config import DataSpec, LayerSpec, VariantConfig, load_data_spec
from sparkml_mnist.errors import ConfigError

ACCURACY_METRIC = "accuracy"
OUTPUT_ACTIVATION = "softmax"


def _conv2d(keras: Any, layer: LayerSpec) -> Any:
    return keras.layers.Conv2D(
        filters=layer.option("filters"),
        kernel_size=layer.option("kernel_size"),
        strides=layer.option("strides", (1, 1)),
        padding=layer.option("padding", "valid"),
        activation=layer.option("activation"),
    )


def _max_pooling2d(keras: Any, layer: LayerSpec) -> Any:
    return keras.layers.MaxPooling2D(
        pool_size=layer.option("pool_size"), strides=layer.option("strides"), padding=layer.option("padding", "valid")
    )


def _dropout(keras: Any, layer: LayerSpec) -> Any:
    return keras.layers.Dropout(rate=layer.option("rate"))


def _flatten(keras: Any, layer: LayerSpec) -> Any:
    return keras.layers.Flatten()


def _dense(keras: Any, layer: LayerSpec) -> Any:
    return keras.layers.Dense(units=layer.option("units"), activation=layer.option("activation"))


LAYER_BUILDERS: dict[str, Callable[[Any, LayerSpec], Any]] = {
    "conv2d": _conv2d,
    "max_pooling2d": _max_pooling2d,
    "dropout": _dropout,
    "flatten": _flatten,
    "dense": _dense,
}


def check_output_layer(variant: VariantConfig, spec: DataSpec) -> None:
    """The last layer must be a softmax over the classes, or the loss and metrics mean nothing."""
    last = variant.layers[-1]
    if last.type != "dense" or last.option("units") != spec.num_classes or last.option("activation") != OUTPUT_ACTIVATION:
        raise ConfigError(
            f"{variant.source}: the last layer must be dense with units: {spec.num_classes} and "
            f"activation: {OUTPUT_ACTIVATION}, got {last.type} {dict(last.options)}"
        )


def build_model(
    variant: VariantConfig, spec: DataSpec | None = None, wrap_optimizer: Callable[[Any], Any] | None = None
) -> Any:
    """The variant's Sequential model, compiled with its optimizer, loss and accuracy.

    ``wrap_optimizer``: what a backend does to the optimizer (Horovod's DistributedOptimizer).
    """
    from sparkml_mnist.keras_flavour import keras as keras_module

    spec = spec or load_data_spec()
    check_output_layer(variant, spec)
    keras = keras_module()
    model = keras.Sequential(
        [keras.Input(shape=spec.image_shape)] + [LAYER_BUILDERS[layer.type](keras, layer) for layer in variant.layers],
        name=variant.name,
    )
    optimizer = keras.optimizers.get(variant.optimizer)
    if wrap_optimizer is not None:
        optimizer = wrap_optimizer(optimizer)
    model.compile(optimizer=optimizer, loss=variant.loss, metrics=[ACCURACY_METRIC], jit_compile=variant.jit_compile)
    return model
