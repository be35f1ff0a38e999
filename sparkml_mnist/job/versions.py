"""Version guardrails: say at start which of pyspark, TensorFlow and tf_keras is outside what we test.

Read from package metadata, so the check costs milliseconds and imports no TensorFlow. A version
outside the tested range is a warning; one that cannot work (or a missing tf_keras on a
TensorFlow whose ``tf.keras`` is Keras 3) is a ``VersionError`` before anything starts.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from sparkml_mnist.config import default_conf_file, load_yaml
from sparkml_mnist.errors import SparkMnistError
from sparkml_mnist.launcher.keras_flavour import TENSORFLOW_DISTRIBUTIONS, builtin_keras_2
from sparkml_mnist.launcher.packages import installed_version

VERSIONS_CONF_FILE = "versions.yaml"
# Each checked package: the distributions that provide it (first found wins) and its import name.
DISTRIBUTIONS = {
    "pyspark": (("pyspark", "pyspark-client", "databricks-connect"), "pyspark"),
    "tensorflow": (TENSORFLOW_DISTRIBUTIONS, "tensorflow"),
    "tf-keras": (("tf-keras", "tf_keras"), None),  # importing tf_keras imports TensorFlow: metadata only
}


class VersionError(SparkMnistError, RuntimeError):
    """An installed package cannot work with this job; the message says which and what to install."""


@dataclass(frozen=True)
class VersionCheck:
    package: str
    version: str | None  # None: not installed
    tested: str
    works: str
    problem: str | None  # None: inside the tested range
    fatal: bool = False


def _found_version(package: str) -> str | None:
    """The version of a checked package from whichever of its distributions is installed (None: none is)."""
    distributions, module = DISTRIBUTIONS[package]
    for name in distributions:
        version = installed_version(name)
        if version is not None:
            return version
    if module is not None:  # e.g. Databricks puts pyspark on the path without pip metadata
        try:
            return str(importlib.import_module(module).__version__)
        except Exception:  # not importable: reported as missing
            return None
    return None


def check_versions(found: dict[str, str | None] | None = None) -> list[VersionCheck]:
    """Compare installed versions (or ``found``, for tests) with conf/versions.yaml."""
    conf_file = default_conf_file(VERSIONS_CONF_FILE)
    ranges = load_yaml(conf_file)
    found = found if found is not None else {package: _found_version(package) for package in DISTRIBUTIONS}
    checks = [_check(package, found.get(package), ranges[package], str(conf_file)) for package in DISTRIBUTIONS]
    if found.get("tf-keras") is None and _builtin_keras_2(found.get("tensorflow")):
        checks = [c for c in checks if c.package != "tf-keras"]  # TF <= 2.15: tf.keras is Keras 2 already
    return checks + _keras_pairing(found)


def _builtin_keras_2(tf_version: str | None) -> bool:
    return tf_version is not None and builtin_keras_2(tf_version)


class _AnyOf:
    """Several tested ranges (one per supported environment); a version in any of them is tested."""

    def __init__(self, specifiers: str | list[str]) -> None:
        self.sets = [SpecifierSet(s) for s in ([specifiers] if isinstance(specifiers, str) else specifiers)]

    def __contains__(self, version: Version) -> bool:
        return any(version in specifier for specifier in self.sets)

    def __str__(self) -> str:
        return " or ".join(str(specifier) for specifier in self.sets)


def _check(package: str, version: str | None, ranges: dict, source: str) -> VersionCheck:
    tested, works = _AnyOf(ranges["tested"]), SpecifierSet(ranges["works"])
    if version is None:
        problem = f"{package} is not installed"
        if package == "tf-keras":
            problem += " (without it tf.keras is Keras 3, whose fit() fails under MultiWorkerMirroredStrategy)"
        return VersionCheck(package, None, str(tested), str(works), problem, fatal=True)
    try:
        parsed = Version(version)
    except InvalidVersion:
        return VersionCheck(package, version, str(tested), str(works), f"{package} {version}: unrecognised version")
    if parsed not in works:
        problem = f"{package} {version} cannot run this job (needs {works}; tested {tested})"
        return VersionCheck(package, version, str(tested), str(works), problem, fatal=True)
    if parsed not in tested:
        problem = f"{package} {version} is outside the tested range {tested} (see {source})"
        return VersionCheck(package, version, str(tested), str(works), problem)
    return VersionCheck(package, version, str(tested), str(works), None)


def _keras_pairing(found: dict[str, str | None]) -> list[VersionCheck]:
    """tf_keras 2.N belongs to TensorFlow 2.N; a mismatch fails at import or in subtle ways."""
    tf, tf_keras = found.get("tensorflow"), found.get("tf-keras")
    if not tf or not tf_keras:
        return []
    try:
        tf_version, keras_version = Version(tf), Version(tf_keras)
    except InvalidVersion:
        return []
    if tf_version.release[:2] == keras_version.release[:2]:
        return []
    problem = f"tf-keras {tf_keras} does not match tensorflow {tf}: install tf-keras=={tf_version.major}.{tf_version.minor}.*"
    return [VersionCheck("tf-keras", tf_keras, tf, tf, problem, fatal=True)]


def enforce_versions(warn: Callable[[str], None], found: dict[str, str | None] | None = None) -> list[VersionCheck]:
    """Warn about untested versions; raise ``VersionError`` naming every one that cannot work."""
    checks = check_versions(found)
    fatal = [check.problem for check in checks if check.fatal and check.problem]
    if fatal:
        raise VersionError("; ".join(fatal) + ". Install the versions of setup.py's 'local' extra")
    for check in checks:
        if check.problem:
            warn(f"warning: {check.problem}")
    return checks
