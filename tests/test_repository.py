"""Promises the repository makes: README's commands are what CI runs; the entry point exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "README's Quick start has no ```sh block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_quick_start_has_exactly_two_commands():
    commands = quick_start_commands()
    assert len(commands) == 2
    assert "sparkml-mnist" in commands[0] and "pytest" in commands[1]


def test_ci_runs_readmes_test_command_verbatim():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert quick_start_commands()[1] in ci


def test_console_script_points_at_a_real_function():
    setup = (REPO / "setup.py").read_text()
    target = re.search(r'"sparkml-mnist=([\w.]+):(\w+)"', setup)
    assert target
    module = __import__(target.group(1), fromlist=[target.group(2)])
    assert callable(getattr(module, target.group(2)))


def test_the_installed_package_carries_its_conf_outside_the_checkout(tmp_path):
    # conf/ is mapped into the package as sparkml_mnist.conf; `setup.py develop` (what pip falls back
    # to without pyproject.toml once `wheel` is installed) would lose that mapping.
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", "from sparkml_mnist.config import load_run; print(load_run('sample').name)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "sample"


def _extra_requirements(extra: str) -> dict:
    from importlib import metadata

    from packaging.requirements import Requirement

    found = {}
    for line in metadata.requires("sparkml-mnist") or []:
        requirement = Requirement(line)
        if requirement.marker and requirement.marker.evaluate({"extra": extra}):
            found[requirement.name] = requirement
    return found


def test_the_gpu_extra_pins_what_ci_tests_on_cpus():
    # CI installs `local` (TensorFlow's CPU build); the gpu build must be held to the same versions.
    local, cpu, gpu = (_extra_requirements(extra) for extra in ("local", "cpu", "gpu"))
    assert gpu["tensorflow"].specifier == local["tensorflow-cpu"].specifier == cpu["tensorflow-cpu"].specifier
    assert gpu["tensorflow"].extras == {"and-cuda"}
    assert gpu["tf-keras"].specifier == cpu["tf-keras"].specifier == local["tf-keras"].specifier
    assert "tensorflow-cpu" not in gpu and "tensorflow" not in cpu  # both builds install the `tensorflow` module
    assert "pyspark" not in cpu and "pyspark" not in gpu  # executors use their cluster's own Spark


def test_version_option_reports_the_installed_distribution():
    import subprocess
    import sys
    from importlib import metadata

    result = subprocess.run([sys.executable, "-m", "sparkml_mnist.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == f"sparkml-mnist {metadata.version('sparkml-mnist')}\n"
