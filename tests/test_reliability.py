"""A stopped run resumes; a repeated failure is not retried again; reruns are reproducible; outputs are claimed.

The chaos here comes from outside, as it would on a cluster: the driver gets SIGTERM, then SIGKILL with
its process group. Each test can fail if its mechanism is removed: without checkpoints the history
restarts at epoch 1; without the run state ``--resume`` retrains the first variant; without the claim
both runs write the output. A rank SIGKILLed mid-epoch (one retry, not the run) is tested where it
matters most, on a real standalone cluster without shared storage (tests/test_cluster.py).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pyspark import cloudpickle
from rank_processes import CliRun, rank_pids

from sparkml_mnist.config import load_run
from sparkml_mnist.launcher import HorovodRunner, get_context
from sparkml_mnist.launcher.policy import FailurePolicy
from sparkml_mnist.launcher.failures import RankFailedError

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.reliability

START_TIMEOUT_S = 300.0
RUN_TIMEOUT_S = 600.0
GONE_WAIT_S = 30.0  # killed processes disappear within this (polled; not a timing assertion)


def report(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "report.json").read_text())


def work_folders(root: Path) -> list[Path]:
    return sorted(root.rglob("sparkml-mnist-rank*"))


# -- the driver stopped (SIGTERM), resumed, SIGKILLed with its whole process group, resumed again ----


def test_a_stopped_then_killed_driver_resumes_from_what_rank_zero_wrote_to_storage(tmp_path: Path) -> None:
    """One chain, three CLI processes (each stop costs a driver start, so the two share it):

    1. SIGTERM during variant3's second epoch: exit 130, nothing under the output's name, no rank left.
    2. ``--resume``, its whole process group SIGKILLed once variant3 resumed: nothing runs on the way out,
       so what the next resume finds is what rank 0 wrote to ``--checkpoint-dir`` (never the driver's).
    3. ``--resume`` finishes: variant1 kept, not retrained; every epoch of both variants once.
    """
    output, checkpoints = tmp_path / "out", tmp_path / "checkpoints"
    env = {"SPARK_LOCAL_DIRS": str(tmp_path / "local")}
    job = CliRun("train", "--variant", "variant1,variant3", "--epochs", "2", "--np", "2", "--output", str(output),
                 "--checkpoint-dir", str(checkpoints), log=tmp_path / "first.log", env=env)
    assert job.wait_for("variant3 epoch 1/2", START_TIMEOUT_S), job.text()[-3000:]
    job.process.send_signal(signal.SIGTERM)
    assert job.finish(RUN_TIMEOUT_S) == 130, job.text()[-3000:]
    assert f"--resume {output}" in job.text()
    assert not output.exists()  # nothing half written under the output's name
    deadline = time.monotonic() + GONE_WAIT_S
    while rank_pids(job.mark) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not rank_pids(job.mark), "no rank outlives the stopped driver"
    while work_folders(tmp_path / "local") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert work_folders(tmp_path / "local") == [], "a stopped driver's ranks leave no work folder"
    assert list(checkpoints.rglob("variant3/epoch-000001.json")), list(checkpoints.rglob("*"))

    killed = CliRun("train", "--resume", str(output), log=tmp_path / "killed.log", env=env, new_session=True)
    assert killed.wait_for("variant3: attempt 1 resumes after epoch 1", START_TIMEOUT_S), killed.text()[-3000:]
    os.killpg(killed.process.pid, signal.SIGKILL)  # the driver, its JVM and the ranks, at once
    assert killed.finish(RUN_TIMEOUT_S) == -signal.SIGKILL
    assert not list((tmp_path / ".out.state").rglob("*.ckpt"))  # the bytes never went to the driver
    left_by_sigkill = work_folders(tmp_path / "local")  # nothing runs on the way out (as Spark's own blockmgr-*)

    resumed = CliRun("train", "--resume", str(output), log=tmp_path / "resume.log", env=env)
    assert resumed.finish(RUN_TIMEOUT_S) == 0, resumed.text()[-3000:]
    text = resumed.text()
    assert "variant1: finished by an earlier attempt of this run, kept" in text
    assert "variant1 epoch" not in text  # not retrained
    assert "variant3: attempt 1 resumes after epoch 1" in text
    variants = {v["name"]: v for v in report(output)["variants"]}
    assert set(variants) == {"variant1", "variant3"}
    assert all(len(values) == 2 for v in variants.values() for values in v["history"].values())  # every epoch once
    assert variants["variant3"]["rank_records"][0]["resumed_from_epoch"] == 1
    assert report(output)["config"]["run"]["checkpoint_dir"] == str(checkpoints)
    assert (output / "models" / "variant1" / "variant1.keras").is_file()
    assert list(checkpoints.iterdir()) == []  # the run's folder under it went with the completed run
    assert not (tmp_path / ".out.state").exists()
    assert work_folders(tmp_path / "local") == left_by_sigkill


# -- the same failure twice is not retried again ---------------------------------------------------


def failing_at_step_three(pid_dir: str) -> None:
    context = get_context()
    for step in range(1, 10):
        context.report()
        if context.rank == 1 and step == 3:
            raise ValueError("rank one breaks at step 3, every time")
        time.sleep(0.05)


def test_the_same_error_at_the_same_step_is_not_retried_again(spark, tmp_path: Path) -> None:
    runner = HorovodRunner(np=2, spark=spark, policy=FailurePolicy(max_retries=3))
    with pytest.raises(RankFailedError) as caught:
        runner.run(failing_at_step_three, pid_dir=str(tmp_path))
    assert caught.value.rank == 1 and "rank one breaks at step 3" in str(caught.value)
    assert [a.outcome for a in caught.value.attempts] == ["failed", "failed"]  # not 4: the second one repeated the first
    assert caught.value.error.progress == 3


def flaky_once(marker: str) -> int:
    context = get_context()
    if context.rank == 1 and not Path(marker).exists():
        Path(marker).write_text("failed once")
        os._exit(9)  # a crash the next attempt does not repeat
    return context.attempt


def test_a_crash_that_does_not_repeat_is_retried(spark, tmp_path: Path) -> None:
    outcome = HorovodRunner(np=2, spark=spark).run_all(flaky_once, marker=str(tmp_path / "marker"))
    assert outcome.value == 2
    assert [a.outcome for a in outcome.attempts] == ["failed", "succeeded"]


# -- determinism on demand --------------------------------------------------------------------------


def saved_weights(folder: Path, name: str) -> list[np.ndarray]:
    from sparkml_mnist.launcher.keras_flavour import keras

    return keras().models.load_model(folder / "models" / name / f"{name}.keras").get_weights()


def test_deterministic_runs_give_bit_identical_weights(trained_run, quiet_rerun) -> None:
    """The pair: the session's trained run and its rerun (tests/conftest.py), both --deterministic with
    the sample's seed, variant1 and variant3 (with dropout) at np=2."""
    first, second = trained_run, quiet_rerun.run
    settings = [{k: v for k, v in run.report["config"]["run"].items() if k != "output"} for run in (first, second)]
    assert settings[0] == settings[1] and settings[0]["deterministic"] is True
    for name in ("variant1", "variant3"):
        for run in (first, second):
            variant = run.variant(name)
            assert variant["deterministic"] is True and variant["seed"] == load_run("sample").seed
            assert len(variant["rank_records"]) == 2
            assert all(r["determinism"]["op_determinism"] is True and r["determinism"]["inter_op_threads"] == 1
                       for r in variant["rank_records"])
        weights = saved_weights(first.output, name), saved_weights(second.output, name)
        assert len(weights[0]) == len(weights[1]) > 0
        for one, other in zip(*weights):
            np.testing.assert_array_equal(one, other)
        assert first.variant(name)["history"] == second.variant(name)["history"]


# -- one output, two runs --------------------------------------------------------------------------


def test_two_runs_into_one_output_at_once_one_wins_the_other_is_told(quiet_rerun) -> None:
    """While the determinism pair's rerun held its output, another run into it was started (tests/conftest.py)."""
    output = quiet_rerun.run.output
    assert quiet_rerun.intruder_code == 2, quiet_rerun.intruder_err
    assert f"{output}: another run (pid {quiet_rerun.pid} on" in quiet_rerun.intruder_err
    assert len(quiet_rerun.intruder_err.strip().splitlines()) == 1
    assert [v["name"] for v in quiet_rerun.run.report["variants"]] == ["variant1", "variant3"]  # the first one won
