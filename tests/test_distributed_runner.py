"""The launcher on local[2] (two barrier tasks) and on the driver alone (np=-2), CPU only.

The functions below are what a user would write; they are pickled by value (as a notebook's
would be), since the ranks' fresh processes cannot import this test module.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pyspark import cloudpickle

from sparkml_mnist.launcher import keras_flavour
from sparkml_mnist.data.libsvm import load_libsvm
from sparkml_mnist.data.shards import shard_frame
from sparkml_mnist.launcher import HorovodRunner, get_context
from sparkml_mnist.launcher.policy import FailurePolicy
from sparkml_mnist.launcher.failures import CRASH, PreflightError, RankFailedError, RankStalledError
from sparkml_mnist.launcher.task.process import OWNER_FILE, sweep_work_folders
from rank_logs import rank_lines

cloudpickle.register_pickle_by_value(sys.modules[__name__])

TRAIN_ROWS = 64
GLOBAL_BATCH = 16
UNEVEN_GLOBAL_BATCH = 160  # a few steps: enough to hang on the third without equal steps
SLEEP_FOREVER_S = 600  # "forever" for a test: the run must end long before
STALL_TIMEOUT_S = 8.0
GONE_WAIT_S = 30.0  # a killed process disappears within this (polled; not a timing assertion)


# -- what the ranks run ---------------------------------------------------------------------------


def all_reduce_main(offset: float, context: Any) -> dict[str, Any]:
    """Sum (rank + 1 + offset) over all ranks with the context's strategy."""
    tf = keras_flavour.tensorflow()
    strategy = context.strategy
    mine = tf.constant(float(context.rank + 1) + offset)
    total = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: mine), axis=None)
    return {"rank": context.rank, "pid": os.getpid(), "sum": float(total.numpy())}


def horovod_style_main(offset: float) -> dict[str, Any]:
    """Written for HorovodRunner: plain tf, tf.keras, its own strategy, no context parameter."""
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    rank = strategy.cluster_resolver.task_id
    total = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(rank + 1.0 + offset)),
                            axis=None)
    return {"rank": rank, "pid": os.getpid(), "sum": float(total.numpy()), "keras": tf.keras.__name__}


def train_main(global_batch: int, context: Any) -> dict[str, Any]:
    """A tiny tf_keras model, one epoch on this rank's shard; also lists the rows its pipeline fed."""
    from sparkml_mnist.launcher.rank.callbacks import ProgressCallback
    from sparkml_mnist.training.inputs import ArrayRows, distributed_dataset, scale_images, shard_rows, steps_per_epoch

    keras = keras_flavour.keras()
    shard = shard_rows(context.partition())
    strategy = context.strategy
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.layers.Input((28, 28, 1)), keras.layers.Flatten(),
                                  keras.layers.Dense(10, activation="softmax")])
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="categorical_crossentropy")
    initial = [w.copy() for w in model.get_weights()]
    steps = steps_per_epoch(len(shard.train), global_batch, context.size)
    train = distributed_dataset(context, shard.train, global_batch, steps, shuffle=True, seed=1,
                                preprocess=scale_images())
    model.fit(train, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[ProgressCallback(context)])
    fed = iter(distributed_dataset(context, ArrayRows((shard.train.rows,)), global_batch, steps))
    seen: list[int] = []
    for _ in range(steps):
        (rows,) = next(fed)
        for local in strategy.experimental_local_results(rows):
            seen.extend(local.numpy().tolist())
    return {
        "weights": model.get_weights(), "initial": initial, "steps": steps,
        "shard_rows": shard.train.rows.tolist(), "seen": seen, "equal_steps": context.equal_steps(global_batch),
    }


def write_pid(pid_dir: str) -> None:
    Path(pid_dir, f"rank{get_context().rank}").write_text(str(os.getpid()))


def failing_main(pid_dir: str) -> None:
    write_pid(pid_dir)
    if get_context().rank == 1:
        raise ValueError("rank one broke on purpose")
    time.sleep(SLEEP_FOREVER_S)  # as if blocked in a collective, waiting for rank 1


def crashing_main(pid_dir: str) -> None:
    write_pid(pid_dir)
    Path(pid_dir, f"workdir{get_context().rank}").write_text(sys.argv[-1])  # the task's folder for this rank
    if get_context().rank == 1:
        deadline = time.monotonic() + GONE_WAIT_S  # crash only once rank 0 has written its folder's name
        while not Path(pid_dir, "workdir0").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        sys.stderr.write("rank one about to crash\n")
        sys.stderr.flush()
        os._exit(7)
    time.sleep(SLEEP_FOREVER_S)


def stalling_main(pid_dir: str, how: str) -> None:
    context = get_context()
    write_pid(pid_dir)
    context.report()
    if context.rank == 1:
        if how == "stopped":
            os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(SLEEP_FOREVER_S)  # hangs before its next step
    context.report()  # rank 0 takes its step, then waits for rank 1 "in a collective"
    time.sleep(SLEEP_FOREVER_S)


# -- helpers ----------------------------------------------------------------------------------------


def process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


def wait_until_gone(pids: list[int]) -> list[int]:
    deadline = time.monotonic() + GONE_WAIT_S
    while time.monotonic() < deadline and not all(process_gone(pid) for pid in pids):
        time.sleep(0.2)
    return [pid for pid in pids if not process_gone(pid)]


def read_pids(pid_dir: Path) -> list[int]:
    return [int(path.read_text()) for path in sorted(pid_dir.glob("rank*"))]


@pytest.fixture(scope="module")
def sharded(spark, tmp_path_factory):
    """64 rows of a generated LIBSVM file, two equal shards (row i -> shard i % 2)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("libsvm") / "tiny.txt"
    lines = []
    for row in range(TRAIN_ROWS):
        label = row % 10
        pixels = sorted(rng.choice(np.arange(1, 785), size=20, replace=False))
        lines.append(f"{label} " + " ".join(f"{p}:{int(rng.integers(1, 256))}" for p in pixels))
    path.write_text("\n".join(lines) + "\n")
    return shard_frame(load_libsvm(spark, str(path)), 2).frame


def device_datasets_main(context) -> dict:
    """Iterate a distributed dataset once; say whether each per-device dataset tf.distribute built autotunes."""
    from tensorflow.python.data.ops import multi_device_iterator_ops

    tf = keras_flavour.tensorflow()
    context.strategy  # noqa: B018 - made on first use, and with it the backend's set-up
    built: list[bool] = []
    make_device_dataset = multi_device_iterator_ops._create_device_dataset

    def recording(*args, **kwargs):
        dataset = make_device_dataset(*args, **kwargs)
        built.append(dataset.options().autotune.enabled)
        return dataset

    multi_device_iterator_ops._create_device_dataset = recording
    distributed = context.distribute_dataset(
        lambda batch, replicas: tf.data.Dataset.range(64).batch(batch, drop_remainder=True), GLOBAL_BATCH)
    next(iter(distributed))
    return {"autotuned": built}


def epoch_batches_main(context) -> dict:
    """The batches of a 3-epoch run, and of the same run resumed at epoch 1, as lists of row indices."""
    from sparkml_mnist.training.inputs import ArrayRows, rank_batches

    rows = np.arange(TRAIN_ROWS)

    def batches(first_epoch: int) -> list[list[int]]:
        dataset = rank_batches(ArrayRows((rows,)), 8, steps=4, shuffle=True, seed=3, first_epoch=first_epoch, epochs=3)
        return [batch[0].numpy().tolist() for batch in dataset]

    return {"whole": batches(0), "resumed": batches(1)}


def refused_inputs_main(context) -> list[str]:
    """What a user's function gets for a bad all-reduce precision and a bad result report."""
    from sparkml_mnist.errors import SparkMnistError

    said = []
    for attempt in (lambda: context.distributed_optimizer(keras_flavour.keras().optimizers.SGD(), "bfloat16"),
                    lambda: context.report("no spaces allowed", {}),
                    lambda: context.report("ok", ["not", "a", "dict"])):
        try:
            attempt()
            said.append("accepted")
        except SparkMnistError as error:
            said.append(str(error))
    return said


def uneven_main(global_batch: int, context: Any) -> dict[str, Any]:
    """One all-reduce a step for ``equal_steps`` steps over unequal partitions (without it: a hang)."""
    tf = keras_flavour.tensorflow()
    strategy = context.strategy
    steps = context.equal_steps(global_batch)
    rows = sum(batch.num_rows for batch in context.record_batches())
    total = None
    for _ in range(steps):
        total = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(1.0)), axis=None)
    return {"steps": steps, "rows": rows, "partition_rows": context.partition_rows, "sum": float(total.numpy())}


# -- tests ------------------------------------------------------------------------------------------


def test_runs_in_a_row_all_reduce_in_fresh_processes(spark) -> None:
    """Default worker reuse; each run's two ranks are two fresh processes and all-reduce correctly (a second
    MultiWorkerMirroredStrategy in a reused process would hang)."""
    assert spark.conf.get("spark.python.worker.reuse", "true") == "true"
    runner = HorovodRunner(np=2, spark=spark)
    seen_pids: set[int] = set()
    for offset, main in ((0.0, all_reduce_main), (10.0, horovod_style_main)):
        records = runner.run_all(main, offset=offset).records
        values = [record.value for record in records]
        assert [value["rank"] for value in values] == [0, 1]
        assert all(value["sum"] == 3.0 + 2 * offset for value in values), values
        pids = {record.pid for record in records}
        assert len(pids) == 2 and os.getpid() not in pids and not pids & seen_pids
        seen_pids |= pids
        assert wait_until_gone(sorted(pids)) == []  # no orphaned trainers
        if main is horovod_style_main:
            assert all(value["keras"].startswith("tf_keras") for value in values)



def test_unequal_partitions_take_equal_steps_and_say_so(spark) -> None:
    """500 and 300 rows: every rank takes 300 // 80 steps (not 6 and 3, which would hang); run() is rank 0's."""
    uneven = spark.range(0, 1000, 1, 2).where("id < 800")
    with rank_lines() as lines:
        value = HorovodRunner(np=2, spark=spark, data=uneven).run(uneven_main, global_batch=UNEVEN_GLOBAL_BATCH)
    assert value == {"steps": 300 // (UNEVEN_GLOBAL_BATCH // 2), "rows": 500, "partition_rows": [500, 300], "sum": 2.0}
    assert any("partitions hold 300 to 500 rows" in line for _, line in lines), lines


@pytest.mark.parametrize("np_", [2, -2], ids=["barrier", "driver"])
def test_training_gives_identical_weights_and_each_rank_only_its_shard(sharded, np_: int) -> None:
    records = HorovodRunner(np=np_, data=sharded).run_all(train_main, global_batch=GLOBAL_BATCH).records
    first, second = (record.value for record in records)
    expected_steps = TRAIN_ROWS // GLOBAL_BATCH  # what np=1 takes with the same global batch
    for rank, value in enumerate((first, second)):
        assert value["steps"] == expected_steps == records[rank].steps
        assert records[rank].examples_seen == expected_steps * GLOBAL_BATCH // 2
        assert value["shard_rows"] == list(range(rank, TRAIN_ROWS, 2))
        assert sorted(value["seen"]) == value["shard_rows"]  # all of its shard, nothing else, once
        assert value["equal_steps"] == expected_steps
    for after, other in zip(first["weights"], second["weights"]):
        np.testing.assert_array_equal(after, other)
    assert any(not np.array_equal(after, before) for after, before in zip(first["weights"], first["initial"]))


@pytest.mark.parametrize("np_", [2, -2], ids=["barrier", "driver"])
def test_a_raising_rank_ends_the_run_naming_it(spark, tmp_path: Path, np_: int) -> None:
    with pytest.raises(RankFailedError) as caught:
        HorovodRunner(np=np_, spark=spark, policy=FailurePolicy(max_retries=0)).run(failing_main, pid_dir=str(tmp_path))
    failure = caught.value
    assert failure.rank == 1 and failure.host
    message = str(failure)
    assert message.startswith(f"rank 1 on {failure.host} failed: ValueError: rank one broke on purpose")
    assert "Traceback" in message and "failing_main" in message and "Py4J" not in message
    assert wait_until_gone(read_pids(tmp_path)) == []  # rank 0, still sleeping, was killed with its task


def test_a_crashing_rank_reports_exit_code_and_stderr(spark, tmp_path: Path) -> None:
    with pytest.raises(RankFailedError) as caught:
        HorovodRunner(np=2, spark=spark, policy=FailurePolicy(max_retries=0)).run(crashing_main, pid_dir=str(tmp_path))
    assert caught.value.rank == 1 and caught.value.error.kind == CRASH and caught.value.error.exit_code == 7
    assert "rank one about to crash" in str(caught.value)
    assert wait_until_gone(read_pids(tmp_path)) == []
    workdirs = [Path(path.read_text()) for path in sorted(tmp_path.glob("workdir*"))]
    assert len(workdirs) == 2 and all(path.name.startswith("sparkml-mnist-rank") for path in workdirs)
    crashed, ended = workdirs[1], workdirs[0]
    deadline = time.monotonic() + GONE_WAIT_S  # the crashed rank's task removes its folder once the rank is gone
    while crashed.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not crashed.exists(), "a crashed rank's task leaves no work folder"
    # Rank 0's task was ended with the run (Spark kills its Python worker: no cleanup runs there); the next
    # task started in that folder sweeps what a task that is gone left behind, and nothing that is alive.
    try:
        owner = int((ended / OWNER_FILE).read_text())
    except FileNotFoundError:
        owner = None  # its task's cleanup ran after all
    if owner is not None:
        assert wait_until_gone([owner]) == [], "Spark ends a killed task's Python worker"
        if ended.exists():
            assert ended in sweep_work_folders(ended.parent)
    assert not ended.exists()


@pytest.mark.parametrize(("how", "reason"), [("sleeps", "no progress"), ("stopped", "heartbeat")])
def test_a_stalled_rank_ends_the_run_with_a_timeout_naming_it(spark, tmp_path: Path, how: str, reason: str) -> None:
    runner = HorovodRunner(np=2, spark=spark, policy=FailurePolicy(progress_timeout_s=STALL_TIMEOUT_S, max_retries=0))
    with pytest.raises(RankStalledError) as caught:
        runner.run(stalling_main, pid_dir=str(tmp_path), how=how)
    assert caught.value.ranks == [1] and reason in caught.value.reason
    assert "rank 1 on" in str(caught.value) and "progress_timeout_s=8" in str(caught.value)
    assert wait_until_gone(read_pids(tmp_path)) == []


def test_np_above_the_slots_fails_before_any_task_starts(spark) -> None:
    with pytest.raises(PreflightError, match=r"np=3 .* only 2 task slots"):
        HorovodRunner(np=3, spark=spark).run(failing_main, pid_dir="/nonexistent")


def test_the_per_device_prefetch_does_not_autotune(spark) -> None:
    """An autotuned iterator's destructor waits for its model thread: seconds at the end of every fit."""
    values = [r.value for r in HorovodRunner(np=-1, spark=spark).run_all(device_datasets_main).records]
    assert values[0]["autotuned"] == [False]


def test_a_finite_input_ends_after_its_last_epoch_and_resumes_where_it_was() -> None:
    """``fit`` must not wait on batches nobody takes; a resumed run sees the batches it would have seen."""
    value = HorovodRunner(np=-1).run(epoch_batches_main)
    whole, resumed = value["whole"], value["resumed"]
    assert len(whole) == 3 * 4 and resumed == whole[4:]
    assert whole[:4] != whole[4:8]  # each epoch has its own order
    assert all(len(set(sum(whole[e * 4:(e + 1) * 4], []))) == 32 for e in range(3))  # no row twice in an epoch


def test_a_bad_precision_or_result_report_is_refused_at_once_naming_it() -> None:
    said = HorovodRunner(np=-1).run(refused_inputs_main)
    assert said[0] == "allreduce='bfloat16': use 'float32' or 'float16'"
    assert said[1].startswith("report('no spaces allowed', ...): the key takes")
    assert said[2].endswith("(got list)")
