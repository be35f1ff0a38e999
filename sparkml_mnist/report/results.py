"""The report's result model: one model's test metrics and what one trained variant shows, plain data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from sparkml_mnist.errors import SparkMnistError

LOSS_PNG_SUFFIX = "-loss.png"
CONFUSION_PNG_SUFFIX = "-confusion.png"
# The key of VariantResult.seconds that is the variant's wall time; without it the values are summed.
WALL_TIME_KEY = "total"


class ReportError(SparkMnistError):
    """The report cannot be written (the output folder exists and is not empty, or is a file)."""


@dataclass(frozen=True)
class Evaluation:
    """Test-set metrics of one model: loss and accuracy as Keras reports them, per-class scores as sklearn does."""

    loss: float
    accuracy: float
    num_examples: int
    class_names: tuple[str, ...]
    precision: tuple[float, ...]
    recall: tuple[float, ...]
    f1: tuple[float, ...]
    support: tuple[int, ...]
    confusion: tuple[tuple[int, ...], ...]  # confusion[true][predicted], sklearn's orientation

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def confusion_matrix(self) -> np.ndarray:
        """The confusion matrix as an int array (rows: true class, columns: predicted class)."""
        return np.array(self.confusion, dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values only, ready for ``json.dumps``."""
        return {
            "loss": self.loss,
            "accuracy": self.accuracy,
            "num_examples": self.num_examples,
            "class_names": list(self.class_names),
            "per_class": [
                {"class": name, "precision": p, "recall": r, "f1": f, "support": s}
                for name, p, r, f, s in zip(self.class_names, self.precision, self.recall, self.f1, self.support)
            ],
            "confusion_matrix": [list(row) for row in self.confusion],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Evaluation:
        """The inverse of :meth:`to_dict` (for reading a ``report.json`` back)."""
        per_class = data["per_class"]
        return cls(
            loss=float(data["loss"]),
            accuracy=float(data["accuracy"]),
            num_examples=int(data["num_examples"]),
            class_names=tuple(str(name) for name in data["class_names"]),
            precision=tuple(float(row["precision"]) for row in per_class),
            recall=tuple(float(row["recall"]) for row in per_class),
            f1=tuple(float(row["f1"]) for row in per_class),
            support=tuple(int(row["support"]) for row in per_class),
            confusion=tuple(tuple(int(v) for v in row) for row in data["confusion_matrix"]),
        )


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
