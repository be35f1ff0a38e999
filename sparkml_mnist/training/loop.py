"""What one rank does: its partition -> tensors -> distributed dataset -> ``fit`` -> history (and rank 0's weights).

Runs inside the launcher's fresh child process for each rank, so TensorFlow is imported here, after
the launcher set the backend's variables (``TF_CONFIG`` or Horovod's), ``TF_USE_LEGACY_KERAS`` and the
thread and device settings. The backend decides the model scope, the optimizer wrapper and the
callbacks, so the same function trains under ``tf``, ``horovod`` and ``jax`` (Keras 3 there). The run
was planned on the driver (``sparkml_mnist.job.plan``): the global batch splits evenly across the ranks,
XLA fits them.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc

from sparkml_mnist.launcher import keras_flavour

from sparkml_mnist.training import state as training_state
from sparkml_mnist.config import VariantConfig
from sparkml_mnist.data.columns import LAYOUT_COLUMN
from sparkml_mnist.data.split import ShardPlan
from sparkml_mnist.launcher.rank.context import RankContext
from sparkml_mnist.errors import DataError
from sparkml_mnist.training.inputs import ShardTensors, distributed_dataset, scale_images, shard_tensors, steps_per_epoch
from sparkml_mnist.training.models import build_model

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


def _epoch_checkpointer(keras: Any, context: RankContext, model: Any, history: dict[str, list[float]],
                        epoch_seconds: list[float], key: str) -> Any:
    """Rank 0 hands the driver a checkpoint after every epoch (weights, optimizer, history so far)."""

    class EpochCheckpoint(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            for name, value in (logs or {}).items():
                history.setdefault(name, []).append(float(value))
            context.save_checkpoint(training_state.pack(model, epoch + 1, history, epoch_seconds), epoch + 1, key)

    return EpochCheckpoint()


def make_deterministic(tf: Any, threads: int | None) -> None:
    """Same seed, same machine, same weights: deterministic kernels and fixed thread pools.

    On CPUs the job's runs were already bit-identical without it (measured: benchmarks/RESULTS.md,
    "Determinism"); GPU kernels with atomics are where this matters.
    """
    tf.config.experimental.enable_op_determinism()
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(threads or 1)


def determinism_settings(tf: Any) -> dict[str, Any]:
    """What this rank ran with, for the report (TensorFlow has no public query for op determinism)."""
    try:
        from tensorflow.python.framework import config as tf_config  # noqa: PLC0415 - private, read only

        op_determinism: bool | None = bool(tf_config.is_op_determinism_enabled())
    except (ImportError, AttributeError):
        op_determinism = None
    return {"op_determinism": op_determinism,
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads()}


@dataclass(frozen=True)
class VariantJob:
    """One variant of a job's barrier stage: its config, its shard plan, and its layout in the partition."""

    variant: VariantConfig
    plan: ShardPlan
    layout: int = 0


def train_rank(
    context: RankContext, variant: VariantConfig, plan: ShardPlan, seed: int, deterministic: bool = False,
    allreduce: str = "float32",
) -> dict[str, Any]:
    """Train ``variant`` on this rank's shard of ``plan``; every rank returns the (identical) history.

    Resumes from the run's last checkpoint when an earlier attempt left one (every epoch once in the
    history); rank 0 checkpoints every epoch.
    """
    keras = keras_flavour.keras()
    if deterministic:
        make_deterministic(keras_flavour.tensorflow(), context.spec.threads)
    checkpoint = context.latest_checkpoint()
    resumed = training_state.unpack(checkpoint.data) if checkpoint is not None else None
    return train_one(context, keras, variant, plan, shard_tensors(context.partition()), seed, "", resumed, allreduce)


def train_variants(
    context: RankContext, jobs: list[VariantJob], seed: int, deterministic: bool = False, allreduce: str = "float32",
) -> dict[str, dict[str, Any]]:
    """Train several variants one after the other in this one rank process: one TensorFlow import and
    one strategy for all of them (``context.partition()`` holds every job's layout).

    A variant whose last epoch's checkpoint the driver already has (an earlier attempt finished it) is
    skipped; one with an earlier checkpoint resumes from it. Each finished variant is reported to the
    driver at once (``report_result``), so it survives a later variant's failure.
    """
    keras = keras_flavour.keras()
    if deterministic:
        make_deterministic(keras_flavour.tensorflow(), context.spec.threads)
    table = context.partition()
    layouts = table.column(LAYOUT_COLUMN)
    trained: dict[str, dict[str, Any]] = {}
    for job in jobs:
        name = job.variant.name
        checkpoint = context.latest_checkpoint(name)
        resumed = training_state.unpack(checkpoint.data) if checkpoint is not None else None
        if resumed is not None and resumed.epoch >= job.variant.epochs:
            continue  # finished by an earlier attempt: the driver has its last checkpoint
        shard = shard_tensors(table.filter(pc.equal(layouts, job.layout)).drop_columns([LAYOUT_COLUMN]))
        summary = train_one(context, keras, job.variant, job.plan, shard, seed, name, resumed, allreduce)
        # The weights reach the driver in the last checkpoint: neither the report nor the return carries them.
        trained[name] = {key: value for key, value in summary.items() if key != "weights"}
        context.report_result(name, trained[name])
        del shard
        gc.collect()
    return trained


def train_one(
    context: RankContext, keras: Any, variant: VariantConfig, plan: ShardPlan, shard: ShardTensors, seed: int,
    key: str, resumed: training_state.TrainingState | None, allreduce: str = "float32",
) -> dict[str, Any]:
    """One variant on this rank's shard, resumed from ``resumed`` when given; rank 0 checkpoints every epoch
    under ``key``. Returns its history (and rank 0's weights) with what the report shows per rank."""
    from sparkml_mnist.launcher.rank.callbacks import ProgressCallback  # imports Keras: only inside the rank

    started_at, steps_before, examples_before = time.time(), context.progress.steps, context.progress.examples or 0
    context.progress.label = variant.name
    keras.utils.set_random_seed(seed)  # the same initial weights on every rank
    _check_shard(len(shard.x_train), plan.train_per_shard, "training", context)
    _check_shard(len(shard.x_validation), plan.validation_per_shard, "validation", context)
    steps = steps_per_epoch(plan.train_per_shard, variant.batch_size, context.size)
    with context.model_scope():
        model = build_model(variant, wrap_optimizer=lambda optimizer: context.distributed_optimizer(optimizer, allreduce))
        if resumed is not None:
            training_state.restore(model, resumed)
    first_epoch = resumed.epoch if resumed is not None else 0
    history: dict[str, list[float]] = resumed.history if resumed is not None else {}
    epoch_seconds: list[float] = resumed.epoch_seconds if resumed is not None else []
    if resumed is not None and context.rank == CHIEF_RANK:
        context.log(f"{variant.name}: attempt {context.attempt} resumes after epoch {first_epoch}")
    fit_options: dict[str, Any] = {}
    if plan.validation_per_shard:
        validation_steps = steps_per_epoch(plan.validation_per_shard, variant.batch_size, context.size, "validation")
        fit_options = {
            # evaluate() iterates it afresh each epoch: one epoch's batches, every time.
            "validation_data": distributed_dataset(
                context, (shard.x_validation, shard.y_validation), variant.batch_size, validation_steps,
                preprocess=scale_images(), epochs=1,
            ),
            "validation_steps": validation_steps,
        }
    # The backend's callbacks first: Horovod's metric averaging must run before the others read the logs.
    callbacks = [*context.fit_callbacks(), _epoch_timer(keras, epoch_seconds)]
    if context.rank == CHIEF_RANK:
        callbacks += [_epoch_logger(keras, context, variant, steps),
                      _epoch_checkpointer(keras, context, model, history, epoch_seconds, key)]
    callbacks.append(ProgressCallback(context))
    fitted = model.fit(
        distributed_dataset(
            context, (shard.x_train, shard.y_train), variant.batch_size, steps, shuffle=True, seed=seed + context.rank,
            first_epoch=first_epoch, preprocess=scale_images(), epochs=variant.epochs,
        ),
        epochs=variant.epochs,
        initial_epoch=first_epoch,
        steps_per_epoch=steps,
        callbacks=callbacks,
        verbose=0,
        **fit_options,
    )
    if context.rank != CHIEF_RANK:  # rank 0's history grew epoch by epoch in its checkpoint callback
        for name, values in fitted.history.items():
            history.setdefault(name, []).extend(float(v) for v in values)
    return {
        "history": history,
        "weights": model.get_weights() if context.rank == CHIEF_RANK else None,
        "steps_per_epoch": steps,
        "epoch_seconds": epoch_seconds,
        "train_rows": int(len(shard.x_train)),
        "validation_rows": int(len(shard.x_validation)),
        "resumed_from_epoch": first_epoch,
        "determinism": determinism_settings(keras_flavour.tensorflow()),
        "rank": context.rank, "host": context.host, "pid": os.getpid(),
        "started_at": started_at, "ended_at": time.time(),
        "steps": context.progress.steps - steps_before,
        "examples_seen": (context.progress.examples or 0) - examples_before,
        "first_step_at": context.progress.fit_first_step_at,
    }
