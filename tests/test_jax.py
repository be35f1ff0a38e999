"""The ``jax`` backend: a plain Keras 3 ``fit`` data-parallel across the ranks, the job under it, its refusals.

The Keras 3 functions below are what a user would write: they import nothing of this project. They
are pickled by value (as a notebook's would be), since the ranks' fresh processes cannot import this
test module.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pyspark import cloudpickle

from sparkml_mnist import HorovodRunner

from sparkml_mnist.cli import commands as cli
from sparkml_mnist.launcher.backends import jax as jax_backend
from sparkml_mnist.launcher.policy import FailurePolicy
from sparkml_mnist.launcher.spec import LaunchSpec, RankSpec
from sparkml_mnist.errors import ConfigError

cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROWS = 512  # per run: a global batch of 32 -> 16 steps an epoch
GLOBAL_BATCH = 32
EPOCHS = 3
FEATURES = 8
SAFETY_TIMEOUT_S = 240.0  # the watchdog ends a run that deadlocked anyway; the refusals must come first


# -- what the ranks run ---------------------------------------------------------------------------


def make_data(rows: int, features: int, seed: int) -> tuple[Any, Any]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    y = np.eye(2, dtype=np.float32)[(x[:, 0] + x[:, 1] > 0).astype(int)]
    return x, y


def build_keras3_model(keras: Any, features: int) -> Any:
    model = keras.Sequential([keras.Input((features,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy", metrics=["accuracy"])
    return model


def global_batch_main(epochs: int) -> dict[str, Any]:
    """Plain Keras 3: a tf.data dataset batched by the GLOBAL batch, the same on every rank; Keras splits it."""
    import os

    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = build_keras3_model(keras, FEATURES)
    x, y = make_data(ROWS, FEATURES, seed=0)
    data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(ROWS, seed=1).batch(GLOBAL_BATCH, drop_remainder=True)
    steps: list[int] = []
    count = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: steps.append(batch))
    history = model.fit(data, epochs=epochs, verbose=0, callbacks=[count])
    return {"weights": model.get_weights(), "loss": history.history["loss"], "steps": len(steps) // epochs,
            "backend": keras.backend.backend(), "tf_keras": tf.keras.__name__,
            "legacy": os.environ.get("TF_USE_LEGACY_KERAS")}


def own_shard_main(epochs: int) -> dict[str, Any]:
    """Plain Keras 3 with auto_shard_dataset=False: each rank fits its own numpy shard (different rows)."""
    import jax
    import keras

    keras.distribution.set_distribution(keras.distribution.DataParallel(auto_shard_dataset=False))
    keras.utils.set_random_seed(0)
    model = build_keras3_model(keras, FEATURES)
    rank, ranks = jax.process_index(), jax.process_count()
    x, y = make_data(ROWS, FEATURES, seed=0)
    mine = slice(rank, None, ranks)  # row i -> rank i % n
    history = model.fit(x[mine], y[mine], batch_size=GLOBAL_BATCH // ranks, epochs=epochs, validation_split=0.25,
                        shuffle=True, verbose=0)
    return {"weights": model.get_weights(), "history": history.history, "first_row": float(x[mine][0, 0])}


def unequal_steps_main(context: Any) -> str:
    """Rank 1 would take one step fewer than rank 0: refused before training starts."""
    steps = 4 - context.rank

    def make(per_replica_batch: int, replicas: int) -> Any:
        raise AssertionError("the dataset must not be built when the steps disagree")

    context.distribute_dataset(make, GLOBAL_BATCH, steps=steps)
    return "trained"


def seed_per_rank_main() -> str:
    import jax
    import keras

    keras.utils.set_random_seed(jax.process_index())  # a seed per rank: each rank's initial weights differ
    build_keras3_model(keras, FEATURES)
    return "built"


# -- tests ------------------------------------------------------------------------------------------


def spec_for(rank: int, size: int = 2, gpus: tuple[str, ...] = (), **changes: Any) -> RankSpec:
    launch = LaunchSpec(**{**dict(size=size, backend="jax", policy=FailurePolicy(), driver_host="127.0.0.1",
                                  driver_port=4000), **changes})
    return launch.for_rank(rank, ["127.0.0.1"] * size, [5000 + i for i in range(size)], list(gpus))


def test_each_rank_is_told_keras3_on_jax_and_rank_zeros_address() -> None:
    env = jax_backend.JaxDriverBackend().environment(spec_for(1, threads=1))
    assert env["KERAS_BACKEND"] == "jax" and env["TF_USE_LEGACY_KERAS"] == "0" and env["SPARKML_MNIST_KERAS"] == "3"
    assert env["KERAS_DISTRIBUTION_JOB_ADDRESSES"] == "127.0.0.1:5000"  # rank 0: JAX's coordinator
    assert env["JAX_COORDINATOR_BIND_ADDRESS"] == "127.0.0.1:5000"  # listening there only, not on every interface
    assert (env["KERAS_DISTRIBUTION_NUM_PROCESSES"], env["KERAS_DISTRIBUTION_PROCESS_ID"]) == ("2", "1")
    assert env["JAX_PLATFORMS"] == "cpu" and "--xla_cpu_multi_thread_eigen=false" in env["XLA_FLAGS"]
    on_gpu = jax_backend.JaxDriverBackend().environment(spec_for(0, gpus=["3"], threads=1))
    assert "JAX_PLATFORMS" not in on_gpu and "XLA_FLAGS" not in on_gpu  # its GPU comes from CUDA_VISIBLE_DEVICES
    assert on_gpu["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"  # tf.data's TensorFlow leaves the GPU's memory to JAX


def test_asking_for_jax_without_it_is_one_line_saying_how_to_install(monkeypatch, capsys) -> None:
    monkeypatch.setattr(jax_backend, "find_spec", lambda name: None)
    with pytest.raises(ConfigError) as caught:
        HorovodRunner(np=-2, backend="jax")
    message = str(caught.value)
    assert message.startswith("backend 'jax' was asked for, but on the driver jax is not installed")
    assert '".[local,jax]"' in message and len(message.splitlines()) == 1
    assert cli.main(["train", "--backend", "jax", "--variant", "variant1", "--epochs", "1"]) == cli.EXIT_USAGE
    assert "backend 'jax' was asked for" in capsys.readouterr().err


def test_jit_compile_is_not_refused_under_jax_which_always_compiles() -> None:
    from dataclasses import replace

    from sparkml_mnist.config import load_variant
    from sparkml_mnist.launcher.placement import Placement
    from sparkml_mnist.job.plan import check_xla

    variant = replace(load_variant("variant1"), jit_compile=True)
    check_xla(variant, Placement(size=2, on_driver=False, backend="jax"), on_gpus=False)
    with pytest.raises(ConfigError, match="jit_compile"):
        check_xla(variant, Placement(size=2, on_driver=False, backend="tf"), on_gpus=False)


def tour_main(context: Any, epochs: int, refusals: bool) -> dict[str, Any]:
    """One launch, several plain Keras 3 programs in a row (each rank's JAX starts once, the costly part):
    global-batch fit, the refusals (unequal steps, a seed per rank) with their messages, own shards with
    auto-sharding off, and a checkpoint round trip. The refusals are raised on every rank together (after
    an all-gather, or JAX's own layout check), so the ranks can go on with the next program."""
    from sparkml_mnist.errors import LaunchError

    found: dict[str, Any] = {"global_batch": global_batch_main(epochs)}
    if context.rank == 0:  # JAX's coordination service runs in rank 0 since the distribution was set up
        import os
        import socket

        from test_security import listeners

        host, port = os.environ["KERAS_DISTRIBUTION_JOB_ADDRESSES"].rsplit(":", 1)
        found["coordinator"] = {"address": socket.gethostbyname(host), "listeners": sorted(listeners(int(port)))}
    if refusals:
        for name, program in (("unequal_steps", lambda: unequal_steps_main(context)), ("seed_per_rank", seed_per_rank_main)):
            try:
                found[name] = program()
            except LaunchError as error:
                found[name] = f"LaunchError: {error}"
        found["checkpoint"] = checkpoint_round_trip_main(context)
    found["own_shard"] = own_shard_main(epochs)  # last: it sets a distribution without auto-sharding
    return found


def launch_tour(spark: Any, np_: int) -> list[dict[str, Any]]:
    """Each rank's values of ``tour_main``; the refusals and the checkpoint round trip only in barrier tasks."""
    runner = HorovodRunner(np=np_, spark=spark, backend="jax", policy=FailurePolicy(progress_timeout_s=SAFETY_TIMEOUT_S))
    return [record.value for record in runner.run_all(tour_main, epochs=EPOCHS, refusals=np_ > 0).records]


@pytest.fixture(scope="module")
def barrier_tour(spark) -> list[dict[str, Any]]:
    return launch_tour(spark, 2)


@pytest.fixture(scope="module")
def driver_tour(spark) -> list[dict[str, Any]]:
    return launch_tour(spark, -2)


@pytest.fixture(params=["barrier", "driver"])
def tour(request) -> list[dict[str, Any]]:
    """Both placements: Spark barrier tasks (np=2) and processes of the driver (np=-2)."""
    return request.getfixturevalue(f"{request.param}_tour")


def test_a_plain_keras3_function_trains_data_parallel(tour) -> None:
    first, second = (rank["global_batch"] for rank in tour)
    assert first["backend"] == "jax" and first["legacy"] == "0" and first["tf_keras"].startswith("keras")
    assert first["steps"] == second["steps"] == ROWS // GLOBAL_BATCH  # global-batch semantics: B rows a step in all
    assert all(np.array_equal(a, b) for a, b in zip(first["weights"], second["weights"]))
    assert first["loss"] == second["loss"] and first["loss"][-1] < first["loss"][0]


def test_own_shards_with_auto_sharding_off_train_together(tour) -> None:
    first, second = (rank["own_shard"] for rank in tour)
    assert first["first_row"] != second["first_row"]  # different rows on each rank...
    assert all(np.array_equal(a, b) for a, b in zip(first["weights"], second["weights"]))  # ...one model
    loss = first["history"]["loss"]
    assert loss[-1] < loss[0] and len(first["history"]["val_loss"]) == EPOCHS


def test_jaxs_coordinator_listens_on_rank_zeros_address_only(tour) -> None:
    """Not on every interface (JAX's default, ``[::]``): JAX_COORDINATOR_BIND_ADDRESS is rank 0's address."""
    coordinator = tour[0]["coordinator"]
    assert coordinator["listeners"] == [coordinator["address"]], coordinator


def test_unequal_steps_are_refused_before_training(barrier_tour) -> None:
    """On every rank, before the dataset is built (``unequal_steps_main`` fails if it is); a rank's
    LaunchError reaching the driver as RankFailedError is the launcher's own test (test_distributed_runner)."""
    for rank in barrier_tour:
        assert re.search(r"LaunchError: rank \d: the ranks would run different numbers of steps \(rank 0: 4, rank 1: 3\)",
                         rank["unequal_steps"]), rank["unequal_steps"]


def test_a_seed_per_rank_is_a_clear_error(barrier_tour) -> None:
    for rank in barrier_tour:
        assert re.search(r"LaunchError: .*initial value differs between the ranks.*same seed on every rank",
                         rank["seed_per_rank"]), rank["seed_per_rank"]


@pytest.fixture(scope="module")
def jax_report(spark, tmp_path_factory) -> Path:
    """variant1 for 2 epochs at np=2 under jax on the bundled sample (42 steps an epoch)."""
    from sparkml_mnist.config import load_run
    from sparkml_mnist.job.run import run_job

    output = tmp_path_factory.mktemp("job") / "jax"
    run = load_run("sample").with_overrides(variants="variant1", np=2, epochs=2, backend="jax", output=str(output))
    return run_job(spark, run)


def test_the_job_trains_keras3_models_under_jax(jax_report: Path) -> None:
    variant = json.loads((jax_report / "report.json").read_text())["variants"][0]
    assert variant["test"]["accuracy"] > 0.8 and variant["test"]["num_examples"] == 1000
    ranks = variant["rank_records"]
    assert [r["steps_per_epoch"] for r in ranks] == [42, 42] and ranks[0]["history"] == ranks[1]["history"]
    assert {"report.md", "variant1-loss.png", "variant1-confusion.png"} <= {p.name for p in jax_report.iterdir()}


def test_the_driver_evaluates_rank_zeros_keras3_weights_in_its_tf_keras_model(spark, jax_report: Path) -> None:
    from sparkml_mnist.launcher import keras_flavour
    from sparkml_mnist.data.libsvm import load_libsvm
    from sparkml_mnist.data.paths import sample_paths
    from sparkml_mnist.data.tensors import collect_tensors

    model = keras_flavour.keras().models.load_model(next(jax_report.rglob("variant1.keras")))
    assert keras_flavour.keras().__name__.startswith("tf_keras")  # the driver's own Keras is unchanged
    x_test, y_test = collect_tensors(load_libsvm(spark, sample_paths().test))
    accuracy = float(np.mean(np.argmax(model.predict(x_test, verbose=0), 1) == np.argmax(y_test, 1)))
    test = json.loads((jax_report / "report.json").read_text())["variants"][0]["test"]
    assert test["accuracy"] == pytest.approx(accuracy, abs=1e-9) and accuracy > 0.8  # trained weights, not fresh ones


def test_half_precision_allreduce_is_refused_under_jax_before_spark_work() -> None:
    from sparkml_mnist.config import load_run
    from sparkml_mnist.job.plan import plan_job

    run = load_run("sample").with_overrides(variants="variant1", np=2, backend="jax", allreduce="float16")
    with pytest.raises(ConfigError, match=r"allreduce: 'float16' is not available under the jax backend"):
        plan_job(run)


def checkpoint_round_trip_main(context: Any) -> dict[str, Any]:
    """In a jax rank: a variant trained one step, packed as rank 0's checkpoint, restored into a fresh model."""
    from sparkml_mnist.launcher import keras_flavour
    from sparkml_mnist.training import state as training_state
    from sparkml_mnist.config import load_variant
    from sparkml_mnist.training.models import build_model

    keras = keras_flavour.keras()
    keras.distribution.distribution().auto_shard_dataset = False  # each rank fits its own arrays
    keras.utils.set_random_seed(0)
    variant = load_variant("variant1")
    rng = np.random.default_rng(0)
    x = rng.random((GLOBAL_BATCH, 28, 28, 1), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, GLOBAL_BATCH)]
    trained = build_model(variant)
    trained.fit(x, y, batch_size=GLOBAL_BATCH // context.size, epochs=1, verbose=0)
    packed = training_state.pack(trained, 1, {"loss": [1.0]}, [0.5])
    restored = build_model(variant)
    training_state.restore(restored, training_state.unpack(packed))
    return {
        "keras": keras.__version__,
        "weights": all(np.array_equal(a, b) for a, b in zip(trained.get_weights(), restored.get_weights())),
        "optimizer": all(np.array_equal(np.asarray(a.numpy()), np.asarray(b.numpy()))
                         for a, b in zip(trained.optimizer.variables, restored.optimizer.variables)),
        "optimizer_variables": len(restored.optimizer.variables),
        "iterations": int(np.asarray(restored.optimizer.iterations.numpy())),
    }


def test_a_checkpoint_restores_a_keras3_model_and_its_optimizer(barrier_tour) -> None:
    """What a retried jax attempt resumes from: weights and the optimizer's step and moments."""
    for rank in barrier_tour:
        value = rank["checkpoint"]
        assert value["keras"].startswith("3.") and value["weights"] and value["optimizer"]
        assert value["iterations"] == 2 and value["optimizer_variables"] > 2  # 32 rows, 16 a step; rate, moments
