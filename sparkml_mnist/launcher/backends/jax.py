"""Keras 3 on JAX: plain ``model.fit`` data-parallel across the ranks, through Keras's distribution API.

Keras 3's ``fit`` fails under MultiWorkerMirroredStrategy with two or more workers
(keras-team/keras#20585), but on the JAX backend its own distribution API trains across processes
with the user's ``fit`` unchanged. What that needs is done here, from the rank's spec: the driver
half puts ``KERAS_BACKEND=jax`` (and ``TF_USE_LEGACY_KERAS=0``: ``tf.keras`` is Keras 3 too) and
Keras's ``KERAS_DISTRIBUTION_*`` variables in the rank's environment, rank 0's address (the port its
task chose) being JAX's coordinator; the rank half, before the user's function runs, calls
``keras.distribution.initialize()`` and sets ``DataParallel()``: a ``tf.data`` dataset batched by the
GLOBAL batch is then split across the ranks by Keras (every rank runs the whole pipeline and keeps
its share). A function that feeds each rank its own share instead sets
``DataParallel(auto_shard_dataset=False)`` itself; so does ``RankContext.distribute_dataset``.

JAX deadlocks when one rank runs fewer steps than the others, and fails in ``device_put`` when the
ranks' initial weights differ: ``check_steps`` refuses unequal steps before training, and a
per-rank seed gets an error that says so (``benchmarks/RESULTS.md`` and README, "Backends").
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from importlib.util import find_spec
from typing import Any, Callable, ContextManager

from sparkml_mnist.launcher import keras_flavour
from sparkml_mnist.launcher.backends.base import FULL_PRECISION, DatasetMaker, DriverBackend, RankBackend
from sparkml_mnist.launcher.packages import installed_version
from sparkml_mnist.launcher.spec import RankSpec
from sparkml_mnist.errors import ConfigError, LaunchError

NAME = "jax"
KERAS_BACKEND = "jax"
COORDINATOR_RANK = 0
# Keras's own variables for keras.distribution.initialize() (keras/src/distribution/distribution_lib.py)
JOB_ADDRESSES_ENV = "KERAS_DISTRIBUTION_JOB_ADDRESSES"
COORDINATOR_BIND_ENV = "JAX_COORDINATOR_BIND_ADDRESS"  # read by jax.distributed.initialize
NUM_PROCESSES_ENV = "KERAS_DISTRIBUTION_NUM_PROCESSES"
PROCESS_ID_ENV = "KERAS_DISTRIBUTION_PROCESS_ID"
JAX_PLATFORMS_ENV = "JAX_PLATFORMS"
CPU_PLATFORM = "cpu"  # a rank without a GPU of its own: no CUDA probing, no GPU taken by accident
TF_GPU_GROWTH_ENV = "TF_FORCE_GPU_ALLOW_GROWTH"  # TensorFlow (tf.data) beside JAX must not take the GPU's memory
XLA_FLAGS_ENV = "XLA_FLAGS"
ONE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
REQUIRED_MODULES = ("jax", "jaxlib")
KERAS_DISTRIBUTION = "keras"
KERAS_3_MAJOR = 3
SHUTDOWN_WAIT_S = 3.0
UNEQUAL_VALUES_MARK = "passed to device_put is not the same on each process"  # jax/_src/dispatch.py
INSTALL_HINT = (
    'install it with `pip install -e ".[local,jax]"` (CPU; `jax-cuda` instead of `jax` for NVIDIA GPUs), '
    "or use the default backend 'tf'"
)


def jax_problem() -> str | None:
    """Why Keras 3 on JAX cannot run in this environment (None: it can); looks at package metadata only."""
    for module in REQUIRED_MODULES:
        if find_spec(module) is None:
            return f"{module} is not installed"
    version = installed_version(KERAS_DISTRIBUTION)
    if version is None:
        return "Keras 3 is not installed"
    if not version.split(".")[0].isdigit() or int(version.split(".")[0]) < KERAS_3_MAJOR:
        return f"keras is {version}, and the jax backend needs Keras 3"
    return None


def xla_flags(threads: int | None, inherited: str | None) -> str | None:
    """XLA's CPU flags for a rank given ``threads`` cores: one core means one thread (None: leave as is)."""
    if threads != 1:
        return inherited
    return " ".join(filter(None, [inherited, ONE_THREAD_XLA_FLAGS]))


class JaxDriverBackend(DriverBackend):
    name = NAME

    def check_available(self, where: str) -> None:
        problem = jax_problem()
        if problem is not None:
            error = ConfigError if where == "driver" else LaunchError
            raise error(f"backend 'jax' was asked for, but on the {where} {problem}: {INSTALL_HINT}")

    def environment(self, spec: RankSpec) -> dict[str, str]:
        env = {
            **keras_flavour.keras3_environment(KERAS_BACKEND),
            JOB_ADDRESSES_ENV: spec.addresses[COORDINATOR_RANK],  # rank 0 hosts JAX's coordination service
            # ...bound to that address only: JAX's default binds every interface ("[::]:<port>")
            COORDINATOR_BIND_ENV: spec.addresses[COORDINATOR_RANK],
            NUM_PROCESSES_ENV: str(spec.size),
            PROCESS_ID_ENV: str(spec.rank),
        }
        if spec.gpus:
            env[TF_GPU_GROWTH_ENV] = "true"
        else:
            env[JAX_PLATFORMS_ENV] = CPU_PLATFORM
            flags = xla_flags(spec.threads, os.environ.get(XLA_FLAGS_ENV))
            if flags:
                env[XLA_FLAGS_ENV] = flags
        return env


class JaxRankBackend(RankBackend):
    """Inside the rank: Keras 3's distribution, initialised before the user's function runs."""

    def start(self) -> None:
        keras = keras_flavour.keras()
        keras.distribution.initialize()  # from the KERAS_DISTRIBUTION_* variables the launcher set
        import jax  # noqa: PLC0415 - Keras imported it already (KERAS_BACKEND=jax)

        found = (jax.process_index(), jax.process_count())
        if found != (self.spec.rank, self.spec.size):
            raise LaunchError(
                f"JAX says process {found[0]} of {found[1]}, the launcher rank {self.spec.rank} of {self.spec.size}"
            )
        explain_unequal_initial_values(self.spec.rank)
        keras.distribution.set_distribution(keras.distribution.DataParallel())

    def make_strategy(self) -> Any:
        return keras_flavour.keras().distribution.distribution()

    @property
    def strategy(self) -> Any:
        """The Keras distribution in force (``DataParallel``); not cached, since a function may set its own."""
        return self.make_strategy()

    def model_scope(self) -> ContextManager[Any]:
        """The distribution is set for the whole process: variables made anywhere are laid out by it."""
        return contextlib.nullcontext()

    def wrap_optimizer(self, optimizer: Any, allreduce: str = FULL_PRECISION) -> Any:
        """The optimizer as it is: Keras's distribution all-reduces the gradients inside the compiled step."""
        if allreduce != FULL_PRECISION:
            raise LaunchError(f"rank {self.spec.rank}: allreduce={allreduce!r} is not available under the jax "
                              f"backend (XLA compiles its all-reduce); use {FULL_PRECISION!r}")
        return optimizer

    def distribute(self, make_dataset: DatasetMaker, global_batch_size: int) -> Any:
        """This rank's own pipeline of ``B / size`` rows a step; Keras makes the global batch of ``B`` from them.

        The context's datasets hold this rank's share only, so Keras must not split them again: the
        distribution in force (``DataParallel``, or the function's own) stops sharding datasets.
        """
        keras = keras_flavour.keras()
        current = keras.distribution.distribution()
        if current is None:
            keras.distribution.set_distribution(keras.distribution.DataParallel(auto_shard_dataset=False))
        else:
            current.auto_shard_dataset = False
        return make_dataset(global_batch_size // self.spec.size, 1)

    def check_steps(self, steps: int) -> None:
        """Every rank must run the same number of steps, or JAX deadlocks: compare them now, before training."""
        import numpy as np
        from jax.experimental import multihost_utils

        counts = [int(count) for count in np.ravel(multihost_utils.process_allgather(np.int64(steps)))]
        if len(set(counts)) > 1:
            each = ", ".join(f"rank {rank}: {count}" for rank, count in enumerate(counts))
            raise LaunchError(
                f"rank {self.spec.rank}: the ranks would run different numbers of steps ({each}); under the jax "
                "backend that deadlocks, so training was not started. Give every rank the same number of rows "
                "(shard_frame does), or the same steps_per_epoch"
            )

    def shutdown(self) -> None:
        """Leave JAX's coordination service on every rank together (its coordinator lives in rank 0)."""
        jax = sys.modules.get("jax")
        if jax is None:
            return
        done = threading.Thread(target=jax.distributed.shutdown, daemon=True)
        done.start()
        done.join(SHUTDOWN_WAIT_S)  # the parent kills the process anyway if this does not return


def explain_unequal_initial_values(rank: int) -> None:
    """Turn JAX's "not the same on each process" in ``device_put`` into an error that names the usual cause.

    A replicated variable must start from the same value on every rank; JAX checks that when the
    variable is laid out, and otherwise prints both arrays. The check sits in Keras's JAX
    ``distribute_tensor``, which is wrapped here (left alone if a Keras version has moved it).
    """
    try:
        from keras.src.backend.jax import distribution_lib
    except ImportError:
        return
    original: Callable[[Any, Any], Any] = distribution_lib.distribute_tensor
    if getattr(original, "explains_unequal_values", False):
        return

    def distribute_tensor(tensor: Any, layout: Any) -> Any:
        try:
            return original(tensor, layout)
        except AssertionError as error:
            if UNEQUAL_VALUES_MARK not in str(error):
                raise
            raise LaunchError(
                f"rank {rank}: a variable's initial value differs between the ranks, and under the jax backend "
                "every rank must start from the same weights. A seed per rank? Call "
                "keras.utils.set_random_seed(seed) with the same seed on every rank (shuffle each rank's own "
                "data with a seed of its own, e.g. dataset.shuffle(n, seed=seed + rank))"
            ) from None

    distribute_tensor.explains_unequal_values = True  # type: ignore[attr-defined]
    distribution_lib.distribute_tensor = distribute_tensor
