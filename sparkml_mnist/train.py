"""What one rank does: its partition -> tensors -> distributed dataset -> ``fit`` -> history (and rank 0's weights).

Runs inside the launcher's fresh child process for each rank, so TensorFlow is imported here, after
the launcher set the backend's variables (``TF_CONFIG`` or Horovod's), ``TF_USE_LEGACY_KERAS`` and the
thread and device settings. The backend decides the model scope, the optimizer wrapper and the
callbacks, so the same function trains under ``tf``, ``horovod`` and ``jax`` (Keras 3 there). The run was planned on the
driver (``sparkml_mnist.plan``): the global batch splits evenly across the ranks, XLA fits them.
"""

from __future__ import annotations

import time
from typing import Any

from sparkml_mnist import keras_flavour
from sparkml_mnist.config import VariantConfig
from sparkml_mnist.data.split import ShardPlan
from sparkml_mnist.distributed.context import RankContext
from sparkml_mnist.errors import DataError
from sparkml_mnist.inputs import distributed_dataset, shard_tensors, steps_per_epoch
from sparkml_mnist.models import build_model
from sparkml_mnist.saved_models import KERAS_3_MODEL, keras3_model_bytes

CHIEF_RANK = 0


def _epoch_logger(keras: Any, context: RankContext, variant: VariantConfig, steps: int) -> Any:
    """Rank 0 sends one line per epoch to the driver's output."""

    class EpochLogger(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            metrics = "  ".join(f"{name} {value:.4f}" for name, value in (logs or {}).items())
            seconds = time.perf_counter() - self.started
            context.log(
                f"{variant.name} epoch {epoch + 1}/{variant.epochs}: {metrics}  ({steps} steps, {seconds:.1f} s)"
            )

    return EpochLogger()


def _epoch_timer(keras: Any, seconds: list[float]) -> Any:
    """Every rank times its epochs (fit's own time, validation included) for throughput figures."""

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            seconds.append(time.perf_counter() - self.started)

    return EpochTimer()


def _check_shard(rows: int, expected: int, part: str, context: RankContext) -> None:
    if rows != expected:
        raise DataError(
            "<shard>", f"rank {context.rank} received {rows} {part} rows, the shard plan says {expected}",
            hint="Give the launcher the frame of shard_frame(data, np) together with its plan",
        )


def train_rank(context: RankContext, variant: VariantConfig, plan: ShardPlan, seed: int) -> dict[str, Any]:
    """Train ``variant`` on this rank's shard of ``plan``; every rank returns the (identical) history."""
    from sparkml_mnist.distributed.callbacks import ProgressCallback  # imports Keras: only inside the rank

    keras = keras_flavour.keras()
    keras.utils.set_random_seed(seed)  # the same initial weights on every rank
    shard = shard_tensors(context.partition())
    _check_shard(len(shard.x_train), plan.train_per_shard, "training", context)
    _check_shard(len(shard.x_validation), plan.validation_per_shard, "validation", context)
    steps = steps_per_epoch(plan.train_per_shard, variant.batch_size, context.size)
    with context.model_scope():
        model = build_model(variant, wrap_optimizer=context.distributed_optimizer)
    fit_options: dict[str, Any] = {}
    if plan.validation_per_shard:
        validation_steps = steps_per_epoch(plan.validation_per_shard, variant.batch_size, context.size, "validation")
        fit_options = {
            "validation_data": distributed_dataset(
                context, (shard.x_validation, shard.y_validation), variant.batch_size, validation_steps
            ),
            "validation_steps": validation_steps,
        }
    epoch_seconds: list[float] = []
    # The backend's callbacks first: Horovod's metric averaging must run before the others read the logs.
    callbacks = [*context.fit_callbacks(), _epoch_timer(keras, epoch_seconds)]
    if context.rank == CHIEF_RANK:
        callbacks.append(_epoch_logger(keras, context, variant, steps))
    callbacks.append(ProgressCallback(context))
    history = model.fit(
        distributed_dataset(
            context, (shard.x_train, shard.y_train), variant.batch_size, steps, shuffle=True, seed=seed + context.rank
        ),
        epochs=variant.epochs,
        steps_per_epoch=steps,
        callbacks=callbacks,
        verbose=0,
        **fit_options,
    )
    return {
        "history": {name: [float(v) for v in values] for name, values in history.history.items()},
        "weights": model.get_weights() if context.rank == CHIEF_RANK else None,
        KERAS_3_MODEL: keras3_model_bytes(model) if context.rank == CHIEF_RANK else None,  # jax: the model itself
        "steps_per_epoch": steps,
        "epoch_seconds": epoch_seconds,
        "train_rows": int(len(shard.x_train)),
        "validation_rows": int(len(shard.x_validation)),
    }
