"""Models built from the variant configs match the lab's architectures and parameter counts."""

from __future__ import annotations

import numpy as np
import pytest

from sparkml_mnist.config import available_variants, load_variant
from sparkml_mnist.errors import ConfigError


@pytest.fixture(scope="module")
def models():
    from sparkml_mnist.training.models import build_model

    return {name: build_model(load_variant(name)) for name in available_variants()}


def test_parameter_counts_match_the_lab(models):
    for name, model in models.items():
        expected = load_variant(name).lab.parameters
        if expected is not None:
            assert model.count_params() == expected, name
    assert models["variant1"].count_params() == 149010
    assert models["variant3"].count_params() == 600810
    assert models["variant4"].count_params() == 600810


def test_models_take_mnist_images_and_output_probabilities(models):
    images = np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)
    for model in models.values():
        probabilities = model.predict(images, verbose=0)
        assert probabilities.shape == (4, 10)
        assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_optimizers_and_layers_follow_the_config(models):
    assert type(models["variant3"].optimizer).__name__ == "Adam"
    assert type(models["variant4"].optimizer).__name__ == "SGD"
    kinds = [type(layer).__name__ for layer in models["variant3"].layers]
    assert kinds == ["Conv2D", "Conv2D", "MaxPooling2D", "Dropout", "Flatten", "Dense", "Dropout", "Dense"]
    assert models["variant1"].layers[0].kernel_size == (4, 4) and models["variant1"].layers[0].filters == 8


def test_keras_is_tf_keras():
    from sparkml_mnist.launcher.keras_flavour import keras

    assert keras().__name__ == "tf_keras"


def test_output_layer_must_be_a_softmax_over_ten_classes(tmp_path):
    from sparkml_mnist.training.models import build_model

    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: bad\nlayers:\n  - {type: flatten}\n  - {type: dense, units: 9, activation: softmax}\n"
        "optimizer: adam\nloss: categorical_crossentropy\nepochs: 1\nbatch_size: 128\nvalidation_split: 0.0\n"
    )
    with pytest.raises(ConfigError, match=f"{path}: the last layer must be dense with units: 10"):
        build_model(load_variant(str(path)))


def test_jit_compile_reaches_the_compiled_model():
    from dataclasses import replace

    from sparkml_mnist.training.models import build_model

    variant = load_variant("variant1")
    assert build_model(variant).jit_compile is False
    assert build_model(replace(variant, jit_compile=True)).jit_compile is True
