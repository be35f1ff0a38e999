"""Configuration files load into typed objects; every mistake names the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparkml_mnist.config import DataSpec, load_data_spec, load_yaml
from sparkml_mnist.errors import ConfigError

GOOD = {
    "num_features": 784,
    "image_shape": [28, 28, 1],
    "num_classes": 10,
    "max_pixel_value": 255,
    "train_file": "mnist-digits-train.txt",
    "test_file": "mnist-digits-test.txt",
    "databricks_data_dir": "dbfs:/databricks-datasets/mnist-digits/data-001/",
}


def test_shipped_data_conf_loads():
    spec = load_data_spec()
    assert spec == DataSpec.from_mapping(GOOD, "test")
    assert spec.image_shape == (28, 28, 1)


@pytest.mark.parametrize(
    "change,words",
    [
        ({"num_features": -1}, "field 'num_features' must be a positive integer"),
        ({"num_features": "784"}, "field 'num_features' must be int"),
        ({"num_classes": True}, "field 'num_classes' must be int"),
        ({"image_shape": [28, 28]}, "field 'image_shape' must be three positive integers"),
        ({"image_shape": [28, 27, 1]}, "holds 756 values but 'num_features' is 784"),
        ({"colour": "red"}, "unknown field(s) colour"),
        ({"train_file": None}, "field 'train_file' must be str"),
    ],
)
def test_bad_data_spec_names_the_field(change, words):
    settings = {**GOOD, **change}
    with pytest.raises(ConfigError) as caught:
        DataSpec.from_mapping(settings, "conf/data.yaml")
    assert str(caught.value).startswith("conf/data.yaml: ")
    assert words in str(caught.value)


def test_missing_field_is_named():
    settings = dict(GOOD)
    del settings["num_classes"]
    with pytest.raises(ConfigError, match="conf/data.yaml: missing required field 'num_classes'"):
        DataSpec.from_mapping(settings, "conf/data.yaml")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("num_features: 784\nimage_shape: [28, 28\nnum_classes: 10\n")
    with pytest.raises(ConfigError, match=rf"{path}, line \d+: invalid YAML"):
        load_yaml(path)


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_yaml(tmp_path / "nope.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_yaml(listing)


# --- variants --------------------------------------------------------------------------------------

from sparkml_mnist.config import available_variants, load_variant  # noqa: E402

VARIANT = """\
name: variant5
description: a fifth variant, added by this file alone
layers:
  - {type: conv2d, filters: 4, kernel_size: [3, 3], activation: relu}
  - {type: flatten}
  - {type: dense, units: 10, activation: softmax}
optimizer: adam
loss: categorical_crossentropy
epochs: 3
batch_size: 128
validation_split: 0.1
"""


def test_the_four_lab_variants_ship_with_the_lab_settings():
    assert available_variants() == ["variant1", "variant2", "variant3", "variant4"]
    settings = {name: load_variant(name) for name in available_variants()}
    assert [settings[n].epochs for n in available_variants()] == [20, 15, 15, 15]
    assert [settings[n].optimizer for n in available_variants()] == ["adam", "adam", "adam", "sgd"]
    assert [settings[n].validation_split for n in available_variants()] == [0.1, 0.1, 0.0, 0.0]
    assert all(v.batch_size == 128 for v in settings.values())
    assert settings["variant1"].lab_parameters == 149010 and settings["variant3"].lab_parameters == 600810


def test_a_fifth_variant_is_a_yaml_file(tmp_path):
    path = tmp_path / "variant5.yaml"
    path.write_text(VARIANT)
    variant = load_variant(str(path))
    assert variant.name == "variant5" and len(variant.layers) == 3
    assert variant.layers[0].option("kernel_size") == (3, 3)


@pytest.mark.parametrize(
    "old,new,words",
    [
        ("{type: flatten}", "{type: flaten}", "layers[1]: unknown layer type 'flaten'"),
        ("epochs: 3", "epochs: -3", "field 'epochs' must be a positive integer"),
        ("epochs: 3\n", "", "missing required field 'epochs'"),
        ("optimizer: adam", "optimizer: adamw2", "field 'optimizer' is 'adamw2'"),
        ("filters: 4,", "filters: 0,", "layers[0] (conv2d): field 'filters' must be positive"),
        ("kernel_size: [3, 3]", "kernel_size: [3]", "field 'kernel_size' must be two positive integers"),
        ("{type: flatten}", "{type: flatten, units: 3}", "layers[1] (flatten): unknown field(s) units"),
        ("validation_split: 0.1", "validation_split: 1.5", "field 'validation_split' must be in [0, 1)"),
        ("batch_size: 128", "batch_size: many", "field 'batch_size' must be int"),
    ],
)
def test_bad_variant_names_file_and_field(tmp_path, old, new, words):
    path = tmp_path / "bad.yaml"
    assert old in VARIANT
    path.write_text(VARIANT.replace(old, new))
    with pytest.raises(ConfigError) as caught:
        load_variant(str(path))
    assert str(caught.value).startswith(f"{path}: ")
    assert words in str(caught.value)


def test_unknown_variant_name_lists_the_available_ones():
    with pytest.raises(ConfigError, match="unknown variant 'variant9'; available: variant1, variant2"):
        load_variant("variant9")


def test_global_batch_must_split_evenly_across_replicas():
    variant = load_variant("variant1")
    variant.check_replicas(2)
    with pytest.raises(ConfigError, match="field 'batch_size' \\(128\\) is not divisible by the 3 replicas"):
        variant.check_replicas(3)
    assert variant.with_epochs(2).epochs == 2 and variant.with_epochs(None).epochs == 20
    with pytest.raises(ConfigError, match="--epochs must be a positive integer"):
        variant.with_epochs(0)


def test_xla_with_several_ranks_is_refused_where_it_cannot_run():
    from dataclasses import replace

    plain = load_variant("variant3")
    assert plain.jit_compile is False  # the shipped default (benchmarks/RESULTS.md, "XLA")
    plain.check_xla(2, on_gpus=False, backend="tf")
    xla = replace(plain, jit_compile=True)
    xla.check_xla(1, on_gpus=False, backend="tf")  # one rank: no collectives to compile
    xla.check_xla(2, on_gpus=True, backend="tf")  # XLA collectives exist on GPUs
    with pytest.raises(ConfigError, match=r"variant3.yaml: field 'jit_compile' is true, but 2 ranks .* CPU devices"):
        xla.check_xla(2, on_gpus=False, backend="tf")
    with pytest.raises(ConfigError, match="the 'horovod' backend's all-reduce cannot be compiled"):
        xla.check_xla(2, on_gpus=True, backend="horovod")


def test_jit_compile_must_be_a_boolean(tmp_path):
    text = (Path(load_variant("variant1").source).read_text()).replace("jit_compile: false", "jit_compile: maybe")
    path = tmp_path / "variant1.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="field 'jit_compile' must be bool"):
        load_variant(str(path))


def test_run_backend_is_checked_and_overridable():
    from sparkml_mnist.config import load_run

    run = load_run("sample")
    assert run.backend == "tf" and run.with_overrides(backend="horovod").backend == "horovod"
    with pytest.raises(ConfigError, match="field 'backend' is 'mpi'; choose one of tf, horovod"):
        run.with_overrides(backend="mpi")


def test_config_backend_names_are_the_launchers():
    from sparkml_mnist.config import BACKEND_NAMES
    from sparkml_mnist.distributed.backends import BACKENDS

    assert set(BACKEND_NAMES) == set(BACKENDS)
