"""Where the job runs, and the defaults that follow from it (Databricks runtime detection).

Databricks sets ``DATABRICKS_RUNTIME_VERSION`` in every driver and executor process, which is the
documented way to tell a Databricks cluster from anywhere else. On Databricks the defaults change:
the input is the runtime's copy of MNIST (``conf/data.yaml``) and reports go to DBFS or a Unity
Catalog volume through its FUSE mount, because the driver's local disk disappears with the job
cluster. Every function takes the environment as an argument (default: ``os.environ``), so the
decision is testable without a cluster; none of them changes anything.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from functools import lru_cache
from importlib import import_module
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

from sparkml_mnist.config import default_conf_file, load_data_spec, load_yaml, require_field
from sparkml_mnist.data.paths import DATABRICKS_RUNTIME_ENV
from sparkml_mnist.errors import ConfigError

PLATFORM_CONF_FILE = "platform.yaml"
# Overrides conf/platform.yaml's databricks_output_root for one cluster or job (spark_env_vars).
DATABRICKS_OUTPUT_ENV = "SPARKML_MNIST_DATABRICKS_OUTPUT"
# dbfs:/x is mounted at /dbfs/x on Databricks drivers; the report writer needs the mounted form.
DBFS_SCHEME = "dbfs"
DBFS_FUSE_ROOT = "/dbfs"
# Where Databricks ML runtimes up to 15.x ship their HorovodRunner.
SPARKDL_MODULE = "sparkdl"
SPARKDL_RUNNER = "HorovodRunner"


@dataclass(frozen=True)
class PlatformSettings:
    """``conf/platform.yaml``: defaults that only apply on a given platform."""

    databricks_output_root: str

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any], source: str) -> "PlatformSettings":
        known = {"databricks_output_root"}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}; expected {sorted(known)}")
        root = require_field(settings, "databricks_output_root", str, source)
        return cls(databricks_output_root=fuse_path(root, f"{source}: field 'databricks_output_root'"))


@lru_cache(maxsize=None)
def load_platform_settings(path: str | None = None) -> PlatformSettings:
    """The platform defaults from ``conf/platform.yaml`` (or ``path``), read once per process."""
    source = Path(path) if path is not None else default_conf_file(PLATFORM_CONF_FILE)
    return PlatformSettings.from_mapping(load_yaml(source), str(source))


def _environment(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def runtime_version(environ: Mapping[str, str] | None = None) -> str | None:
    """The Databricks runtime version (e.g. ``"17.3"``), or None when not running on Databricks."""
    value = _environment(environ).get(DATABRICKS_RUNTIME_ENV, "").strip()
    return value or None


def is_databricks(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process runs on a Databricks cluster (driver or executor)."""
    return runtime_version(environ) is not None


def default_data_dir(environ: Mapping[str, str] | None = None) -> str | None:
    """The input folder used when none is given: the runtime's MNIST copy on Databricks, else None.

    ``None`` keeps the caller's own default (the run config's, or ``SPARKML_MNIST_DATA``).
    """
    return load_data_spec().databricks_data_dir if is_databricks(environ) else None


def fuse_path(path: str, what: str = "output folder") -> str:
    """``path`` as the local-filesystem path the report writer can use on a Databricks driver.

    ``dbfs:/x`` becomes ``/dbfs/x`` (its FUSE mount); an absolute local path (``/Volumes/...``,
    ``/dbfs/...``) is kept. Other URIs (``s3://``, ``abfss://``) cannot be written through the local
    filesystem and relative paths would land on the driver's disk, which is gone after a job run:
    both are a ``ConfigError`` naming ``what``.
    """
    scheme = urlparse(path).scheme
    if scheme == DBFS_SCHEME:
        inner = path[len(DBFS_SCHEME) + 1 :].lstrip("/")
        return posixpath.join(DBFS_FUSE_ROOT, inner) if inner else DBFS_FUSE_ROOT
    if scheme:
        raise ConfigError(
            f"{what} {path!r}: reports are written through the local filesystem; give a FUSE path such as "
            f"/Volumes/<catalog>/<schema>/<volume>/... or /dbfs/..., not a {scheme}:// URI"
        )
    if not posixpath.isabs(path):
        raise ConfigError(
            f"{what} {path!r}: give an absolute path (/Volumes/... or /dbfs/...); a relative one is on "
            "the driver's local disk, which is deleted with the job cluster"
        )
    return path


def databricks_output_root(
    environ: Mapping[str, str] | None = None, settings: PlatformSettings | None = None
) -> str:
    """The folder that holds the report folders of runs on Databricks.

    ``SPARKML_MNIST_DATABRICKS_OUTPUT`` when set (e.g. a Unity Catalog volume), else
    ``conf/platform.yaml``'s ``databricks_output_root``.
    """
    override = _environment(environ).get(DATABRICKS_OUTPUT_ENV, "").strip()
    if override:
        return fuse_path(override, f"{DATABRICKS_OUTPUT_ENV}")
    return (settings or load_platform_settings()).databricks_output_root


def default_output_dir(
    run_name: str, environ: Mapping[str, str] | None = None, settings: PlatformSettings | None = None
) -> str | None:
    """The report folder for a run without ``--output``: ``<root>/<run name>`` on Databricks, else None.

    ``None`` keeps the run config's own (relative, local) output folder.
    """
    if not is_databricks(environ):
        return None
    if not run_name or "/" in run_name or run_name in (".", ".."):
        raise ConfigError(f"run name {run_name!r} cannot name a report folder; give --output DIR")
    return posixpath.join(databricks_output_root(environ, settings), run_name)


def sparkdl_horovod_runner() -> type | None:
    """Databricks' own ``sparkdl.HorovodRunner`` when this runtime ships it, else None.

    Only older Databricks ML runtimes have it (it needs Horovod, which stops at TF 2.15); a Horovod
    backend may prefer it there and fall back to ``sparkml_mnist.distributed.HorovodRunner``.
    Importing only, no side effects: a missing module or a ``sparkdl`` without the runner is None.
    """
    try:
        module = import_module(SPARKDL_MODULE)
    except ImportError:
        return None
    runner = getattr(module, SPARKDL_RUNNER, None)
    return runner if isinstance(runner, type) else None
