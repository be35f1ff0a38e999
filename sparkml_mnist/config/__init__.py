"""Configuration: YAML files in ``conf/`` -> typed, validated objects (one generic loader).

Runtime policy (how many ranks, what fits on them) is not decided here but where ``np`` is parsed
(``sparkml_mnist.job.plan``).
"""

from sparkml_mnist.config.data_spec import DataSpec, load_data_spec
from sparkml_mnist.config.files import default_conf_file, package_folder
from sparkml_mnist.config.loader import from_mapping, load_file, load_yaml, parse_yaml
from sparkml_mnist.config.runs import ALL_VARIANTS, DEFAULT_RUN, SAMPLE_DATA, RunConfig, load_run
from sparkml_mnist.config.variants import (
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    LabReference,
    Layer,
    MaxPooling2D,
    VariantConfig,
    available_variants,
    load_variant,
)

__all__ = [
    "ALL_VARIANTS", "DEFAULT_RUN", "SAMPLE_DATA", "Conv2D", "DataSpec", "Dense", "Dropout", "Flatten",
    "LabReference", "Layer", "MaxPooling2D", "RunConfig", "VariantConfig", "available_variants",
    "default_conf_file", "from_mapping", "load_data_spec", "load_file", "load_run", "load_variant",
    "load_yaml", "package_folder", "parse_yaml",
]
