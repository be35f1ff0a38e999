"""The ``horovod`` backend, run inside the Horovod environment (TF 2.15 + Horovod 0.28.1 with Gloo).

Collected only when ``SPARKML_MNIST_HOROVOD_SUITE=1`` (tests/conftest.py): tests/test_horovod.py
builds that environment with scripts/make_horovod_env.sh and runs this folder with its python.
The functions below are what a user would write (HorovodRunner style); they are pickled by value.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pyspark import cloudpickle

from sparkml_mnist.launcher import keras_flavour
from sparkml_mnist.config import load_run
from sparkml_mnist.launcher import HorovodRunner, get_context
from sparkml_mnist.launcher.policy import FailurePolicy
from sparkml_mnist.launcher.backends.horovod import horovod_slot
from sparkml_mnist.launcher.failures import RankFailedError, RankStalledError
from sparkml_mnist.job.run import run_job
from sparkml_mnist.job.versions import check_versions

cloudpickle.register_pickle_by_value(sys.modules[__name__])

SLEEP_FOREVER_S = 600  # "forever" for a test: the run must end long before
STALL_TIMEOUT_S = 8.0
SAMPLE_STEPS_PER_EPOCH = 5_400 // 128  # the sample's 6,000 rows, 10% held out, global batch 128: as under tf


# -- what the ranks run ---------------------------------------------------------------------------


def allreduce_main() -> dict[str, Any]:
    """HorovodRunner style: plain Horovod, no context parameter."""
    import horovod.tensorflow as hvd
    import tensorflow as tf

    hvd.init()
    total = hvd.allreduce(tf.constant(float(hvd.rank() + 1)), op=hvd.Sum)
    gathered = hvd.allgather(tf.constant([hvd.rank() * 10], dtype=tf.int32))
    return {
        "rank": hvd.rank(), "size": hvd.size(), "local_rank": hvd.local_rank(), "local_size": hvd.local_size(),
        "cross_rank": hvd.cross_rank(), "cross_size": hvd.cross_size(), "sum": float(total),
        "gathered": gathered.numpy().tolist(), "pid": os.getpid(),
        "legacy_keras_env": os.environ.get("TF_USE_LEGACY_KERAS"),
        "rendezvous": (os.environ.get("HOROVOD_GLOO_RENDEZVOUS_ADDR"), os.environ.get("HOROVOD_GLOO_RENDEZVOUS_PORT")),
    }


def keras_horovod_main(steps: int) -> dict[str, Any]:
    """The usual HorovodRunner Keras function: wrap the optimizer, broadcast rank 0's initial weights.

    Each rank starts from different random weights and trains on different data, so only the
    broadcast and the all-reduced gradients can make the final weights equal.
    """
    import horovod.tensorflow.keras as hvd
    import tensorflow as tf

    from sparkml_mnist import LogCallback

    hvd.init()
    tf.keras.utils.set_random_seed(100 + hvd.rank())
    model = tf.keras.Sequential([
        tf.keras.layers.Input((28, 28, 1)), tf.keras.layers.Flatten(), tf.keras.layers.Dense(10, activation="softmax"),
    ])
    initial = [w.copy() for w in model.get_weights()]
    optimizer = hvd.DistributedOptimizer(tf.keras.optimizers.Adam(0.01))
    model.compile(optimizer=optimizer, loss="categorical_crossentropy", metrics=["accuracy"])
    rng = np.random.default_rng(hvd.rank())
    x = rng.random((steps * 16, 28, 28, 1), dtype=np.float32)
    y = tf.keras.utils.to_categorical(rng.integers(0, 10, steps * 16), 10)
    history = model.fit(
        x, y, batch_size=16, epochs=2, verbose=0,
        callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0), hvd.callbacks.MetricAverageCallback(),
                   LogCallback()],  # sparkdl's: epoch logs to the driver, every batch counted as progress
    )
    return {"weights": model.get_weights(), "initial": initial, "history": history.history,
            "keras": sys.modules["keras"].__version__}


def allreduce_and_keras_main(steps: int) -> dict[str, Any]:
    """Both programs in one launch (each rank imports TensorFlow and joins Gloo once, the costly part)."""
    return {"allreduce": allreduce_main(), "keras": keras_horovod_main(steps)}


def failing_main() -> None:
    import horovod.tensorflow as hvd
    import tensorflow as tf

    hvd.init()
    if hvd.rank() == 1:
        raise ValueError("rank one broke on purpose")
    hvd.allreduce(tf.constant(1.0))  # blocks: rank 1 never joins
    time.sleep(SLEEP_FOREVER_S)


def hanging_main() -> None:
    import horovod.tensorflow as hvd
    import tensorflow as tf

    context = get_context()
    hvd.init()
    context.report()
    if hvd.rank() == 1:
        time.sleep(SLEEP_FOREVER_S)  # hangs before its next collective
    context.report()
    hvd.allreduce(tf.constant(1.0))  # rank 0 waits here for rank 1, for ever
    time.sleep(SLEEP_FOREVER_S)


# -- tests ------------------------------------------------------------------------------------------


def test_this_is_the_horovod_environment() -> None:
    import horovod

    tf = keras_flavour.tensorflow()
    assert horovod.__version__ == "0.28.1" and tf.__version__.startswith("2.15.")
    import keras  # the keras 2.15 package that TF 2.15's tf.keras is

    assert keras_flavour.keras() is tf.keras and keras.__version__.startswith("2.15")
    assert keras_flavour.keras().Model is keras.Model
    assert "TF_USE_LEGACY_KERAS" not in os.environ  # TF 2.15 would then look for tf_keras
    assert [check.problem for check in check_versions() if check.problem] == []  # a tested environment


KERAS_STEPS = 8


@pytest.fixture(scope="module")
def barrier_records(spark) -> list[Any]:
    """np=2 in barrier tasks: the all-reduce program, then the Keras one (``allreduce_and_keras_main``)."""
    return HorovodRunner(np=2, spark=spark, backend="horovod").run_all(allreduce_and_keras_main, steps=KERAS_STEPS).records


@pytest.mark.parametrize("np_", [2, -2], ids=["barrier", "driver"])
def test_allreduce_across_two_ranks(spark, request, np_: int) -> None:
    if np_ > 0:
        values = [record.value["allreduce"] for record in request.getfixturevalue("barrier_records")]
    else:
        values = [record.value for record in HorovodRunner(np=np_, spark=spark, backend="horovod").run_all(allreduce_main).records]
    assert [v["rank"] for v in values] == [0, 1] and all(v["size"] == 2 for v in values)
    assert [v["sum"] for v in values] == [3.0, 3.0]
    assert [v["gathered"] for v in values] == [[0, 10], [0, 10]]
    # One host: both ranks are local to it, each the only one of its local rank across hosts.
    assert [(v["local_rank"], v["local_size"], v["cross_rank"], v["cross_size"]) for v in values] == [
        (0, 2, 0, 1), (1, 2, 0, 1),
    ]
    assert values[0]["pid"] != values[1]["pid"] and {v["legacy_keras_env"] for v in values} == {None}
    # Gloo met through each rank's own signing proxy on loopback, not through the driver's store directly.
    assert {v["rendezvous"][0] for v in values} == {"127.0.0.1"}
    assert len({v["rendezvous"][1] for v in values}) == 2


def test_placement_agrees_with_horovods_host_assignment() -> None:
    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts

    for layout in ["a:1,b:1", "a:2,b:2", "a:2,b:1", "a:3,b:1,c:2"]:
        slots = get_host_assignments(parse_hosts(layout), sum(int(h.split(":")[1]) for h in layout.split(",")))
        hosts = [slot.hostname for slot in slots]
        for slot in slots:
            mine = horovod_slot(hosts, slot.rank)
            assert (mine.local_rank, mine.local_size, mine.cross_rank, mine.cross_size) == (
                slot.local_rank, slot.local_size, slot.cross_rank, slot.cross_size,
            ), (layout, slot.rank)


def test_a_horovodrunner_style_keras_function_ends_with_identical_weights(barrier_records) -> None:
    records = barrier_records
    first, second = (record.value["keras"] for record in records)
    assert first["keras"].startswith("2.15")
    assert not all(np.allclose(a, b) for a, b in zip(first["initial"], second["initial"]))  # different starts
    for mine, theirs in zip(first["weights"], second["weights"]):
        np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-7)
    assert not all(np.allclose(a, b) for a, b in zip(first["weights"], first["initial"]))  # it trained
    assert first["history"] == second["history"]  # MetricAverageCallback: the same averaged metrics
    assert records[0].steps == records[1].steps == 2 * KERAS_STEPS  # LogCallback counted every Keras batch


def test_the_jobs_variant1_runs_end_to_end_with_horovod(spark, tmp_path: Path) -> None:
    run = load_run("sample").with_overrides(
        variants="variant1", np=2, epochs=2, output=str(tmp_path / "report"), backend="horovod",
    )
    folder = run_job(spark, run)
    report = json.loads((folder / "report.json").read_text())
    variant = report["variants"][0]
    ranks = variant["rank_records"]
    assert report["config"]["run"]["backend"] == "horovod"
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["pid"] != ranks[1]["pid"]
    # The same global-batch semantics as tf: 64 rows per rank and step, the same steps per epoch.
    assert [r["steps_per_epoch"] for r in ranks] == [SAMPLE_STEPS_PER_EPOCH] * 2
    assert [r["steps"] for r in ranks] == [2 * SAMPLE_STEPS_PER_EPOCH] * 2
    assert ranks[0]["history"] == ranks[1]["history"]  # metrics averaged over ranks
    assert set(ranks[0]["history"]) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert variant["test"]["accuracy"] > 0.8  # 2 epochs on 5,400 images: ~88% measured
    for name in ("report.md", "variant1-loss.png", "variant1-confusion.png", "comparison.png"):
        assert (folder / name).stat().st_size > 0


def test_a_raising_rank_ends_the_run_naming_it(spark) -> None:
    with pytest.raises(RankFailedError) as caught:
        HorovodRunner(np=2, spark=spark, backend="horovod", policy=FailurePolicy(max_retries=0)).run(failing_main)
    assert caught.value.rank == 1
    assert str(caught.value).startswith(f"rank 1 on {caught.value.host} failed: ValueError: rank one broke on purpose")


def test_a_hanging_rank_ends_the_run_naming_it(spark) -> None:
    runner = HorovodRunner(np=2, spark=spark, backend="horovod", policy=FailurePolicy(progress_timeout_s=STALL_TIMEOUT_S, max_retries=0))
    with pytest.raises(RankStalledError) as caught:
        runner.run(hanging_main)
    assert caught.value.ranks == [1] and "no progress" in caught.value.reason
