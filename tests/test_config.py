"""Configuration files load into typed objects; every mistake names the file and the field."""

from __future__ import annotations

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
