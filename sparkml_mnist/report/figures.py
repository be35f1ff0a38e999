"""The report's figures, drawn on ``matplotlib.figure.Figure`` with the Agg canvas.

No pyplot, no global backend switch: safe in a notebook or a headless driver.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from sparkml_mnist.report.markdown import percent
from sparkml_mnist.report.results import VariantResult

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
    what = "training and validation loss" if result.history.get("val_loss") else "training loss"  # no split: none
    ax.set_title(f"{result.name}: {what} per epoch")
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
    ax.set_title(f"{result.name}: confusion matrix, test accuracy {percent(ev.accuracy)}")
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
            percent(value),
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
            percent(accuracy),
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
