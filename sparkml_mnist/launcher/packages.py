"""Installed package versions, read from package metadata: milliseconds, and nothing is imported.

The one place that reads them, for the version guardrails and for what a report records.
"""

from __future__ import annotations

from importlib import metadata


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (a pip name such as "tf-keras"); None when not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
