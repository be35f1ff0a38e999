"""The run's output folder, written atomically: it appears under its name only when complete.

Everything is written into a hidden sibling (``.<name>.partial-<random>``) that is renamed into
place at the end, so a crash leaves no half-written report under the name a person or a pipeline
looks for. A rename never replaces a non-empty folder, so a report that appeared meanwhile is
kept; an existing report is replaced only by ``overwrite``, after the new one is complete (the old
one survives a failure).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import secrets
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from sparkml_mnist.launcher.packages import installed_version
from sparkml_mnist.report.figures import comparison_figure, confusion_figure, loss_figure, save_figure
from sparkml_mnist.report.markdown import COMPARISON_PNG, REPORT_MD, render_markdown
from sparkml_mnist.report.results import ReportError, VariantResult

REPORT_JSON = "report.json"
MODELS_DIR = "models"
REPORT_SCHEMA_VERSION = 1
PARTIAL_MARKER = ".partial-"
OLD_MARKER = ".old-"
_RANDOM_HEX_BYTES = 4
# Packages whose versions every report records (looked up without importing them).
VERSIONED_PACKAGES = (
    "sparkml-mnist",
    "pyspark",
    "tensorflow",
    "tensorflow-cpu",
    "tf-keras",
    "keras",
    "jax",
    "jaxlib",
    "numpy",
    "scikit-learn",
    "matplotlib",
    "pyarrow",
)


def write_report(
    output_dir: str | Path,
    results: Sequence[VariantResult],
    *,
    config: Any = None,
    versions: Mapping[str, str] | None = None,
    timings: Mapping[str, float] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the whole report folder and return its path; nothing appears under that name unless complete.

    ``config`` is any JSON-able value (dicts, dataclasses, paths and numpy values are converted).
    ``versions`` adds to or overrides :func:`collect_versions`. ``timings`` are run-level seconds.
    An existing non-empty ``output_dir`` is an error unless ``overwrite``; it is then replaced in one
    step after the new report is complete (the old one survives a failure).
    """
    results = list(results)
    target = Path(output_dir).absolute()
    check_output_folder(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)

    partial = _make_sibling_dir(target, PARTIAL_MARKER)
    try:
        _write_contents(partial, results, config, versions, timings)
        _publish(partial, target, overwrite)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target


def check_output_folder(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise ReportError(f"{target}: exists and is not a folder; choose another --output")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ReportError(f"{target}: output folder exists and is not empty; choose another (--output) or allow overwriting it (--overwrite)")


def _make_sibling_dir(target: Path, marker: str) -> Path:
    """A new hidden folder beside ``target``; os.mkdir (not mkdtemp) so it gets the umask's permissions."""
    while True:
        candidate = target.parent / f".{target.name}{marker}{secrets.token_hex(_RANDOM_HEX_BYTES)}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def _publish(partial: Path, target: Path, overwrite: bool) -> None:
    """Rename the complete ``partial`` to ``target``; an absent or empty ``target`` is taken in one step.

    With ``overwrite`` an old report is set aside first and removed once the new one is in place.
    Without it, the rename fails rather than replace a non-empty folder (rename(2) never does), so a
    report another run wrote meanwhile is kept.
    """
    old = None
    if overwrite and target.is_dir() and any(target.iterdir()):
        old = target.with_name(f".{target.name}{OLD_MARKER}{secrets.token_hex(_RANDOM_HEX_BYTES)}")
        os.rename(target, old)
    try:
        os.rename(partial, target)
    except BaseException as error:
        if old is not None:
            os.rename(old, target)
        if isinstance(error, OSError) and error.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise ReportError(
                f"{target}: another report appeared there while this run was writing; this run's report was "
                f"not written: move that report away, then `sparkml-mnist train --resume {target}` writes this "
                "run's (its state is kept)"
            ) from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_contents(
    folder: Path,
    results: list[VariantResult],
    config: Any,
    versions: Mapping[str, str] | None,
    timings: Mapping[str, float] | None,
) -> None:
    model_paths: dict[str, list[str]] = {}
    for result in results:
        model_paths[result.name] = _copy_models(folder, result)
        save_figure(loss_figure(result), folder / result.loss_plot)
        save_figure(confusion_figure(result), folder / result.confusion_plot)
    save_figure(comparison_figure(results), folder / COMPARISON_PNG)

    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": to_json_safe(config),
        "versions": {**collect_versions(), **dict(versions or {})},
        "timings": to_json_safe(dict(timings or {})),
        "variants": [to_json_safe(r.to_dict(model_paths[r.name])) for r in results],
        "files": {"markdown": REPORT_MD, "comparison_plot": COMPARISON_PNG},
    }
    text = json.dumps(report, indent=2, allow_nan=False)
    (folder / REPORT_JSON).write_text(text + "\n", encoding="utf-8")
    (folder / REPORT_MD).write_text(render_markdown(report, results), encoding="utf-8")


def _copy_models(folder: Path, result: VariantResult) -> list[str]:
    copied = []
    for source in result.model_files:
        relative = Path(MODELS_DIR) / result.name / source.name
        destination = folder / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():  # a SavedModel folder
            shutil.copytree(source, destination)
        else:
            shutil.copy2(source, destination)
        copied.append(relative.as_posix())
    return copied


def collect_versions() -> dict[str, str]:
    """Python and the installed versions of the packages that shape a run (without importing them)."""
    versions = {"python": sys.version.split()[0]}
    for package in VERSIONED_PACKAGES:
        version = installed_version(package)
        if version is not None:
            versions[package] = version
    return versions


def to_json_safe(value: Any) -> Any:
    """Dataclasses, mappings, sequences, paths and numpy values -> JSON types; NaN and infinity -> None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_json_safe(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return to_json_safe(value.tolist())
    if isinstance(value, np.generic):
        return to_json_safe(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return [to_json_safe(v) for v in sorted(value, key=str)]
    if isinstance(value, (list, tuple)):
        return [to_json_safe(v) for v in value]
    return str(value)
