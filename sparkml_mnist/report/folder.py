"""The run's output folder, written atomically: it appears under its name only when complete.

Everything is written into a hidden sibling (``.<name>.partial-<random>``) that is renamed into
place at the end, so a crash leaves no half-written report under the name a person or a pipeline
looks for. A rename never replaces a non-empty folder, so a report that appeared meanwhile is
kept; an existing report is replaced only by ``overwrite``, after the new one is complete (the old
one survives a failure), and only when the folder holds this tool's report and nothing else: report.json
with this tool's marker, and only the entries that report names (report.md, the plots, models/); a
folder with anything else of the user's in it is refused, naming the first such entry. What a killed
run left beside the folder (its ``.partial-`` and ``.old-`` siblings) is cleaned by the next run into
it (``remove_leftovers``), which holds the output's claim while it does.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import secrets
import shutil
import stat
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from sparkml_mnist.launcher.packages import installed_version
from sparkml_mnist.report.figures import comparison_figure, confusion_figure, loss_figure, save_figure
from sparkml_mnist.report.markdown import COMPARISON_PNG, REPORT_MD, render_markdown
from sparkml_mnist.report.results import CONFUSION_PNG_SUFFIX, LOSS_PNG_SUFFIX, ReportError, VariantResult

REPORT_JSON = "report.json"
MODELS_DIR = "models"
REPORT_SCHEMA_VERSION = 1
# report.json's first key: which tool wrote the folder (--overwrite replaces only a folder holding this tool's report).
GENERATOR_KEY = "generator"
REPORT_GENERATOR = "sparkml-mnist"
# report.json's "files" in every report (those written before the marker are known by it and the schema version).
REPORT_FILES = {"markdown": REPORT_MD, "comparison_plot": COMPARISON_PNG}
REPORT_JSON_MAX_BYTES = 64 * 2**20  # far above any report's; a larger report.json is not this tool's
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
    An existing non-empty ``output_dir`` is an error unless ``overwrite`` and it holds only an earlier
    report of this tool; it is then replaced in one step after the new report is complete (the old one
    survives a failure).
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
    """``target`` may receive the report: absent, empty, or (``overwrite``) holding only this tool's report."""
    if target.exists() and not target.is_dir():
        raise ReportError(f"{target}: exists and is not a folder; choose another --output")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not overwrite:
        raise ReportError(f"{target}: output folder exists and is not empty; choose another (--output) or allow overwriting it (--overwrite)")
    foreign = foreign_entry(target)
    if foreign is not None:
        raise ReportError(
            f"{target}: --overwrite replaces only a folder holding a {REPORT_GENERATOR} report and nothing else, "
            f"and this one holds {foreign}; move that away, or choose another --output"
        )


def foreign_entry(folder: Path) -> str | None:
    """The first entry of ``folder`` (sorted by name) that is not part of this tool's report, described; None
    when the folder holds this tool's report and nothing else (so that --overwrite may replace it).

    The report is report.json with this tool's marker; its own entries are report.md, comparison.png, each
    variant's two plots and models/<variant>/<the model files report.json lists>, as plain files and folders.
    """
    report = _tool_report(folder / REPORT_JSON)
    entries = sorted(folder.iterdir(), key=lambda path: path.name)
    if not entries:
        return None
    if report is None:
        named = folder / REPORT_JSON if (folder / REPORT_JSON) in entries else entries[0]
        return f"{named.name!r}" + (f" (not a {REPORT_GENERATOR} report)" if named.name == REPORT_JSON else "")
    variants: dict[str, set[str]] = {}
    for entry in report["variants"]:
        name = entry.get("name") if isinstance(entry, dict) else None
        files = entry.get("files") if isinstance(entry, dict) else None
        models = files.get("models") if isinstance(files, dict) else None
        if isinstance(name, str) and isinstance(models, list):
            variants[name] = {Path(model).name for model in models
                              if isinstance(model, str) and Path(model).parts == (MODELS_DIR, name, Path(model).name)}
    files = {REPORT_JSON, REPORT_MD, COMPARISON_PNG}
    files |= {f"{name}{suffix}" for name in variants for suffix in (LOSS_PNG_SUFFIX, CONFUSION_PNG_SUFFIX)}
    for entry in entries:
        if entry.name == MODELS_DIR and _plain(entry, stat.S_ISDIR):
            for model_folder in sorted(entry.iterdir(), key=lambda path: path.name):
                known = variants.get(model_folder.name)
                if known is None or not _plain(model_folder, stat.S_ISDIR):
                    return repr(f"{MODELS_DIR}/{model_folder.name}")
                for model in sorted(model_folder.iterdir(), key=lambda path: path.name):
                    if model.name not in known or model.is_symlink():
                        return repr(f"{MODELS_DIR}/{model_folder.name}/{model.name}")
        elif entry.name not in files or not _plain(entry, stat.S_ISREG):
            return repr(entry.name)
    return None


def _plain(path: Path, is_kind: Any) -> bool:
    """``path`` is, itself (not through a link), of the kind ``is_kind`` tests (``stat.S_ISREG``, ``S_ISDIR``)."""
    try:
        return bool(is_kind(os.lstat(path).st_mode))
    except OSError:
        return False


def _tool_report(path: Path) -> dict[str, Any] | None:
    """report.json as this tool writes it (marked, or an earlier version's: same schema and files), else None."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with os.fdopen(descriptor, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                return None
            report = json.loads(file.read(REPORT_JSON_MAX_BYTES + 1).decode("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or not isinstance(report.get("variants"), list):
        return None
    marked = report.get(GENERATOR_KEY) == REPORT_GENERATOR
    earlier = GENERATOR_KEY not in report and report.get("schema_version") == REPORT_SCHEMA_VERSION
    return report if (marked or earlier) and report.get("files") == REPORT_FILES else None


def remove_leftovers(target: Path) -> Path | None:
    """Remove what killed runs into ``target`` left beside it; the caller holds ``target``'s claim.

    A half-written report (``.<name>.partial-<hex>``) goes. An old report --overwrite had set aside
    (``.<name>.old-<hex>``) goes once the new one is in place; if the run was killed between the two renames
    (``target`` is absent), it is put back under ``target`` instead, and its former name returned. Only this
    user's folders named so for ``target`` are touched: another output's, or another user's, are left as they are.
    """
    target = target.absolute()
    if not target.parent.is_dir():
        return None
    pattern = re.compile(
        rf"^\.{re.escape(target.name)}(?P<marker>{re.escape(PARTIAL_MARKER)}|{re.escape(OLD_MARKER)})"
        rf"[0-9a-f]{{{2 * _RANDOM_HEX_BYTES}}}$"
    )
    found: dict[str, list[tuple[float, Path]]] = {PARTIAL_MARKER: [], OLD_MARKER: []}
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if match is None:
            continue
        try:
            info = os.lstat(entry)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
            found[match.group("marker")].append((info.st_mtime, entry))
    restored = None
    old = [path for _, path in sorted(found[OLD_MARKER], reverse=True)]  # the newest first
    if old and not os.path.lexists(target):
        restored = old.pop(0)
        os.rename(restored, target)
    for path in [path for _, path in found[PARTIAL_MARKER]] + old:
        shutil.rmtree(path, ignore_errors=True)
    return restored


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
        check_output_folder(target, overwrite)  # again: the user may have put something there meanwhile
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
        GENERATOR_KEY: REPORT_GENERATOR,
        "schema_version": REPORT_SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": to_json_safe(config),
        "versions": {**collect_versions(), **dict(versions or {})},
        "timings": to_json_safe(dict(timings or {})),
        "variants": [to_json_safe(r.to_dict(model_paths[r.name])) for r in results],
        "files": dict(REPORT_FILES),
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
