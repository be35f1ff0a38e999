"""What one rank does: its shard -> distributed dataset -> ``fit`` -> history (and rank 0's weights).

Runs inside the launcher's fresh child process for each rank, so TensorFlow is imported here, after
the launcher set the backend's variables (``TF_CONFIG`` or Horovod's), ``TF_USE_LEGACY_KERAS`` and the
thread and device settings. The backend decides the model scope, the optimizer wrapper and the
callbacks, so the same function trains under ``tf`` and ``horovod``.
"""

from __future__ import annotations

import time
from typing import Any

from sparkml_mnist.config import VariantConfig
from sparkml_mnist.distributed.context import RankContext
from sparkml_mnist.errors import LaunchError
from sparkml_mnist.keras_flavour import keras as keras_module

CHIEF_RANK = 0


def _epoch_logger(keras: Any, context: RankContext, variant: VariantConfig, steps: int) -> Any:
    """Rank 0 prints one line per epoch; the launcher streams it to the driver's console."""

    class EpochLogger(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            metrics = "  ".join(f"{name} {value:.4f}" for name, value in (logs or {}).items())
            seconds = time.perf_counter() - self.started
            print(
                f"{variant.name} epoch {epoch + 1}/{variant.epochs}: {metrics}  "
                f"({steps} steps, {seconds:.1f} s)",
                flush=True,
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


def train_rank(context: RankContext, variant: VariantConfig, seed: int) -> dict[str, Any]:
    """Train ``variant`` on this rank's shard; every rank returns the (identical) history."""
    from sparkml_mnist.models import build_model

    keras = keras_module()
    keras.utils.set_random_seed(seed)  # the same initial weights on every rank
    variant.check_replicas(context.size)
    variant.check_xla(context.size, bool(context.spec.gpus), context.spec.backend)  # also when called directly
    shard = context.shard
    if shard is None:
        raise LaunchError("train_rank needs the run's data: HorovodRunner(...).run(train_rank, data=shard_frame(...))")
    steps = context.steps_per_epoch(variant.batch_size)
    with context.model_scope():
        model = build_model(variant, wrap_optimizer=context.distributed_optimizer)
    fit_options: dict[str, Any] = {}
    if len(shard.x_validation):
        fit_options = {
            "validation_data": context.validation_dataset(variant.batch_size),
            "validation_steps": context.steps_per_epoch(variant.batch_size, validation=True),
        }
    epoch_seconds: list[float] = []
    # The backend's callbacks first: Horovod's metric averaging must run before the others read the logs.
    callbacks = [*context.fit_callbacks(), _epoch_timer(keras, epoch_seconds)]
    if context.rank == CHIEF_RANK:
        callbacks.append(_epoch_logger(keras, context, variant, steps))
    history = model.fit(
        context.train_dataset(variant.batch_size, shuffle=True, seed=seed + context.rank),
        epochs=variant.epochs,
        steps_per_epoch=steps,
        callbacks=callbacks,
        verbose=0,
        **fit_options,
    )
    return {
        "history": {name: [float(v) for v in values] for name, values in history.history.items()},
        "weights": model.get_weights() if context.rank == CHIEF_RANK else None,
        "steps_per_epoch": steps,
        "epoch_seconds": epoch_seconds,
        "train_rows": int(len(shard.x_train)),
        "validation_rows": int(len(shard.x_validation)),
    }
