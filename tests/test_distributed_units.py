"""Fast checks of the launcher's pieces that need neither Spark tasks nor TensorFlow."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from sparkml_mnist.launcher.driver.watchdog import Watchdog
from sparkml_mnist.launcher.protocol import Heartbeat
from sparkml_mnist.launcher.failures import (
    CRASH,
    EXCEPTION,
    PreflightError,
    RankError,
    RankFailedError,
    RankRecord,
    RankStalledError,
    failure_marker,
    find_failure,
)
from sparkml_mnist.launcher.driver.cluster import check_barrier_run, local_master_slots
from sparkml_mnist.launcher.runner import HorovodRunner
from sparkml_mnist.errors import ConfigError, LaunchError

TIMEOUT_S = 10.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_monitor_names_the_rank_behind_when_nobody_progresses() -> None:
    clock = FakeClock()
    monitor = Watchdog(size=2, timeout_s=TIMEOUT_S, clock=clock)
    assert monitor.check() is None  # nothing judged before any rank reports
    monitor.heartbeat(0, Heartbeat(progress=0, host="a"))
    monitor.heartbeat(1, Heartbeat(progress=0, host="b"))
    for second in range(1, 30):  # both alive; rank 0 moved on at 2 s, rank 1 stuck at 1
        clock.now = float(second)
        monitor.heartbeat(0, Heartbeat(progress=min(second, 2), host="a"))
        monitor.heartbeat(1, Heartbeat(progress=min(second, 1), host="b"))
        if clock.now - 2 <= TIMEOUT_S:
            assert monitor.check() is None, f"judged too early at {second} s"
    verdict = monitor.check()
    assert verdict is not None and verdict.ranks == [1] and verdict.hosts == ["b"]
    assert "no progress" in verdict.reason


def test_monitor_names_a_rank_that_stopped_sending_heartbeats() -> None:
    clock = FakeClock()
    monitor = Watchdog(size=3, timeout_s=TIMEOUT_S, clock=clock)
    for rank in range(3):
        monitor.heartbeat(rank, Heartbeat(progress=0))
    for second in range(1, 15):  # ranks 0 and 2 keep progressing; rank 2 then finishes
        clock.now = float(second)
        monitor.heartbeat(0, Heartbeat(progress=second))
        monitor.heartbeat(2, Heartbeat(progress=second, done=second > 5))
    verdict = monitor.check()
    assert verdict is not None and verdict.ranks == [1]
    assert "heartbeat" in verdict.reason


def test_monitor_keeps_a_progressing_run_and_ignores_finished_ranks() -> None:
    clock = FakeClock()
    monitor = Watchdog(size=2, timeout_s=TIMEOUT_S, clock=clock)
    monitor.heartbeat(0, Heartbeat(progress=0))
    monitor.heartbeat(1, Heartbeat(progress=0, done=True))  # finished early, stays quiet: not stalled
    for second in range(1, 60):
        clock.now = float(second)
        monitor.heartbeat(0, Heartbeat(progress=second))
        assert monitor.check() is None


def test_failure_marker_survives_a_spark_message_round_trip() -> None:
    error = RankError(EXCEPTION, "ValueError", "bad [value]", traceback="Traceback (most recent call last):\n  x\n")
    text = f"py4j noise\n  at org.apache...\nLaunchError: rank 1 failed\n{failure_marker(1, 'host-b', error)}\n more"
    failure = find_failure(text)
    assert failure is not None and failure.rank == 1 and failure.host == "host-b"
    assert failure.error == error
    assert "rank 1 on host-b failed: ValueError: bad [value]" in str(failure)
    assert find_failure("no marker here") is None


def test_crash_message_carries_exit_code_and_stderr_tail() -> None:
    failure = find_failure(failure_marker(0, "h", RankError(CRASH, "ProcessExited", "", exit_code=-9,
                                                             output_tail="Killed by the OOM killer")))
    assert failure is not None and "exited with code -9" in str(failure) and "OOM killer" in str(failure)


def test_record_json_round_trip() -> None:
    record = RankRecord(rank=1, host="h", pid=5, value="kept aside", steps=4, examples_seen=32,
                        error=RankError(EXCEPTION, "E", "m"), timings={"tf_import_s": 4.5})
    back = RankRecord.from_json(record.to_json(), value="v")
    assert back.error == record.error and back.steps == 4 and back.value == "v" and back.timings == record.timings


@pytest.mark.parametrize(("master", "slots"), [("local", 1), ("local[2]", 2), ("local[3,2]", 3), ("yarn", None)])
def test_local_master_slots(master: str, slots: int | None) -> None:
    assert local_master_slots(master) == slots


@pytest.mark.parametrize("np", [0, True, 1.5])
def test_np_must_be_a_non_zero_integer(np: object) -> None:
    with pytest.raises(ConfigError, match="np must be a non-zero integer"):
        HorovodRunner(np=np)  # type: ignore[arg-type]


def _fake_session(conf: dict[str, str]) -> SimpleNamespace:
    return SimpleNamespace(
        conf=SimpleNamespace(get=lambda key, default=None: conf.get(key, default)),
        sparkContext=SimpleNamespace(),  # no JVM: slots come from the master URL
    )


def test_dynamic_allocation_fails_pre_flight() -> None:
    spark = _fake_session({"spark.master": "spark://cluster:7077", "spark.dynamicAllocation.enabled": "true"})
    with pytest.raises(PreflightError, match="spark.dynamicAllocation.enabled=false"):
        check_barrier_run(spark, 2, executor_wait_s=0)  # type: ignore[arg-type]


def test_task_cpus_reduce_the_slots_of_a_local_master() -> None:
    spark = _fake_session({"spark.master": "local[4]", "spark.task.cpus": "2"})
    check_barrier_run(spark, 2)  # type: ignore[arg-type]
    with pytest.raises(PreflightError, match="only 2 task slots"):
        check_barrier_run(spark, 3)  # type: ignore[arg-type]
    assert issubclass(PreflightError, LaunchError)


NOTICES = [
    "I0000 00:00:1795619532.308476   19121 port.cc:153] oneDNN custom operations are on.",
    "W0000 00:00:1795619535.703283   19121 dataset.cc:997] Input of GeneratorDatasetOp",
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "E0000 00:00:1795619535.238840   19118 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error",
    "I0000 00:00:1795975746.078959    4438 cpu_feature_guard.cc:227] This TensorFlow binary is optimized",
    "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the "
    "appropriate compiler flags.",
]
REAL_ERROR = "E0000 00:00:1795619535.238840   19118 collective_ops.cc:12] Collective ops is aborted by: timeout"


def test_console_sink_hides_tensorflow_start_up_notices_but_not_errors(caplog, monkeypatch):
    from sparkml_mnist.launcher.driver.events import rank_line as print_log_line
    from sparkml_mnist.launcher.tf_notices import SHOW_NOTICES_ENV

    caplog.set_level(logging.INFO, logger="sparkml_mnist.ranks")
    monkeypatch.delenv(SHOW_NOTICES_ENV, raising=False)
    for line in NOTICES:
        print_log_line(0, "stderr", line)
    print_log_line(1, "stderr", REAL_ERROR)
    print_log_line(1, "stdout", "variant1 epoch 1/3: loss 1.0471")
    assert [(r.rank, r.getMessage()) for r in caplog.records] == [(1, REAL_ERROR), (1, "variant1 epoch 1/3: loss 1.0471")]
    caplog.clear()
    monkeypatch.setenv(SHOW_NOTICES_ENV, "1")  # the verbose setting shows them
    print_log_line(0, "stderr", NOTICES[3])
    assert [(r.rank, r.getMessage()) for r in caplog.records] == [(0, NOTICES[3])]


def test_without_logging_configured_rank_lines_still_reach_stderr(capsys, monkeypatch):
    import sparkml_mnist.launcher.driver.events as log_module

    monkeypatch.setattr(log_module, "_configured", lambda logger: False)  # a plain script, no handlers anywhere
    log_module.rank_line(1, "stdout", "visible")
    log_module.info(logging.getLogger("sparkml_mnist.job.run"), "also visible")
    assert capsys.readouterr().err.splitlines() == ["[rank 1] visible", "also visible"]


def test_the_drivers_own_tensorflow_notices_are_filtered_at_the_file_descriptor(monkeypatch):
    """A fresh process importing TensorFlow through keras_flavour prints no notice, but keeps its own stderr."""
    from sparkml_mnist.launcher.tf_notices import SHOW_NOTICES_ENV

    script = (
        "import sys\n"
        "from sparkml_mnist.launcher import keras_flavour\n"
        "keras_flavour.tensorflow()\n"
        "print('after import', file=sys.stderr)\n"
    )
    quiet = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                           env={**os.environ, SHOW_NOTICES_ENV: "0"})
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr.strip().splitlines() == ["after import"]
    loud = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, SHOW_NOTICES_ENV: "1"})
    assert "oneDNN" in loud.stderr or "cpu_feature_guard" in loud.stderr


def test_the_watchdog_arms_at_launch() -> None:
    clock = FakeClock()
    silent = Watchdog(size=2, timeout_s=TIMEOUT_S, clock=clock, startup_timeout_s=30.0)
    clock.now = 29.0
    assert silent.check() is None
    clock.now = 31.0  # no task, no rank ever reached the driver
    verdict = silent.check()
    assert verdict is not None and verdict.ranks == [0, 1] and verdict.setting == "startup_timeout_s"
    assert "never reached the driver" in verdict.reason

    clock.now = 0.0
    one_late = Watchdog(size=2, timeout_s=TIMEOUT_S, clock=clock, startup_timeout_s=30.0)
    one_late.task_started(1, "host-b")
    clock.now = 5.0
    one_late.heartbeat(0, Heartbeat(progress=0, host="host-a"))  # rank 0 started; rank 1's process never does
    for second in range(6, 40):
        clock.now = float(second)
        one_late.heartbeat(0, Heartbeat(progress=second, host="host-a"))
    verdict = one_late.check()
    assert verdict is not None and verdict.ranks == [1] and verdict.hosts == ["host-b"]
    assert "never started" in verdict.reason


def test_the_first_rank_to_report_its_exception_is_named_not_the_one_spark_reported() -> None:
    """Rank 1 raises; rank 0 fails in a collective because rank 1 left, and Spark reports rank 0's task."""
    from sparkml_mnist.launcher.driver.attempt import _translate
    from sparkml_mnist.launcher.driver.events import AttemptEvents
    from sparkml_mnist.launcher.failures import RankError, failure_event, failure_marker

    monitor = Watchdog(2, 60.0)
    events = AttemptEvents(monitor, None, None)  # type: ignore[arg-type] - only failures are sent
    events.on_event(1, failure_event("h1", RankError("exception", "ValueError", "rank 1 is broken", "x" * 200_000)))
    events.on_event(0, failure_event("h0", RankError("exception", "UnknownError", "HorovodAllreduce failed")))
    events.on_event(0, {"type": "rank_failed", "host": "h0", "error": {"kind": 1}})  # malformed: ignored
    spark_said = Exception("stage failed\n" + failure_marker(0, "h0", RankError("exception", "UnknownError", "x")))
    failure = _translate(spark_said, monitor, events.first_failure)
    assert failure.rank == 1 and failure.host == "h1" and failure.error.message == "rank 1 is broken"
    assert len(failure.error.traceback) == 16_384  # trimmed to stay inside the channel's frame cap
    assert _translate(spark_said, monitor).rank == 0  # without a report: Spark's, as before
    crashed = Exception("stage failed\n" + failure_marker(0, "h0", RankError("crash", "Crash", "", exit_code=-9)))
    assert _translate(crashed, monitor, events.first_failure).rank == 0  # a crash cannot report: Spark's wins


def test_an_interrupt_replaced_by_a_clean_up_error_is_found() -> None:
    from sparkml_mnist.launcher.driver.attempt import _interrupt_behind

    interrupt = KeyboardInterrupt("signal 15")
    try:
        try:
            raise interrupt
        except KeyboardInterrupt:
            raise RuntimeError("Answer from Java side is empty")  # what py4j's next call raised
    except RuntimeError as error:
        assert _interrupt_behind(error) is interrupt
    assert _interrupt_behind(RuntimeError("a rank failed")) is None


def test_failure_signatures_tell_a_repeat_from_a_new_failure() -> None:
    from sparkml_mnist.launcher.runner import failure_signature

    error = RankError("exception", "ValueError", "boom", steps=3)
    same = failure_signature(RankFailedError(1, "h", error), 1)
    assert same == failure_signature(RankFailedError(1, "h", RankError("exception", "ValueError", "boom", steps=3)), 1)
    assert same != failure_signature(RankFailedError(1, "h", RankError("exception", "ValueError", "boom", steps=4)), 1)
    assert same != failure_signature(RankFailedError(1, "h", error), 2)  # resumed from another checkpoint
    assert failure_signature(RankStalledError([1], ["h"], "r", 5.0), None)[0] == "stalled"


def test_every_hang_is_bounded_by_default_and_the_policy_is_checked_once() -> None:
    from sparkml_mnist.launcher.driver.attempt import Attempt
    from sparkml_mnist.launcher.policy import NO_COLLECTIVE_TIMEOUT, FailurePolicy

    policy = FailurePolicy(progress_timeout_s=42.0)
    assert policy.collective_limit_s == 42.0 and policy.startup_limit_s == 42.0 and policy.max_retries == 2
    assert FailurePolicy(collective_timeout_s=NO_COLLECTIVE_TIMEOUT).collective_limit_s is None
    with pytest.raises(ConfigError, match="collective_timeout_s must be >= 0"):
        FailurePolicy(collective_timeout_s=-1.0)
    with pytest.raises(ConfigError, match=r"startup_timeout_s \(0.5\) must exceed heartbeat_interval_s"):
        FailurePolicy(startup_timeout_s=0.5)
    with pytest.raises(ConfigError, match="max_retries must be a whole number"):
        FailurePolicy(max_retries=-1)
    assert HorovodRunner(np=-1).policy == FailurePolicy()
    assert Attempt(number=1, started_at=0.0).outcome == "running"


def test_the_spec_a_rank_reads_is_the_launch_without_its_secret(tmp_path) -> None:
    from sparkml_mnist.launcher.channel import rank_token
    from sparkml_mnist.launcher.policy import FailurePolicy
    from sparkml_mnist.launcher.spec import LaunchSpec, RankSpec

    launch = LaunchSpec(size=3, backend="tf", policy=FailurePolicy(progress_timeout_s=9.0), driver_host="d",
                        driver_port=7, secret="s" * 64, backend_options={"port": 1})
    spec = launch.for_rank(2, ["a", "b", "a"], [10, 11, 12], ["0"])
    spec.write(tmp_path)
    read = RankSpec.read(tmp_path)
    assert read == spec and read.launch.secret == "" and "s" * 64 not in (tmp_path / "spec.json").read_text()
    assert read.channel_token == rank_token("s" * 64, 2) and read.policy.progress_timeout_s == 9.0
    assert (read.local_rank, read.local_size, read.addresses[2]) == (1, 2, "a:12") and not read.keep_value


def _rank(rank: int, hosts: list[str], threads: int, pin: bool = True, gpus: tuple[str, ...] = ()):
    from sparkml_mnist.launcher.policy import FailurePolicy
    from sparkml_mnist.launcher.spec import LaunchSpec

    launch = LaunchSpec(size=len(hosts), backend="tf", policy=FailurePolicy(), driver_host="d", driver_port=7,
                        threads=threads, pin_cores=pin)
    return launch.for_rank(rank, hosts, list(range(10, 10 + len(hosts))), list(gpus))


def test_ranks_that_split_a_machines_cores_each_keep_their_own() -> None:
    from sparkml_mnist.launcher.rank.main import RANK_CORES_ENV
    from sparkml_mnist.launcher.task.process import child_environment, rank_cores

    two_hosts = ["a", "a", "b", "b"]  # ranks 0 and 1 share host a, 2 and 3 host b
    assert [rank_cores(_rank(r, two_hosts, 1), {4, 5}) for r in range(4)] == [[4], [5], [4], [5]]
    assert [rank_cores(_rank(r, ["a", "a"], 2), {0, 1, 2, 3}) for r in (0, 1)] == [[0, 1], [2, 3]]
    assert rank_cores(_rank(0, ["a", "a"], 1), {0, 1, 2, 3}) is None  # two cores left free: not pinned
    assert rank_cores(_rank(0, ["a", "a"], 4), {0, 1, 2, 3}) is None  # more threads than cores
    assert rank_cores(_rank(0, ["a", "b"], 1), {0}) is None  # alone on its host
    machine = sorted(os.sched_getaffinity(0))
    split = _rank(1, ["a"] * len(machine), 1)
    if len(machine) > 1:
        assert child_environment(split, {})[RANK_CORES_ENV] == str(machine[1])
    assert RANK_CORES_ENV not in child_environment(_rank(1, ["a"] * len(machine), 1, pin=False), {})  # a cluster
    assert RANK_CORES_ENV not in child_environment(_rank(1, ["a"] * len(machine), 1, gpus=("0",)), {})


@pytest.mark.parametrize("value", ["x", "99999"], ids=["not_a_number", "no_such_core"])
def test_cores_a_rank_cannot_keep_to_leave_one_line_and_the_scheduler(value: str, capsys) -> None:
    from sparkml_mnist.launcher.rank.main import RANK_CORES_ENV, keep_to_cores

    before = os.sched_getaffinity(0)
    keep_to_cores(value)
    assert os.sched_getaffinity(0) == before
    assert capsys.readouterr().err.startswith(f"{RANK_CORES_ENV}={value!r} not applied (")


# --------------------------------------------------------------------------------------------
# Where the driver's channel listens (README "Security")
# --------------------------------------------------------------------------------------------

DRIVER_LAN_ADDRESS = "10.1.2.3"  # an IP literal: resolving it needs no DNS
CLUSTER_MASTER = "spark://cluster:7077"


def _addresses(conf: dict[str, str], np: int = 2) -> tuple[str, str]:
    from sparkml_mnist.launcher.driver.attempt import driver_addresses
    from sparkml_mnist.launcher.placement import Placement

    return driver_addresses(Placement(size=abs(np), on_driver=np < 0), _fake_session(conf))  # type: ignore[arg-type]


@pytest.mark.parametrize("master", ["local", "local[2]", "local[*]", "local[2,3]"])
def test_a_local_master_listens_on_loopback_only(master: str) -> None:
    """Every task of a local master runs on this machine: the LAN address would open the channel to it."""
    conf = {"spark.master": master, "spark.driver.host": DRIVER_LAN_ADDRESS}
    assert _addresses(conf) == ("127.0.0.1", "127.0.0.1")
    assert _addresses({**conf, "spark.driver.bindAddress": "0.0.0.0"}) == ("127.0.0.1", "127.0.0.1")


def test_np_below_zero_listens_on_loopback_only_even_beside_a_cluster() -> None:
    conf = {"spark.master": CLUSTER_MASTER, "spark.driver.host": DRIVER_LAN_ADDRESS,
            "spark.driver.bindAddress": "0.0.0.0"}
    assert _addresses(conf, np=-2) == ("127.0.0.1", "127.0.0.1")


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::", "[::]", "", " "])
def test_a_wildcard_bind_address_is_replaced_by_the_driver_hosts_address(wildcard: str, caplog) -> None:
    conf = {"spark.master": CLUSTER_MASTER, "spark.driver.host": DRIVER_LAN_ADDRESS,
            "spark.driver.bindAddress": wildcard}
    with caplog.at_level(logging.INFO, logger="sparkml_mnist"):
        assert _addresses(conf) == (DRIVER_LAN_ADDRESS, DRIVER_LAN_ADDRESS)
    said = [record.getMessage() for record in caplog.records if "spark.driver.bindAddress" in record.getMessage()]
    assert len(said) == 1 and DRIVER_LAN_ADDRESS in said[0] and "every interface" in said[0]


def test_a_specific_bind_address_is_kept_and_an_unset_one_is_the_hosts(caplog) -> None:
    conf = {"spark.master": CLUSTER_MASTER, "spark.driver.host": DRIVER_LAN_ADDRESS}
    with caplog.at_level(logging.INFO, logger="sparkml_mnist"):
        assert _addresses({**conf, "spark.driver.bindAddress": "10.9.9.9"}) == (DRIVER_LAN_ADDRESS, "10.9.9.9")
        assert _addresses(conf) == (DRIVER_LAN_ADDRESS, DRIVER_LAN_ADDRESS)
    assert not [record for record in caplog.records if "bindAddress" in record.getMessage()]
