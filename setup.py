"""sparkml_mnist: the Keras MNIST lab's ConvNets trained data-parallel on Apache Spark."""

import ast
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_version() -> str:
    """``__version__`` from the package's __init__.py, read without running it.

    Running it would import the package, which is not on the path of an isolated (PEP 517) build.
    """
    tree = ast.parse((HERE / "sparkml_mnist" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError("sparkml_mnist/__init__.py defines no __version__")


# Each pin once; the extras below combine them. TensorFlow (CPU or GPU build) and tf_keras share one
# major.minor: the job refuses a tf_keras that does not match TensorFlow's.
SPARK_RANGE = ">=4.0,<4.4"
TENSORFLOW_RANGE = ">=2.21,<2.22"
PYSPARK = f"pyspark{SPARK_RANGE}"
PANDAS = "pandas>=2.2,<3"  # pyspark 4.3 warns that pandas 3 is not yet supported
TENSORFLOW_CPU = f"tensorflow-cpu{TENSORFLOW_RANGE}"
TENSORFLOW_GPU = f"tensorflow[and-cuda]{TENSORFLOW_RANGE}"  # with the CUDA and cuDNN wheels it was built against
TF_KERAS = f"tf-keras{TENSORFLOW_RANGE}"
VENV_PACK = "venv-pack>=0.2,<0.3"
MLFLOW = "mlflow>=3.10,<3.18"
# The `jax` backend (Keras 3 on JAX, CPU); TensorFlow stays beside it for tf.data. `jax-cuda`: NVIDIA GPUs.
KERAS_3 = "keras>=3.15,<3.16"
JAX_CPU = ["jax[cpu]>=0.10.2,<0.11", KERAS_3]
JAX_CUDA = ["jax[cuda12]>=0.10.2,<0.11", KERAS_3]

setup(
    name="sparkml-mnist",
    version=read_version(),
    description="Distributed training of the Keras MNIST lab's ConvNets on Apache Spark",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["sparkml_mnist", "sparkml_mnist.*"]) + ["sparkml_mnist.conf"],
    # The repository's top-level conf/ ships inside the package, so a wheel on a cluster has it.
    package_dir={"sparkml_mnist.conf": "conf"},
    package_data={
        "sparkml_mnist.conf": ["*.yaml", "*/*.yaml", "*.properties"],
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
        "local": [PYSPARK, PANDAS, TENSORFLOW_CPU, TF_KERAS],  # a laptop or CI: Spark and TensorFlow from pip
        # What executors need on a cluster that brings its own Spark (scripts/pack_env.py packs one of these).
        "cpu": [PANDAS, TENSORFLOW_CPU, TF_KERAS],
        "gpu": [PANDAS, TENSORFLOW_GPU, TF_KERAS],  # never beside cpu/local: both install the tensorflow module
        "pack": [VENV_PACK],
        # MLflow tracking (sparkml-mnist train --mlflow, or MLFLOW_TRACKING_URI): the index serves up to 3.17.
        "mlflow": [MLFLOW],
        "test": [
            "pytest>=8,<10",
            "pytest-xdist>=3.6,<4",  # two workers (pytest.ini): one waits on a JVM or a subprocess while the other runs
            f"pyspark[connect]{SPARK_RANGE}",  # the Spark Connect client, for tests/test_connect.py
            "jsonschema>=4.20,<5",
            "regex>=2024.4",
            MLFLOW,  # tests/test_observability.py runs a tracking server
            VENV_PACK,  # tests/test_cluster.py ships a packed environment
            *JAX_CPU,  # CI runs the jax backend's tests
        ],
        "jax": JAX_CPU,
        "jax-cuda": JAX_CUDA,
    },
    entry_points={"console_scripts": ["sparkml-mnist=sparkml_mnist.cli.commands:main"]},
)
