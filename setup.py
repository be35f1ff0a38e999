"""sparkml_mnist: the Keras MNIST lab's ConvNets trained data-parallel on Apache Spark."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
# Read, not executed: the package's __init__ imports the package itself, which a clean build cannot import.
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "sparkml_mnist" / "__init__.py").read_text(), re.M).group(1)

# The `jax` backend (Keras 3 on JAX, CPU); TensorFlow stays beside it for tf.data. `jax-cuda`: NVIDIA GPUs.
JAX_CPU = ["jax[cpu]>=0.10.2,<0.11", "keras>=3.15,<3.16"]
JAX_CUDA = ["jax[cuda12]>=0.10.2,<0.11", "keras>=3.15,<3.16"]

setup(
    name="sparkml-mnist",
    version=VERSION,
    description="Distributed training of the Keras MNIST lab's ConvNets on Apache Spark",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["sparkml_mnist", "sparkml_mnist.*"]) + ["sparkml_mnist.conf"],
    # The repository's top-level conf/ ships inside the package, so a wheel on a cluster has it.
    package_dir={"sparkml_mnist.conf": "conf"},
    package_data={
        "sparkml_mnist.conf": ["*.yaml", "*/*.yaml"],
        "sparkml_mnist.data": ["sample/*.bz2", "sample/SHA256SUMS"],
    },
    # What a Databricks ML runtime already has is only bounded here; Spark and TensorFlow come from
    # the runtime there, and from the `local` extra on a machine without them.
    install_requires=[
        "numpy>=1.23,<3",
        "packaging>=21",
        "pyarrow>=11",
        "PyYAML>=6,<7",
        "scikit-learn>=1.2,<2",
        "matplotlib>=3.6,<4",
    ],
    extras_require={
        "local": [
            "pyspark>=4.0,<4.4",
            "pandas>=2.2,<3",  # pyspark 4.3 warns that pandas 3 is not yet supported
            "tensorflow-cpu>=2.21,<2.22",
            "tf-keras>=2.21,<2.22",
        ],
        "test": [
            "pytest>=8,<10",
            "pyspark[connect]>=4.0,<4.4",  # the Spark Connect client, for tests/test_connect.py
            "jsonschema>=4.20,<5",
            "regex>=2024.4",
            *JAX_CPU,  # CI runs the jax backend's tests
        ],
        "jax": JAX_CPU,
        "jax-cuda": JAX_CUDA,
    },
    entry_points={"console_scripts": ["sparkml-mnist=sparkml_mnist.cli:main"]},
)
