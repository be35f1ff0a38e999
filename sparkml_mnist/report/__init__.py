"""The run's report: result model (``Evaluation``, ``VariantResult``), atomic output folder, Markdown, figures.

``write_report(folder, results, ...)`` writes report.json, report.md, the plots and the models.
"""

from sparkml_mnist.report.figures import comparison_figure, confusion_figure, loss_figure, save_figure
from sparkml_mnist.report.folder import (
    MODELS_DIR,
    REPORT_JSON,
    check_output_folder,
    collect_versions,
    to_json_safe,
    write_report,
)
from sparkml_mnist.report.markdown import (
    COMPARISON_PNG,
    REPORT_MD,
    format_seconds,
    format_summary_table,
    render_markdown,
    summary_rows,
)
from sparkml_mnist.report.results import Evaluation, ReportError, VariantResult

__all__ = [
    "COMPARISON_PNG", "Evaluation", "MODELS_DIR", "REPORT_JSON", "REPORT_MD", "ReportError", "VariantResult",
    "check_output_folder", "collect_versions", "comparison_figure", "confusion_figure", "format_seconds",
    "format_summary_table", "loss_figure", "render_markdown", "save_figure", "summary_rows", "to_json_safe",
    "write_report",
]
