"""The ``horovod`` backend.

Here, in the default environment (TF 2.21, no Horovod): what can be checked without Horovod, and
the clear error when it is asked for. Then the backend's real suite, tests/horovod_env, run with
the Horovod environment's python: this module builds that environment with
scripts/make_horovod_env.sh (pip's wheel cache keeps the Horovod build for later runs), or uses
the one ``SPARKML_MNIST_HOROVOD_PYTHON`` names.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HOROVOD_SUITE_DIR, HOROVOD_SUITE_ENV
from sparkml_mnist.cli import commands as cli
from sparkml_mnist.launcher import HorovodRunner
from sparkml_mnist.launcher.backends.horovod import RENDEZVOUS_PORT, HorovodDriverBackend, horovod_slot
from sparkml_mnist.launcher.policy import FailurePolicy
from sparkml_mnist.launcher.spec import LaunchSpec, RankSpec
from sparkml_mnist.errors import ConfigError, LaunchError

pytestmark = pytest.mark.horovod

REPO = Path(__file__).resolve().parents[1]
HOROVOD_VENV = REPO / ".venv-horovod"
MAKE_ENV_SCRIPT = REPO / "scripts" / "make_horovod_env.sh"
HOROVOD_PYTHON_ENV = "SPARKML_MNIST_HOROVOD_PYTHON"
INNER_SUITE_TESTS = 8  # tests/horovod_env collects this many: fewer passing means some did not run
BUILD_TIMEOUT_S = 3600
SUITE_TIMEOUT_S = 1800
OUTPUT_TAIL = 6000


def spec_for(rank: int, hosts: list[str], **changes) -> RankSpec:
    settings = dict(size=len(hosts), backend="horovod", policy=FailurePolicy(), driver_host="127.0.0.1",
                    driver_port=4000, backend_options={RENDEZVOUS_PORT: 4321})
    launch = LaunchSpec(**{**settings, **changes})
    return launch.for_rank(rank, hosts, [5000 + i for i in range(len(hosts))], [])


def test_asking_for_horovod_without_it_says_how_to_install(spark) -> None:
    with pytest.raises(ConfigError) as caught:
        HorovodRunner(np=2, spark=spark, backend="horovod")
    message = str(caught.value)
    assert "Horovod is not installed" in message and "scripts/make_horovod_env.sh" in message


def test_the_cli_refuses_horovod_here_before_any_spark_work(capsys, monkeypatch) -> None:
    def no_spark(*args, **kwargs):
        raise AssertionError("Spark was started")

    monkeypatch.setattr("sparkml_mnist.cli.session.create_spark", no_spark)
    assert cli.main(["train", "--backend", "horovod", "--variant", "variant1", "--epochs", "1"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("sparkml-mnist: error: backend 'horovod' was asked for") and "make_horovod_env.sh" in error


def test_ranks_are_placed_as_horovod_places_them() -> None:
    # Two hosts, two ranks each, interleaved as Spark may schedule barrier tasks.
    hosts = ["a", "b", "a", "b"]
    assert [(p.local_rank, p.local_size, p.cross_rank, p.cross_size) for p in (horovod_slot(hosts, r) for r in range(4))] == [
        (0, 2, 0, 2), (0, 2, 1, 2), (1, 2, 0, 2), (1, 2, 1, 2),
    ]
    # Uneven hosts: local rank 1 exists only on host a.
    hosts = ["a", "a", "b"]
    assert [(p.local_rank, p.cross_rank, p.cross_size) for p in (horovod_slot(hosts, r) for r in range(3))] == [
        (0, 0, 2), (1, 0, 1), (0, 1, 2),
    ]


def test_each_rank_gets_horovods_gloo_environment() -> None:
    env = HorovodDriverBackend().environment(spec_for(1, ["127.0.0.1", "127.0.0.1"], policy=FailurePolicy(collective_timeout_s=42.5)))
    assert env["HOROVOD_RANK"] == "1" and env["HOROVOD_SIZE"] == "2"
    assert (env["HOROVOD_LOCAL_RANK"], env["HOROVOD_LOCAL_SIZE"]) == ("1", "2")
    assert (env["HOROVOD_CROSS_RANK"], env["HOROVOD_CROSS_SIZE"]) == ("0", "1")
    assert (env["HOROVOD_GLOO_RENDEZVOUS_ADDR"], env["HOROVOD_GLOO_RENDEZVOUS_PORT"]) == ("127.0.0.1", "4321")
    assert env["HOROVOD_CONTROLLER"] == env["HOROVOD_CPU_OPERATIONS"] == "gloo"
    assert env["HOROVOD_GLOO_IFACE"] == "lo" and env["HOROVOD_HOSTNAME"] == "127.0.0.1"
    assert env["HOROVOD_GLOO_TIMEOUT_SECONDS"] == "42"


def test_a_host_on_no_interface_of_this_machine_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.delenv("HOROVOD_GLOO_IFACE", raising=False)
    with pytest.raises(LaunchError, match=r"rank 0: no network interface .* 'not-a-host\.invalid'.*HOROVOD_GLOO_IFACE"):
        HorovodDriverBackend().environment(spec_for(0, ["not-a-host.invalid"]))
    with pytest.raises(LaunchError, match="rendezvous server"):
        HorovodDriverBackend().environment(spec_for(0, ["127.0.0.1"], backend_options={}))


@pytest.fixture(scope="module")
def horovod_python() -> str:
    """The Horovod environment's python: SPARKML_MNIST_HOROVOD_PYTHON, else built (or brought up to date)."""
    given = os.environ.get(HOROVOD_PYTHON_ENV)
    if given:
        return given
    built = subprocess.run(
        ["bash", str(MAKE_ENV_SCRIPT), str(HOROVOD_VENV)], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
    )
    if built.returncode != 0:
        pytest.fail(f"{MAKE_ENV_SCRIPT} failed (exit {built.returncode}):\n{(built.stdout + built.stderr)[-OUTPUT_TAIL:]}")
    return str(HOROVOD_VENV / "bin" / "python")


def test_the_horovod_suite_passes_in_the_horovod_environment(horovod_python: str) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYSPARK_")}  # its own python
    env[HOROVOD_SUITE_ENV] = "1"
    result = subprocess.run(
        # pytest.ini's addopts ask for pytest-xdist workers, which the Horovod environment does not have.
        [horovod_python, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider", "-q", "-rA",
         f"tests/{HOROVOD_SUITE_DIR}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=SUITE_TIMEOUT_S,
    )
    output = result.stdout + result.stderr
    sys.stdout.write(output[-OUTPUT_TAIL:])  # shown with -rA / on failure: each inner test's outcome
    passed = re.search(r"(\d+) passed", output)
    assert result.returncode == 0, f"the Horovod suite failed (exit {result.returncode}):\n{output[-OUTPUT_TAIL:]}"
    assert passed and int(passed.group(1)) == INNER_SUITE_TESTS, output[-OUTPUT_TAIL:]
