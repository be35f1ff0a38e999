"""The launcher: run a function on several ranks, as Spark barrier tasks or driver processes.

``from sparkml_mnist.launcher import HorovodRunner, get_context, log_to_driver``. Names are
imported lazily so that a rank's training process, which imports submodules of this package,
stays light (``LogCallback`` imports Keras).
"""

from __future__ import annotations

from sparkml_mnist.lazy import lazy_exports

_EXPORTS = {
    "HorovodRunner": "sparkml_mnist.launcher.runner",
    "Placement": "sparkml_mnist.launcher.placement",
    "parse_placement": "sparkml_mnist.launcher.placement",
    "RankContext": "sparkml_mnist.launcher.rank.context",
    "get_context": "sparkml_mnist.launcher.rank.context",
    "log_to_driver": "sparkml_mnist.launcher.rank.context",
    "LogCallback": "sparkml_mnist.launcher.rank.callbacks",
    "ProgressCallback": "sparkml_mnist.launcher.rank.callbacks",
    "MlflowEpochs": "sparkml_mnist.launcher.mlflow_epochs",  # on_report: LogCallback's epochs -> MLflow, live
    "RankRecord": "sparkml_mnist.launcher.failures",
    "RunResult": "sparkml_mnist.launcher.runner",
    "FailurePolicy": "sparkml_mnist.launcher.policy",
    "Checkpoint": "sparkml_mnist.launcher.checkpoints",
    "RankError": "sparkml_mnist.launcher.failures",
    "RankFailedError": "sparkml_mnist.launcher.failures",
    "RankStalledError": "sparkml_mnist.launcher.failures",
    "PreflightError": "sparkml_mnist.launcher.failures",
    "ReportRefusedError": "sparkml_mnist.launcher.failures",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
