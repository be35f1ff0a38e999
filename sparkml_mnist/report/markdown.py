"""Text: the report's Markdown and the console's summary table (the same figures in both)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from sparkml_mnist.report.results import VariantResult

REPORT_MD = "report.md"
COMPARISON_PNG = "comparison.png"
# Keras History keys, in the order the per-epoch tables show them; any others follow alphabetically.
HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")
PERCENT = 100.0
# Table cells show 4 decimals (losses, accuracies) below this, 1 above (timestamps, seconds).
LARGE_NUMBER = 1e4


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
                percent(r.evaluation.accuracy),
                f"{r.evaluation.loss:.4f}",
                percent(ref) if ref is not None else "-",
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
            f"{r.evaluation.num_examples:,} images: accuracy {percent(r.evaluation.accuracy)}, "
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
        if len(r.attempts) > 1:
            out += ["### Attempts", ""]
            out += _attempts_table(r.attempts)
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


def _attempts_table(attempts: Sequence[Mapping[str, Any]]) -> list[str]:
    """A run that was retried: each attempt, what ended it, where the next one resumed, what it cost."""
    rows = []
    for attempt in attempts:
        resumed = attempt.get("resumed_from_epoch")
        cost = attempt.get("seconds_from_failure_to_first_step")
        rows.append([
            str(attempt.get("number", "?")), _md(attempt.get("outcome", "?")),
            "start" if resumed is None else f"after epoch {resumed}",
            "-" if cost is None else format_seconds(cost), _md(attempt.get("cause") or "-"),
        ])
    header = ["attempt", "outcome", "resumed", "failure to first step", "cause"]
    return _markdown_table(header, rows, {0})


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


def percent(fraction: float) -> str:
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
