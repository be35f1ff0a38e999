"""Half-precision gradient all-reduce: what crosses the wire is float16, the sum comes back as float32."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from pyspark import cloudpickle

from sparkml_mnist.config import load_run
from sparkml_mnist.launcher import HorovodRunner
from sparkml_mnist.job.run import run_job

cloudpickle.register_pickle_by_value(sys.modules[__name__])

VALUES = [1 / 3, 1000.1]  # neither is a float16 number


def aggregate_main(allreduce: str, context) -> dict:
    from sparkml_mnist.launcher import keras_flavour

    tf, keras = keras_flavour.tensorflow(), keras_flavour.keras()
    strategy = context.strategy
    with strategy.scope():
        variable = tf.Variable([0.0, 0.0])
        optimizer = context.distributed_optimizer(keras.optimizers.SGD(1.0), allreduce=allreduce)
    mine = tf.constant([value + context.rank * 1e-4 for value in VALUES])

    @tf.function
    def step():
        return strategy.run(lambda: optimizer.aggregate_gradients([(mine, variable)])[0][0])

    summed = step()
    return {"sum": [float(v) for v in summed.numpy()], "dtype": summed.dtype.name, "name": type(optimizer).__name__}


@pytest.mark.parametrize("allreduce", ["float32", "float16"])
def test_the_gradients_are_summed_in_the_precision_asked_for(spark, allreduce: str) -> None:
    values = [r.value for r in HorovodRunner(np=-2, spark=spark).run_all(aggregate_main,
                                                                                        allreduce=allreduce).records]
    assert values[0] == values[1] and values[0]["dtype"] == "float32" and values[0]["name"] == "SGD"
    ranks = [np.array(VALUES, np.float32) + np.float32(rank * 1e-4) for rank in (0, 1)]
    if allreduce == "float16":
        expected = (ranks[0].astype(np.float16) + ranks[1].astype(np.float16)).astype(np.float32)
    else:
        expected = ranks[0] + ranks[1]
    np.testing.assert_array_equal(np.array(values[0]["sum"], np.float32), expected)
    assert allreduce == "float32" or not np.array_equal(expected, ranks[0] + ranks[1])  # the wire is narrower


def test_the_job_trains_with_half_precision_all_reduce(spark, tmp_path) -> None:
    run = load_run("sample").with_overrides(variants="variant1", np=2, epochs=1, allreduce="float16",
                                            output=str(tmp_path / "out"))
    report = json.loads((run_job(spark, run) / "report.json").read_text())
    assert report["config"]["run"]["allreduce"] == "float16"
    assert report["variants"][0]["test"]["accuracy"] > 0.7
