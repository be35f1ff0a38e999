"""How many file rows go to training and validation, and to each of ``k`` equal shards (arithmetic only).

Imported by the ranks too (the plan travels with the training function), so it needs no Spark.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sparkml_mnist.errors import ConfigError, DataError


@dataclass(frozen=True)
class ShardPlan:
    """How ``num_rows`` file rows become ``num_shards`` equal training (and validation) shards.

    The validation split is the last ``validation_split`` of the rows, as Keras's
    ``validation_split`` takes it. Within each split, row ``i`` goes to shard ``i % k``; the
    last ``rows % k`` rows of each split are left out so every shard is the same size (at most
    ``k - 1`` rows lost per split), which keeps every rank on the same number of steps.
    """

    num_rows: int
    num_shards: int
    validation_split: float
    split_at: int
    train_per_shard: int
    validation_per_shard: int

    @property
    def train_rows(self) -> int:
        return self.split_at

    @property
    def validation_rows(self) -> int:
        return self.num_rows - self.split_at

    @property
    def dropped_train_rows(self) -> int:
        return self.train_rows - self.train_per_shard * self.num_shards

    @property
    def dropped_validation_rows(self) -> int:
        return self.validation_rows - self.validation_per_shard * self.num_shards


def validation_split_index(num_rows: int, validation_split: float, source: str = "input data") -> int:
    """First row of the validation split, computed exactly as tf_keras does."""
    if isinstance(validation_split, bool) or not 0.0 <= validation_split < 1.0:
        raise ConfigError(f"validation_split must be in [0, 1), got {validation_split!r}")
    split_at = int(math.floor(num_rows * (1.0 - validation_split)))
    if validation_split > 0 and split_at in (0, num_rows):
        raise DataError(
            source,
            f"{num_rows} rows are too few to split off validation_split={validation_split}",
            hint="Use more data or validation_split 0",
        )
    return split_at


def plan_shards(
    num_rows: int, num_shards: int, validation_split: float = 0.0, source: str = "input data"
) -> ShardPlan:
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ConfigError(f"number of shards (np) must be a positive integer, got {num_shards!r}")
    split_at = validation_split_index(num_rows, validation_split, source)
    plan = ShardPlan(
        num_rows=num_rows,
        num_shards=num_shards,
        validation_split=validation_split,
        split_at=split_at,
        train_per_shard=split_at // num_shards,
        validation_per_shard=(num_rows - split_at) // num_shards,
    )
    if plan.train_per_shard == 0:
        raise DataError(
            source,
            f"{plan.train_rows} training rows cannot fill {num_shards} shards",
            hint="Use fewer workers (np) or more data",
        )
    if plan.validation_rows and plan.validation_per_shard == 0:
        raise DataError(
            source,
            f"{plan.validation_rows} validation rows cannot fill {num_shards} shards",
            hint="Use fewer workers (np), more data or validation_split 0",
        )
    return plan
