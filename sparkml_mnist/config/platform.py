"""Databricks: detecting the runtime, and the defaults that follow from it (input data, report folder).

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
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

from sparkml_mnist.config import default_conf_file, load_data_spec
from sparkml_mnist.config.loader import load_file, positive, rule
from sparkml_mnist.errors import ConfigError

DATABRICKS_RUNTIME_ENV = "DATABRICKS_RUNTIME_VERSION"  # set by Databricks in every driver and executor process
PLATFORM_CONF_FILE = "platform.yaml"
# Overrides conf/platform.yaml's databricks_output_root for one cluster or job (spark_env_vars).
DATABRICKS_OUTPUT_ENV = "SPARKML_MNIST_DATABRICKS_OUTPUT"
# dbfs:/x is mounted at /dbfs/x on Databricks drivers; the report writer needs the mounted form.
DBFS_SCHEME = "dbfs"
DBFS_FUSE_ROOT = "/dbfs"


def _as_fuse_path(value: Any) -> Any:
    """The loader's conversion: a path the report writer can use, or a ValueError saying why not."""
    return fuse_path(value, "the path") if isinstance(value, str) else value  # not a str: the type check says so


@dataclass(frozen=True)
class LocalJvmSettings:
    """``local_jvm``: the driver JVM that the CLI starts itself (sparkml_mnist.cli.jvm)."""

    java_options: str
    class_archive: bool
    keep_unused_archive_days: float = field(metadata=rule(positive))


@dataclass(frozen=True)
class PlatformSettings:
    """``conf/platform.yaml``: defaults that only apply on a given platform."""

    databricks_output_root: str = field(metadata=rule(convert=_as_fuse_path))
    local_jvm: LocalJvmSettings


@lru_cache(maxsize=None)
def load_platform_settings(path: str | None = None) -> PlatformSettings:
    """The platform defaults from ``conf/platform.yaml`` (or ``path``), read once per process."""
    return load_file(PlatformSettings, Path(path) if path is not None else default_conf_file(PLATFORM_CONF_FILE))


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
