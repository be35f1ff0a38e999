"""The training job: read and shard once, train each variant through the launcher, evaluate, report.

The SparkSession comes from the entry point, the plan from ``sparkml_mnist.plan`` (every setting
checked once, before any Spark work). The output is claimed at start (``run_state``); each variant's
result is kept there as it finishes and rank 0 checkpoints every epoch there, so a failed or stopped
run resumes (``--resume``) where it stopped. The report folder appears only once the run is complete.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pyspark.sql import SparkSession

from sparkml_mnist.config import RunConfig, VariantConfig
from sparkml_mnist.data.libsvm import load_libsvm
from sparkml_mnist.data.shards import ShardedFrame, shard_frame
from sparkml_mnist.data.tensors import collect_tensors
from sparkml_mnist.distributed.checkpoints import CheckpointStore
from sparkml_mnist.distributed.runner import HorovodRunner
from sparkml_mnist.evaluate import evaluate
from sparkml_mnist.plan import JobPlan, check_devices, plan_job
from sparkml_mnist.redact import redact, redact_all
from sparkml_mnist.report import ReportError, VariantResult, collect_versions, format_summary_table, write_report
from sparkml_mnist.run_state import RunState, StateError
from sparkml_mnist.versions import enforce_versions

MODEL_FILE_SUFFIX = ".keras"
PREDICT_BATCH = 1024  # driver-side inference batch: large batches are faster, memory is small


def run_job(
    spark: SparkSession,
    job: RunConfig | JobPlan,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Train every variant of the run (a config, or a plan already made) and write the report folder."""
    started = time.perf_counter()
    enforce_versions(log)  # an impossible pyspark / TensorFlow / tf_keras stops here, untested ones warn
    plan = job if isinstance(job, JobPlan) else plan_job(job, overwrite)
    check_devices(plan, spark)
    with RunState.claim(plan.output, plan.run, resume=plan.resume, overwrite=plan.overwrite) as state:
        results, timings = _train_all(spark, plan, state, log)
        timings["total_s"] = time.perf_counter() - started
        try:
            folder = write_report(
                plan.output, results,
                config=redact_all({"run": asdict(plan.run), "variants": {v.name: asdict(v) for v in plan.variants},
                                   "inputs": asdict(plan.inputs)}),
                versions={**collect_versions(), "python": platform.python_version()},
                timings=timings, overwrite=plan.overwrite,
            )
        except OSError as error:
            raise ReportError(
                f"cannot write the report into {plan.output} ({error.strerror}); free space or choose another "
                f"--output, then `sparkml-mnist train --resume {plan.output}` writes it from the kept results in "
                f"{state.folder}"
            ) from None
        state.finish()
    log(format_summary_table(results))
    log(f"report: {folder / 'report.md'} (plots and models beside it)")
    return folder


def _train_all(
    spark: SparkSession, plan: JobPlan, state: RunState, log: Callable[[str], None]
) -> tuple[list[VariantResult], dict[str, float]]:
    paths, timings = plan.inputs, {}
    log(f"reading {redact(paths.train)} and {redact(paths.test)}")
    clock = time.perf_counter()
    train = load_libsvm(spark, paths.train)
    test = load_libsvm(spark, paths.test)
    x_test, y_test = collect_tensors(test)
    timings["read_and_validate_s"] = time.perf_counter() - clock
    log(f"  {train.num_rows:,} training rows, {test.num_rows:,} test rows ({timings['read_and_validate_s']:.1f} s)")

    results: list[VariantResult] = []
    shards: dict[float, ShardedFrame] = {}
    for variant in plan.variants:
        finished = state.finished(variant.name)
        if finished is not None:
            log(f"{variant.name}: finished by an earlier attempt of this run, kept "
                f"(test accuracy {finished.evaluation.accuracy:.4f})")
            results.append(finished)
            continue
        split = variant.validation_split
        if split not in shards:
            shards[split] = shard_frame(train, plan.placement.size, split)
        result = train_variant(spark, plan, variant, shards[split], x_test, y_test, state, log)
        results.append(state.save_finished(result))
    return results, timings


def train_variant(
    spark: SparkSession,
    plan: JobPlan,
    variant: VariantConfig,
    sharded: ShardedFrame,
    x_test: np.ndarray,
    y_test: np.ndarray,
    state: RunState,
    log: Callable[[str], None],
) -> VariantResult:
    """One variant: distributed training (retried, resumed from its checkpoints), then the driver's evaluation."""
    from sparkml_mnist.models import build_model
    from sparkml_mnist.train import train_rank

    placement, shard_plan, run = plan.placement, sharded.plan, plan.run
    log(
        f"{variant.name}: {variant.description}; np={placement.np} ({placement.backend}), {variant.epochs} epochs, "
        f"global batch {variant.batch_size}, {shard_plan.train_per_shard:,} training + "
        f"{shard_plan.validation_per_shard:,} validation rows per rank"
    )
    clock = time.perf_counter()
    checkpoints: CheckpointStore = state.checkpoints(variant.name)
    runner = HorovodRunner(
        np=placement, spark=spark, data=sharded.frame, progress_timeout_s=run.progress_timeout_s,
        max_retries=run.max_retries, checkpoints=checkpoints,
    )
    try:
        records = runner.run_all(train_rank, variant=variant, plan=shard_plan, seed=run.seed,
                                 deterministic=run.deterministic)
    finally:
        attempts = [_attempt_summary(a, runner.attempts) for a in runner.attempts]
    train_s = time.perf_counter() - clock
    chief = records[0].value

    clock = time.perf_counter()
    model = build_model(variant)
    model.set_weights(chief["weights"])
    probabilities = model.predict(x_test, batch_size=PREDICT_BATCH, verbose=0)
    evaluation = evaluate(y_test, probabilities)
    folder = state.variant_folder(variant.name)
    model_file = folder / f"{variant.name}{MODEL_FILE_SUFFIX}"  # kept for the report; result.json marks it done
    try:
        folder.mkdir(parents=True, exist_ok=True)
        model.save(model_file)
    except OSError as error:
        raise StateError(f"cannot save the model of {variant.name} in {folder} ({error.strerror}); free space or "
                         "fix permissions, then `sparkml-mnist train --resume` the run") from None
    evaluate_s = time.perf_counter() - clock
    log(f"{variant.name}: test accuracy {evaluation.accuracy:.4f}, loss {evaluation.loss:.4f} ({train_s:.0f} s training)")

    return VariantResult(
        name=variant.name,
        description=variant.description,
        np=placement.np,
        epochs=variant.epochs,
        history=chief["history"],
        evaluation=evaluation,
        parameter_count=int(model.count_params()),
        rank_records=[_record_summary(record) for record in records],
        seconds={"train": train_s, "evaluate": evaluate_s, "total": train_s + evaluate_s},
        lab_reference_accuracy=variant.lab.test_accuracy,
        model_files=[model_file],
        attempts=attempts,
        seed=run.seed,
        deterministic=run.deterministic,
    )


def _attempt_summary(attempt: Any, attempts: list[Any]) -> dict[str, Any]:
    """An attempt for report.json; a retry also says what it cost: failure to its first training step."""
    summary = asdict(attempt)
    previous = attempts[attempt.number - 2] if attempt.number > 1 else None
    if previous is not None and previous.ended_at is not None and attempt.first_step_at is not None:
        summary["seconds_from_failure_to_first_step"] = attempt.first_step_at - previous.ended_at
    return summary


def _record_summary(record: Any) -> dict[str, Any]:
    """A rank's record for report.json: everything but the (large) weights it returned."""
    value = record.value if isinstance(record.value, dict) else {}
    return {
        "rank": record.rank,
        "host": record.host,
        "pid": record.pid,
        "started_at": record.started_at,
        "ended_at": record.ended_at,
        "steps": record.steps,
        "examples_seen": record.examples_seen,
        "steps_per_epoch": value.get("steps_per_epoch"),
        "train_rows": value.get("train_rows"),
        "resumed_from_epoch": value.get("resumed_from_epoch"),
        "determinism": value.get("determinism"),
        "epoch_seconds": value.get("epoch_seconds"),
        "history": value.get("history"),  # every rank's own Keras History (identical under MWMS)
        "timings": record.timings,
    }
