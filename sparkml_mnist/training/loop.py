"""What one rank does: its partition -> tensors -> model -> ``fit`` -> its report, variant after variant.

Runs inside the launcher's fresh process for each rank, so TensorFlow is imported here, after the
launcher set the backend's variables (``TF_CONFIG`` or Horovod's), ``TF_USE_LEGACY_KERAS`` and the
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

from sparkml_mnist.config import VariantConfig
from sparkml_mnist.data.split import ShardPlan
from sparkml_mnist.errors import DataError
from sparkml_mnist.launcher import keras_flavour
from sparkml_mnist.launcher.protocol import CHIEF_RANK
from sparkml_mnist.launcher.rank.context import RankContext, log_to_driver
from sparkml_mnist.training import state as training_state
from sparkml_mnist.training.inputs import ShardRows, distributed_dataset, scale_images, shard_rows, steps_per_epoch
from sparkml_mnist.training.models import build_model
from sparkml_mnist.training.scoring import TEST_RECORD_KEY, ScoringRows, score_in_rank, scored_key, scoring_rows


def _check_shard(rows: int, expected: int, part: str, context: RankContext) -> None:
    if rows != expected:
        raise DataError(
            "<shard>", f"rank {context.rank} received {rows} {part} rows, the shard plan says {expected}",
            hint="Give the launcher the frame of shard_frame(data, np) together with its plan",
        )


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
class VariantPlan:
    """One variant of the job's barrier stage: its config, its shard plan, and its layout in the partition."""

    variant: VariantConfig
    shards: ShardPlan
    layout: int = 0
    max_steps_per_epoch: int | None = None  # the run's cap on each epoch's (and its validation's) steps

    def capped(self, steps: int) -> int:
        """``steps``, at most the run's ``max_steps_per_epoch`` (None: no cap)."""
        return steps if self.max_steps_per_epoch is None else min(steps, self.max_steps_per_epoch)


def train_variants(
    context: RankContext, plans: list[VariantPlan], seed: int, deterministic: bool = False,
    allreduce: str = "float32",
) -> dict[str, dict[str, Any]]:
    """Train several variants one after the other in this one rank process: one TensorFlow import and
    one strategy for all of them (``context.partition()`` holds every variant's layout).

    After each fit every rank scores its own test rows and reports the sums with its record, which is
    reported to the driver at once, so it survives a later variant's failure. A variant whose last
    epoch's checkpoint the driver already has (an earlier attempt finished it) is not trained again, only
    scored from that checkpoint's weights (the driver may have lost the sums: it keeps the first complete
    ones); one with an earlier checkpoint resumes from it.
    """
    keras = keras_flavour.keras()
    if deterministic:
        make_deterministic(keras_flavour.tensorflow(), context.spec.threads)
    table = context.partition()
    test = scoring_rows(table)  # this rank's share of the test set, scored after each fit
    records: dict[str, dict[str, Any]] = {}
    for plan in plans:
        name = plan.variant.name
        checkpoint = context.latest_checkpoint(name)
        resumed = training_state.unpack(checkpoint.data) if checkpoint is not None else None
        if resumed is not None and resumed.epoch >= plan.variant.epochs:  # trained by an earlier attempt
            scored = {"rank": context.rank, "host": context.host, "pid": os.getpid(),
                      "resumed_from_epoch": resumed.epoch,
                      TEST_RECORD_KEY: score_in_rank(context, plan.variant, resumed.weights, test)}
            context.report(scored_key(name), scored)  # its own key: the training records stay the variant's
            continue
        shard = shard_rows(table, plan.layout)
        records[name] = train_variant(context, keras, plan, shard, seed, resumed, allreduce, test)
        context.report(name, records[name])
        del shard
        gc.collect()
    return records


def train_variant(
    context: RankContext, keras: Any, plan: VariantPlan, shard: ShardRows, seed: int,
    resumed: training_state.TrainingState | None, allreduce: str = "float32", test: ScoringRows | None = None,
) -> dict[str, Any]:
    """Build -> restore -> fit one variant on this rank's shard (-> score ``test``); returns the rank's record.

    The weights reach the driver in rank 0's last checkpoint, not in the record; the test rows' sums do.
    """
    from sparkml_mnist.launcher.rank.callbacks import ProgressCallback  # imports Keras: only inside the rank
    from sparkml_mnist.training.callbacks import EpochCallback

    variant, shards = plan.variant, plan.shards
    started_at, beat = time.time(), context.heartbeat
    steps_before, examples_before = beat.steps, beat.examples
    beat.label = variant.name
    _check_shard(len(shard.train), shards.train_per_shard, "training", context)
    _check_shard(len(shard.validation), shards.validation_per_shard, "validation", context)
    steps = plan.capped(steps_per_epoch(shards.train_per_shard, variant.batch_size, context.size))

    # Build: the same initial weights on every rank, inside the backend's scope; then restore.
    keras.utils.set_random_seed(seed)
    with context.model_scope():
        model = build_model(variant, wrap_optimizer=lambda optimizer: context.distributed_optimizer(optimizer, allreduce))
        if resumed is not None:
            training_state.restore(model, resumed)
    first_epoch = resumed.epoch if resumed is not None else 0
    if resumed is not None and context.rank == CHIEF_RANK:
        log_to_driver(f"{variant.name}: attempt {context.attempt} resumes after epoch {first_epoch}")

    # Fit: the backend's callbacks first (Horovod's metric averaging must run before the others read the logs).
    epochs = EpochCallback(context, variant.name, variant.epochs, steps, resumed)
    model.fit(
        distributed_dataset(
            context, shard.train, variant.batch_size, steps, shuffle=True, seed=seed + context.rank,
            first_epoch=first_epoch, preprocess=scale_images(), epochs=variant.epochs,
        ),
        epochs=variant.epochs,
        initial_epoch=first_epoch,
        steps_per_epoch=steps,
        callbacks=[*context.fit_callbacks(), epochs, ProgressCallback(context)],
        verbose=0,
        **_validation_input(context, plan, shard),
    )

    # Report: this rank's record, as report.json shows it.
    record = {
        "rank": context.rank, "host": context.host, "pid": os.getpid(),
        "started_at": started_at, "ended_at": time.time(), "first_step_at": beat.fit_started_at,
        "steps": beat.steps - steps_before, "examples_seen": beat.examples - examples_before,
        "steps_per_epoch": steps, "train_rows": len(shard.train),
        "validation_rows": len(shard.validation), "resumed_from_epoch": first_epoch,
        "determinism": determinism_settings(keras_flavour.tensorflow()),
        "epoch_seconds": epochs.epoch_seconds, "history": epochs.history,
    }
    if test is not None:  # after the record's end time: scoring is timed apart
        record[TEST_RECORD_KEY] = score_in_rank(context, variant, model.get_weights(), test)
    return record


def _validation_input(context: RankContext, plan: VariantPlan, shard: ShardRows) -> dict[str, Any]:
    """``fit``'s validation arguments: the rank's validation rows, one epoch's batches each time."""
    if not plan.shards.validation_per_shard:
        return {}
    batch = plan.variant.batch_size
    steps = plan.capped(steps_per_epoch(plan.shards.validation_per_shard, batch, context.size, "validation"))
    dataset = distributed_dataset(context, shard.validation, batch, steps,
                                  preprocess=scale_images(), epochs=1)
    return {"validation_data": dataset, "validation_steps": steps}
