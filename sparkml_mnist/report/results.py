"""The report's result model: what one trained variant shows, plain data filled in by the caller."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from sparkml_mnist.config.variants import safe_name
from sparkml_mnist.errors import SparkMnistError
from sparkml_mnist.job.metrics import Evaluation

LOSS_PNG_SUFFIX = "-loss.png"
CONFUSION_PNG_SUFFIX = "-confusion.png"
# The key of VariantResult.seconds that is the variant's wall time; without it the values are summed.
WALL_TIME_KEY = "total"


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
    attempts: list[dict[str, Any]] = field(default_factory=list)  # the launcher's attempts (retries)
    seed: int | None = None
    deterministic: bool = False
    ranks: dict[str, Any] = field(default_factory=dict)  # per-rank step rates and the straggler line, if any

    def __post_init__(self) -> None:
        where = f"variant {self.name!r}"
        problem = safe_name(self.name) if isinstance(self.name, str) else "is not a string"
        if problem:
            raise ReportError(f"{where}: name {problem}")
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
            "attempts": self.attempts,
            "seed": self.seed,
            "deterministic": self.deterministic,
            "ranks": self.ranks,
            "seconds": self.seconds,
            "files": {"loss_plot": self.loss_plot, "confusion_plot": self.confusion_plot, "models": list(model_paths)},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], model_files: Sequence[Path] = ()) -> VariantResult:
        """The inverse of ``to_dict`` (a finished variant kept in the run's state, read back on resume)."""
        return cls(
            name=data["name"], description=data["description"], np=data["np"], epochs=data["epochs"],
            history=data["history"], evaluation=Evaluation.from_dict(data["test"]),
            parameter_count=data["parameter_count"], rank_records=data.get("rank_records", []),
            seconds=data.get("seconds", {}), lab_reference_accuracy=data.get("lab_reference_accuracy"),
            model_files=list(model_files), attempts=data.get("attempts", []), seed=data.get("seed"),
            deterministic=bool(data.get("deterministic", False)), ranks=data.get("ranks", {}),
        )
