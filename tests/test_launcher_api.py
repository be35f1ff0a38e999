"""The launcher as a user meets it: any DataFrame (nothing MNIST about it), and sparkdl's HorovodRunner API.

The functions below are what a user would write; they are pickled by value (as a notebook's would
be), since the ranks' fresh processes cannot import this test module.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pyspark import cloudpickle

from sparkml_mnist import HorovodRunner, get_context, log_to_driver
from sparkml_mnist.launcher import Checkpoint
from rank_logs import rank_lines
from sparkml_mnist.launcher.driver.watchdog import Watchdog
from sparkml_mnist.launcher.policy import FailurePolicy
from sparkml_mnist.launcher.protocol import Heartbeat
from sparkml_mnist.errors import ConfigError

cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROWS = 10
EPOCHS, STEPS = 2, 3


# -- what the ranks run ---------------------------------------------------------------------------


def partition_main(context: Any) -> dict[str, Any]:
    """A user's function: read this rank's partition as Arrow, all-reduce a sum over the ranks."""
    import tensorflow as tf

    table = context.partition()
    mine = float(sum(table.column("value").to_pylist()))
    strategy = context.strategy
    total = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(mine)), axis=None)
    return {"ids": table.column("id").to_pylist(), "words": table.column("word").to_pylist(),
            "columns": table.column_names, "total": float(total.numpy()), "cores": sorted(os.sched_getaffinity(0))}


def chatty_main() -> None:
    print("printed by the rank", flush=True)
    log_to_driver("logged by the rank")


def keras_main(per_batch_log: bool) -> int:
    """A HorovodRunner-style Keras function with sparkdl's LogCallback."""
    import numpy as np
    import tensorflow as tf

    from sparkml_mnist import LogCallback

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = tf.keras.Sequential([tf.keras.layers.Input((4,)), tf.keras.layers.Dense(2, activation="softmax")])
        model.compile(optimizer="sgd", loss="categorical_crossentropy")
    x = np.random.default_rng(0).random((STEPS * 8, 4), dtype=np.float32)
    y = np.eye(2, dtype=np.float32)[np.arange(STEPS * 8) % 2]
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
    model.fit(data, epochs=EPOCHS, steps_per_epoch=STEPS, verbose=0, callbacks=[LogCallback(per_batch_log)])
    return 0


def quiet_main(seconds: float) -> str:
    time.sleep(seconds)  # a custom loop that never reports progress, alive all along
    return "done"


def resuming_main(epochs: int, flag: str) -> int:
    """Rank 0 checkpoints every epoch; in the first attempt rank 1 fails once rank 0 checkpointed epoch 2."""
    context = get_context()
    last = context.latest_checkpoint()
    start = last.epoch if last is not None else 0
    assert last is None or last.data == f"after {start}".encode()
    for epoch in range(start, epochs):
        if context.rank == 0:
            context.report(metrics={"epoch": epoch + 1}, checkpoint=Checkpoint(epoch + 1, f"after {epoch + 1}".encode()))
            if context.attempt == 1 and epoch + 1 == 2:
                Path(flag).touch()
                time.sleep(60)  # until the failed attempt is stopped
        elif context.attempt == 1:
            while not os.path.exists(flag):
                time.sleep(0.05)
            raise ValueError("rank 1 fails once")
    return start


# -- tests ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def words(spark):
    """A user's own DataFrame, two partitions: rows 0-4 and rows 5-9."""
    rows = [(i, f"word{i}", i / 2) for i in range(ROWS)]
    return spark.sparkContext.parallelize(rows, 2).toDF("id long, word string, value double")


@pytest.mark.parametrize("np_", [2, -2], ids=["barrier", "driver"])
def test_a_users_own_dataframe_reaches_each_rank_as_its_partition(words, np_: int) -> None:
    records = HorovodRunner(np=np_, data=words).run_all(partition_main).records
    values = [record.value for record in records]
    assert [value["ids"] for value in values] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert values[1]["words"] == ["word5", "word6", "word7", "word8", "word9"]
    assert all(value["columns"] == ["id", "word", "value"] for value in values)
    assert all(value["total"] == sum(i / 2 for i in range(ROWS)) for value in values)
    machine = sorted(os.sched_getaffinity(0))
    if len(machine) == 2:  # local[2] and the driver split this machine's two cores: one each, kept
        assert [value["cores"] for value in values] == [[machine[0]], [machine[1]]]
    elif np_ > 0:  # two 1-core tasks leave the other cores free: the scheduler places them
        assert all(value["cores"] == machine for value in values)


def test_a_dataframe_without_one_partition_per_rank_is_refused_before_anything_runs(words) -> None:
    with pytest.raises(ConfigError, match=r"has 1 partitions but np=2: .*repartition\(2\)"):
        HorovodRunner(np=2, data=words.coalesce(1))


@pytest.mark.parametrize("np_", [2, -2], ids=["barrier", "driver"])
@pytest.mark.parametrize(
    ("verbosity", "expected"),
    [("log_callback_only", ["logged by the rank"]), ("all", ["logged by the rank", "printed by the rank"])],
)
def test_driver_log_verbosity_decides_what_reaches_the_driver(spark, np_: int, verbosity: str, expected) -> None:
    with rank_lines() as lines:
        HorovodRunner(np=np_, spark=spark, driver_log_verbosity=verbosity).run(chatty_main)
    for rank in (0, 1):
        assert sorted(line for r, line in lines if r == rank and "by the rank" in line) == expected


def test_log_callback_streams_rank_zeros_epochs_and_counts_every_batch(spark) -> None:
    with rank_lines() as lines:
        records = HorovodRunner(np=2, spark=spark).run_all(keras_main, per_batch_log=True).records
    epoch_lines = [line for rank, line in lines if line.startswith("epoch ") and "batch" not in line]
    assert {rank for rank, _ in lines} == {0} and len(epoch_lines) == EPOCHS
    assert epoch_lines[0].startswith("epoch 1: loss ") and epoch_lines[1].startswith("epoch 2: loss ")
    assert sum(1 for _, line in lines if " batch " in line) == EPOCHS * STEPS
    assert [record.steps for record in records] == [EPOCHS * STEPS] * 2  # progress, for the watchdog
    # An epoch's last batch logs the epoch's running mean: the same loss, not tf_keras's sum over ranks.
    last_batches = [line for _, line in lines if f" batch {STEPS}: " in line]
    assert [line.split("loss ")[1].split()[0] for line in last_batches] == \
        [line.split("loss ")[1].split()[0] for line in epoch_lines]


def test_a_function_that_never_reports_progress_is_judged_by_heartbeats_only(spark) -> None:
    runner = HorovodRunner(np=-2, spark=spark, policy=FailurePolicy(progress_timeout_s=2.0, heartbeat_interval_s=0.5))
    assert runner.run(quiet_main, seconds=5.0) == "done"


def test_the_progress_rule_arms_once_a_rank_reports() -> None:
    clock = [0.0]
    monitor = Watchdog(size=2, timeout_s=10.0, clock=lambda: clock[0])
    for second in range(40):  # heartbeats, no progress reported: never judged on progress
        clock[0] = float(second)
        monitor.heartbeat(0, Heartbeat(progress=0))
        monitor.heartbeat(1, Heartbeat(progress=0))
        assert monitor.check() is None
    monitor.heartbeat(0, Heartbeat(progress=1))  # rank 0 reports once, then nobody moves
    for second in range(40, 60):
        clock[0] = float(second)
        monitor.heartbeat(0, Heartbeat(progress=1))
        monitor.heartbeat(1, Heartbeat(progress=0))
    verdict = monitor.check()
    assert verdict is not None and verdict.ranks == [1] and "no progress" in verdict.reason


@pytest.mark.parametrize("where", ["driver", "checkpoint_dir"])
def test_a_retry_resumes_from_rank_zeros_checkpoint_on_the_drivers_disk_or_in_checkpoint_dir(tmp_path, monkeypatch,
                                                                                           where) -> None:
    monkeypatch.setenv("SPARK_LOCAL_DIRS", str(tmp_path / "local"))
    heard: list[tuple[int, bytes, str]] = []  # read as it is reported: the previous one goes once the next is in

    def on_report(key: str, rank: int, metrics: dict, checkpoint: Checkpoint | None) -> None:
        if checkpoint is not None:
            heard.append((checkpoint.epoch, checkpoint.data, str(checkpoint.location)))

    runner = HorovodRunner(np=-2, checkpoint_dir=tmp_path / "ckpt" if where == "checkpoint_dir" else None,
                           policy=FailurePolicy(max_retries=1), on_report=on_report)
    result = runner.run_all(resuming_main, epochs=3, flag=str(tmp_path / "flag"))
    assert [attempt.outcome for attempt in result.attempts] == ["failed", "succeeded"]
    assert result.attempts[1].resumed_from == {"": 2} and result.value == 2
    assert [(epoch, data) for epoch, data, _ in heard] == [(1, b"after 1"), (2, b"after 2"), (3, b"after 3")]
    kept_in = tmp_path / ("ckpt" if where == "checkpoint_dir" else "local")
    assert all(kept_in in Path(location).parents for _, _, location in heard)
    if where == "checkpoint_dir":  # written there by rank 0, kept for whoever runs it next
        assert sorted(p.name for p in kept_in.iterdir()) == ["epoch-000003.ckpt", "epoch-000003.json"]
    else:  # the driver's own folder, known to this run only, goes with it
        assert list(kept_in.iterdir()) == []


def test_np_is_keyword_only_and_the_verbosity_is_sparkdls() -> None:
    with pytest.raises(TypeError):
        HorovodRunner(2)  # type: ignore[misc]
    with pytest.raises(ConfigError, match="driver_log_verbosity must be one of log_callback_only, all"):
        HorovodRunner(np=-1, driver_log_verbosity="loud")
