"""The run's output folder: report.json, report.md, the plots and the models (driver only, no Spark).

The folder appears only when complete: everything is written into a hidden sibling
(``.<name>.partial-<random>``) that is renamed into place at the end, so a crash leaves no
half-written report under the name a person or a pipeline looks for. Plots are drawn on
``matplotlib.figure.Figure`` objects with the Agg canvas: no pyplot, no global backend switch, safe
in a notebook or a headless driver.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import secrets
import shutil
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from sparkml_mnist.errors import SparkMnistError
from sparkml_mnist.evaluate import Evaluation

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
COMPARISON_PNG = "comparison.png"
LOSS_PNG_SUFFIX = "-loss.png"
CONFUSION_PNG_SUFFIX = "-confusion.png"
MODELS_DIR = "models"
REPORT_SCHEMA_VERSION = 1
PARTIAL_MARKER = ".partial-"
OLD_MARKER = ".old-"
_RANDOM_HEX_BYTES = 4

# The key of VariantResult.seconds that is the variant's wall time; without it the values are summed.
WALL_TIME_KEY = "total"
# Keras History keys, in the order the per-epoch tables show them; any others follow alphabetically.
HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")
# Packages whose versions every report records (looked up without importing them).
VERSIONED_PACKAGES = (
    "sparkml-mnist",
    "pyspark",
    "tensorflow",
    "tensorflow-cpu",
    "tf-keras",
    "keras",
    "numpy",
    "scikit-learn",
    "matplotlib",
    "pyarrow",
)
# A variant name becomes part of file names: keep it to characters that are safe everywhere.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Figures: sizes in inches at this resolution give ~1000 px wide PNGs, readable in a Markdown viewer.
FIGURE_DPI = 150
LOSS_FIGSIZE = (7.0, 4.5)
CONFUSION_FIGSIZE = (7.0, 6.0)
COMPARISON_WIDTH_PER_VARIANT = 1.6
COMPARISON_MIN_WIDTH = 6.0
COMPARISON_HEIGHT = 4.5
COMPARISON_BAR_WIDTH = 0.6
# A bar shorter than this fraction of the axis gets its figure above it rather than inside.
SHORT_BAR_FRACTION = 0.15
REFERENCE_LINE_WIDTH = 3
LABEL_OFFSET_POINTS = 3
FONT_SIZE = 10
SMALL_FONT_SIZE = 9
# Confusion cells fit 3-digit counts at FONT_SIZE; each further digit takes a point off, down to this.
DIGITS_AT_FULL_SIZE = 3
SMALLEST_FONT_SIZE = 6
# Up to this many epochs the loss plot labels every epoch; beyond, matplotlib picks integer ticks.
MAX_EPOCH_TICKS = 20
CONFUSION_CMAP = "Blues"
# Text on a confusion cell darker than this fraction of the colour scale is drawn white.
CONFUSION_DARK_CELL = 0.5
# The log colour scale starts below 1 so that cells of a single image are visibly tinted, not white.
CONFUSION_LOG_FLOOR = 0.5
# The comparison plot's accuracy axis starts this far below the lowest figure (bars differ by tenths).
COMPARISON_AXIS_MARGIN = 0.02
COMPARISON_AXIS_STEP = 0.01
# ... but only when every figure is well above chance; otherwise the axis starts at 0.
COMPARISON_ZOOM_FLOOR = 0.5
PERCENT = 100.0
# Table cells show 4 decimals (losses, accuracies) below this, 1 above (timestamps, seconds).
LARGE_NUMBER = 1e4


class ReportError(SparkMnistError):
    """The report cannot be written (folder exists, bad result data, a file to copy is missing)."""


@dataclass
class VariantResult:
    """Everything the report shows about one trained variant; plain data, filled in by the caller.

    ``history`` is Keras ``History.history`` (rank 0's: every rank's is identical under
    data-parallel training). ``seconds`` holds named timings; ``seconds["total"]`` is the wall time
    shown in the tables (the sum of the values when absent). ``model_files`` are copied into
    ``models/<name>/`` of the report folder; the originals stay where they are.
    """

    name: str
    description: str
    np: int
    epochs: int
    history: dict[str, list[float]]
    evaluation: Evaluation
    parameter_count: int
    rank_records: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    lab_reference_accuracy: float | None = None
    model_files: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        where = f"variant {self.name!r}"
        if not isinstance(self.name, str) or not _SAFE_NAME.match(self.name):
            raise ReportError(
                f"{where}: name must be letters, digits, '_', '.' or '-' (it names the plot files)"
            )
        if isinstance(self.np, bool) or not isinstance(self.np, int) or self.np == 0:
            raise ReportError(f"{where}: field 'np' must be a non-zero integer, got {self.np!r}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ReportError(f"{where}: field 'epochs' must be a positive integer, got {self.epochs!r}")
        if not isinstance(self.evaluation, Evaluation):
            got = type(self.evaluation).__name__
            raise ReportError(f"{where}: field 'evaluation' must be an Evaluation, got {got}")
        self.history = {str(key): [float(v) for v in values] for key, values in self.history.items()}
        lengths = {key: len(values) for key, values in self.history.items()}
        if any(length > self.epochs for length in lengths.values()):
            raise ReportError(f"{where}: field 'history' has more entries than its {self.epochs} epochs: {lengths}")
        if len(set(lengths.values())) > 1:
            raise ReportError(f"{where}: field 'history' series differ in length: {lengths}")
        ref = self.lab_reference_accuracy
        if ref is not None and not (0.0 <= ref <= 1.0):
            raise ReportError(f"{where}: field 'lab_reference_accuracy' must be a fraction in [0, 1], got {ref!r}")
        self.model_files = [Path(p) for p in self.model_files]

    @property
    def wall_seconds(self) -> float | None:
        if WALL_TIME_KEY in self.seconds:
            return float(self.seconds[WALL_TIME_KEY])
        return float(sum(self.seconds.values())) if self.seconds else None

    @property
    def loss_plot(self) -> str:
        return f"{self.name}{LOSS_PNG_SUFFIX}"

    @property
    def confusion_plot(self) -> str:
        return f"{self.name}{CONFUSION_PNG_SUFFIX}"

    def to_dict(self, model_paths: Sequence[str] = ()) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "np": self.np,
            "epochs": self.epochs,
            "parameter_count": self.parameter_count,
            "lab_reference_accuracy": self.lab_reference_accuracy,
            "history": self.history,
            "test": self.evaluation.to_dict(),
            "rank_records": self.rank_records,
            "seconds": self.seconds,
            "files": {"loss_plot": self.loss_plot, "confusion_plot": self.confusion_plot, "models": list(model_paths)},
        }


# ---------------------------------------------------------------------------------------------
# The folder


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
    _check_results(results)
    target = Path(output_dir).absolute()
    check_output_folder(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)

    partial = _make_sibling_dir(target, PARTIAL_MARKER)
    try:
        _write_contents(partial, results, config, versions, timings)
        _move_into_place(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target


def _check_results(results: list[VariantResult]) -> None:
    if not results:
        raise ReportError("no variant results to report")
    for result in results:
        if not isinstance(result, VariantResult):
            raise ReportError(f"results must be VariantResult objects, got {type(result).__name__}")
    names = [r.name for r in results]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ReportError(f"variant name(s) appear more than once: {', '.join(duplicates)}")
    for result in results:
        for path in result.model_files:
            if not path.exists():
                raise ReportError(f"variant {result.name!r}: model file {path} does not exist")


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


def _move_into_place(partial: Path, target: Path) -> None:
    """Rename ``partial`` to ``target``; an existing ``target`` is set aside first and removed after."""
    if not target.exists():
        os.rename(partial, target)
        return
    old = _make_sibling_dir(target, OLD_MARKER)
    old.rmdir()
    os.rename(target, old)
    try:
        os.rename(partial, target)
    except BaseException:
        os.rename(old, target)
        raise
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
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
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


# ---------------------------------------------------------------------------------------------
# Text: the Markdown report and the console table


def summary_rows(results: Sequence[VariantResult]) -> list[list[str]]:
    """The summary table's cells, header first: the same figures in report.md and on the console."""
    rows = [["variant", "np", "epochs", "params", "test accuracy", "test loss", "lab reference", "vs lab", "wall time"]]
    for r in results:
        ref = r.lab_reference_accuracy
        rows.append(
            [
                r.name,
                str(r.np),
                str(r.epochs),
                f"{r.parameter_count:,}",
                _percent(r.evaluation.accuracy),
                f"{r.evaluation.loss:.4f}",
                _percent(ref) if ref is not None else "-",
                f"{(r.evaluation.accuracy - ref) * PERCENT:+.2f} pt" if ref is not None else "-",
                format_seconds(r.wall_seconds),
            ]
        )
    return rows


def format_summary_table(results: Sequence[VariantResult]) -> str:
    """The final console table, plain text with aligned columns (text left, numbers right)."""
    rows = summary_rows(results)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = [cell.ljust(w) if col == 0 else cell.rjust(w) for col, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(report: Mapping[str, Any], results: Sequence[VariantResult]) -> str:
    """report.md: the summary table, the comparison plot, then one section per variant."""
    out = ["# MNIST ConvNets trained on Spark: run report", ""]
    versions = report.get("versions", {})
    stamp = f"Written {report.get('created', '')}"
    if versions:
        stamp += "; " + ", ".join(f"{k} {v}" for k, v in versions.items())
    out += [stamp + ".", ""]
    rows = summary_rows(results)
    right_aligned = {1, 2, 3, 4, 5, 6, 7, 8}
    out += _markdown_table(rows[0], rows[1:], right_aligned)
    out += ["", f"![Test accuracy per variant against the lab's figures]({COMPARISON_PNG})", ""]
    timings = report.get("timings") or {}
    if timings:
        out += ["Run timings: " + ", ".join(f"{k} {format_seconds(v)}" for k, v in timings.items()) + ".", ""]

    entries = list(report.get("variants") or [])
    entries += [{}] * (len(results) - len(entries))
    for r, entry in zip(results, entries):
        out += [f"## {_md(r.name)}", ""]
        if r.description:
            out += [_md(r.description), ""]
        out += [
            f"{r.parameter_count:,} parameters, {r.epochs} epochs, np={r.np}; test set of "
            f"{r.evaluation.num_examples:,} images: accuracy {_percent(r.evaluation.accuracy)}, "
            f"loss {r.evaluation.loss:.4f}.",
            "",
            "### Per epoch",
            "",
        ]
        out += _history_table(r.history)
        out += ["", f"![Training and validation loss of {r.name}]({r.loss_plot})", "", "### Per class (test set)", ""]
        ev = r.evaluation
        class_rows = [
            [_md(name), f"{p:.4f}", f"{rc:.4f}", f"{f:.4f}", str(s)]
            for name, p, rc, f, s in zip(ev.class_names, ev.precision, ev.recall, ev.f1, ev.support)
        ]
        out += _markdown_table(["class", "precision", "recall", "f1", "support"], class_rows, {1, 2, 3, 4})
        out += ["", f"![Confusion matrix of {r.name}]({r.confusion_plot})", ""]
        models = entry.get("files", {}).get("models", [])
        if models:
            out += ["Model: " + ", ".join(f"[{_md(m)}]({m})" for m in models), ""]
        if r.rank_records:
            out += ["### Ranks", ""]
            out += _records_table(r.rank_records)
            out += [""]
    return "\n".join(out)


def _history_table(history: Mapping[str, list[float]]) -> list[str]:
    keys = [k for k in HISTORY_KEYS if k in history] + sorted(k for k in history if k not in HISTORY_KEYS)
    epochs = max((len(v) for v in history.values()), default=0)
    if not keys or epochs == 0:
        return ["No per-epoch history was recorded."]
    rows = [[str(e + 1)] + [_number(history[k][e]) for k in keys] for e in range(epochs)]
    return _markdown_table(["epoch", *keys], rows, set(range(len(keys) + 1)))


def _records_table(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Rank records are free-form dicts: show their scalar fields, in first-seen order."""
    keys: list[str] = []
    for record in records:
        for key, value in record.items():
            if key not in keys and (value is None or isinstance(value, (str, int, float, np.generic))):
                keys.append(key)
    rows = [[_md(_number(rec.get(k)) if rec.get(k) is not None else "-") for k in keys] for rec in records]
    return _markdown_table(keys, rows, set())


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    align = ["---:" if i in right else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(_md(h) for h in header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _md(text: Any) -> str:
    """Table-safe Markdown text: pipes escaped, newlines flattened."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _number(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4f}" if abs(value) < LARGE_NUMBER else f"{value:.1f}"
    return str(value)


def _percent(fraction: float) -> str:
    return f"{fraction * PERCENT:.2f}%"


def format_seconds(seconds: float | None) -> str:
    """``83.2 s`` below two minutes, ``12m 05s`` above; ``-`` when unknown."""
    if seconds is None:
        return "-"
    minute = 60
    if seconds < 2 * minute:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), minute)
    return f"{minutes}m {rest:02d}s"


# ---------------------------------------------------------------------------------------------
# Figures


def save_figure(figure: Figure, path: Path) -> None:
    """Render with the Agg canvas (no pyplot, no global backend) and write a PNG."""
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=FIGURE_DPI, format="png")


def loss_figure(result: VariantResult) -> Figure:
    """The lab's figure: training and validation loss per epoch."""
    figure = Figure(figsize=LOSS_FIGSIZE, layout="constrained")
    ax = figure.add_subplot()
    series = [("loss", "training loss", "o-"), ("val_loss", "validation loss", "s--")]
    drawn = False
    for key, label, style in series:
        values = result.history.get(key)
        if values:
            ax.plot(range(1, len(values) + 1), values, style, label=label)
            drawn = True
    if drawn:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no loss history recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"{result.name}: training and validation loss per epoch")
    ax.set_xlabel("epoch")
    ax.set_ylabel("categorical cross-entropy")
    longest = max((len(result.history.get(k) or []) for k, _, _ in series), default=0)
    if 0 < longest <= MAX_EPOCH_TICKS:
        ax.set_xticks(range(1, longest + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    return figure


def confusion_figure(result: VariantResult) -> Figure:
    """Annotated confusion matrix; colours on a log scale so the few errors show beside the diagonal."""
    ev = result.evaluation
    matrix = ev.confusion_matrix
    figure = Figure(figsize=CONFUSION_FIGSIZE, layout="constrained")
    ax = figure.add_subplot()
    largest = max(int(matrix.max()), 1)
    norm = LogNorm(vmin=CONFUSION_LOG_FLOOR, vmax=max(largest, 2))
    shown = np.ma.masked_equal(matrix, 0)
    image = ax.imshow(shown, cmap=CONFUSION_CMAP, norm=norm)
    colorbar = figure.colorbar(image, ax=ax)
    colorbar.set_label("images (log scale; empty cells are 0)")
    classes = range(ev.num_classes)
    ax.set_xticks(list(classes), labels=list(ev.class_names))
    ax.set_yticks(list(classes), labels=list(ev.class_names))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{result.name}: confusion matrix, test accuracy {_percent(ev.accuracy)}")
    font_size = _annotation_font_size(largest)
    for true in classes:
        for predicted in classes:
            count = int(matrix[true, predicted])
            if count == 0:
                continue
            dark = norm(count) > CONFUSION_DARK_CELL
            ax.text(
                predicted,
                true,
                str(count),
                ha="center",
                va="center",
                fontsize=font_size,
                color="white" if dark else "black",
            )
    return figure


def _annotation_font_size(largest: int) -> float:
    """Smaller text when counts have more digits, so 4-5 digit counts still fit a cell."""
    extra_digits = max(0, len(str(largest)) - DIGITS_AT_FULL_SIZE)
    return max(SMALLEST_FONT_SIZE, FONT_SIZE - extra_digits)


COMPARISON_SIDE_MARGIN = 0.2  # x-axis units (one unit = one variant)
REFERENCE_LABEL_ROOM = 0.5  # x-axis units right of the last bar, for its lab-reference label


def comparison_figure(results: Sequence[VariantResult]) -> Figure:
    """Test accuracy per variant as bars, the lab's figure for each as a marker over its bar."""
    width = max(COMPARISON_MIN_WIDTH, COMPARISON_WIDTH_PER_VARIANT * len(results))
    figure = Figure(figsize=(width, COMPARISON_HEIGHT), layout="constrained")
    ax = figure.add_subplot()
    positions = np.arange(len(results))
    accuracies = [r.evaluation.accuracy for r in results]
    ax.bar(positions, accuracies, width=COMPARISON_BAR_WIDTH, color="tab:blue", label="this run (test accuracy)")
    references = [(i, r.lab_reference_accuracy) for i, r in enumerate(results) if r.lab_reference_accuracy is not None]
    half = COMPARISON_BAR_WIDTH / 2
    for number, (i, value) in enumerate(references):
        label = "lab reference" if number == 0 else None
        ax.hlines(value, i - half, i + half, colors="tab:red", linewidths=REFERENCE_LINE_WIDTH, zorder=3, label=label)
        ax.annotate(
            _percent(value),
            (i + half, value),
            xytext=(LABEL_OFFSET_POINTS, 0),
            textcoords="offset points",
            va="center",
            ha="left",
            fontsize=SMALL_FONT_SIZE,
            color="tab:red",
        )
    figures = accuracies + [v for _, v in references]
    lowest = math.floor((min(figures) - COMPARISON_AXIS_MARGIN) / COMPARISON_AXIS_STEP) * COMPARISON_AXIS_STEP
    bottom = lowest if lowest >= COMPARISON_ZOOM_FLOOR else 0.0
    headroom = COMPARISON_AXIS_MARGIN / 2 if bottom > 0 else COMPARISON_AXIS_MARGIN
    top = max(max(figures) + headroom, bottom + COMPARISON_AXIS_STEP)
    ax.set_ylim(bottom, top)
    for i, accuracy in zip(positions, accuracies):
        # The figure goes inside its bar in white, or above a bar too short to hold it.
        inside = (accuracy - bottom) / (top - bottom) >= SHORT_BAR_FRACTION
        ax.text(
            i,
            (bottom + accuracy) / 2 if inside else accuracy,
            _percent(accuracy),
            ha="center",
            va="center" if inside else "bottom",
            fontsize=FONT_SIZE,
            color="white" if inside else "black",
        )
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=1))
    ax.set_xticks(positions, labels=[r.name for r in results])
    # Room on the right for the last reference's label, which sits beside its bar.
    ax.set_xlim(-half - COMPARISON_SIDE_MARGIN, len(results) - 1 + half + REFERENCE_LABEL_ROOM)
    ax.set_xlabel("variant")
    ylabel = "test accuracy" + (" (axis does not start at 0)" if bottom > 0 else "")
    ax.set_ylabel(ylabel)
    ax.set_title("Test accuracy per variant against the lab's figures")
    figure.legend(loc="outside lower center", ncols=2, frameon=False)
    ax.grid(True, axis="y", alpha=0.3)
    return figure


def iter_report_files(folder: str | Path, results: Iterable[VariantResult]) -> list[Path]:
    """The files a complete report folder holds (for callers that list or check them)."""
    folder = Path(folder)
    files = [folder / REPORT_JSON, folder / REPORT_MD, folder / COMPARISON_PNG]
    for r in results:
        files += [folder / r.loss_plot, folder / r.confusion_plot]
    return files
