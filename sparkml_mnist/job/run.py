"""The training job: read and shard once, train every variant in one barrier stage, evaluate, report.

The SparkSession comes from the entry point, the plan from ``sparkml_mnist.job.plan`` (every setting
checked once, before any Spark work). The output is claimed at start (``run_state``); each variant's
result is kept there as it finishes and rank 0 checkpoints every epoch there, so a failed or stopped
run resumes (``--resume``) where it stopped. The report folder appears only once the run is complete.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pyspark import StorageLevel
from pyspark.sql import SparkSession

from sparkml_mnist.launcher.driver import events as log_module
from sparkml_mnist.config import RunConfig, VariantConfig
from sparkml_mnist.data.libsvm import LibsvmData, load_libsvm
from sparkml_mnist.data.shards import shard_layouts
from sparkml_mnist.data.tensors import collect_tensors
from sparkml_mnist.launcher.driver.store import CheckpointStore
from sparkml_mnist.launcher.backends.tf import NAME as TF_BACKEND
from sparkml_mnist.launcher.runner import NO_COLLECTIVE_TIMEOUT, HorovodRunner
from sparkml_mnist.errors import SparkMnistError
from sparkml_mnist.job.evaluate import VariantFinisher, rank_rows
from sparkml_mnist.job.plan import JobPlan, check_devices, plan_job
from sparkml_mnist.redact import redact, redact_all
from sparkml_mnist.report import ReportError, VariantResult, collect_versions, format_summary_table, write_report
from sparkml_mnist.job.state import RunState
from sparkml_mnist.job.tracking import TRACKING_URI_ENV, Tracking, log_variants, run_params, variant_params
from sparkml_mnist.cli.versions import enforce_versions

logger = logging.getLogger(__name__)
Say = Callable[[str], None]

SIGNATURE_EXAMPLES = 5  # test images that show MLflow the model's input and output


def run_job(
    spark: SparkSession,
    job: RunConfig | JobPlan,
    overwrite: bool = False,
    log: Say | None = None,
    tracking: Tracking | None = None,
) -> Path:
    """Train every variant of the run (a config, or a plan already made) and write the report folder.

    Progress goes to the ``sparkml_mnist.job.run`` logger (``log`` replaces it). ``tracking`` logs the run
    to MLflow; without it, ``MLFLOW_TRACKING_URI`` in the environment turns MLflow on.
    """
    say: Say = log or (lambda message: log_module.info(logger, message))
    started = time.perf_counter()
    enforce_versions(lambda message: logger.warning(message.removeprefix("warning: ")))
    plan = job if isinstance(job, JobPlan) else plan_job(job, overwrite)
    check_devices(plan, spark)
    tracking = tracking if tracking is not None else _tracking_from_environment()
    versions = {**collect_versions(), "python": platform.python_version()}
    with RunState.claim(plan.output, plan.run, resume=plan.resume, overwrite=plan.overwrite) as state:
        if tracking is not None:
            tracking.start(plan.run.name, run_params(plan.run, plan.placement, versions))
        try:
            results, timings, x_sample = _train_all(spark, plan, state, say)
            timings["total_s"] = time.perf_counter() - started
            folder = _write(plan, results, timings, versions, state, say)
        except BaseException:
            if tracking is not None:
                tracking.finish(None, failed=True)
            raise
        if tracking is not None:
            params = {v.name: variant_params(v, plan.placement, plan.run.seed, plan.run.deterministic)
                      for v in plan.variants}
            log_variants(tracking, results, params, folder, x_sample)
            tracking.finish(folder)
        state.finish()
    say(format_summary_table(results))
    say(f"report: {folder / 'report.md'} (plots and models beside it)")
    return folder


def _write(plan: JobPlan, results: list[VariantResult], timings: dict[str, float], versions: dict[str, str],
           state: RunState, say: Say) -> Path:
    say(f"writing the report to {plan.output}")
    clock = time.perf_counter()
    try:
        folder = write_report(
            plan.output, results,
            config=redact_all({"run": asdict(plan.run), "variants": {v.name: asdict(v) for v in plan.variants},
                               "inputs": asdict(plan.inputs)}),
            versions=versions, timings=timings, overwrite=plan.overwrite,
        )
    except OSError as error:
        raise ReportError(
            f"cannot write the report into {plan.output} ({error.strerror}); free space or choose another "
            f"--output, then `sparkml-mnist train --resume {plan.output}` writes it from the kept results in "
            f"{state.folder}"
        ) from None
    say(f"  report written ({time.perf_counter() - clock:.1f} s)")
    return folder


def _tracking_from_environment() -> Tracking | None:
    if not os.environ.get(TRACKING_URI_ENV):
        return None
    try:
        return Tracking()
    except SparkMnistError as error:
        logger.warning("%s is set but %s; the run goes on without tracking", TRACKING_URI_ENV, error)
        return None


def _train_all(
    spark: SparkSession, plan: JobPlan, state: RunState, log: Say
) -> tuple[list[VariantResult], dict[str, float], np.ndarray]:
    paths, timings = plan.inputs, {}
    log(f"reading and checking {redact(paths.train)} and {redact(paths.test)}")
    clock = time.perf_counter()
    train = load_libsvm(spark, paths.train)
    try:
        test = load_libsvm(spark, paths.test)
        try:
            x_test, y_test = collect_tensors(test)
        finally:
            test.release()
        timings["read_and_validate_s"] = time.perf_counter() - clock
        log(f"  {train.num_rows:,} training rows, {test.num_rows:,} test rows "
            f"({timings['read_and_validate_s']:.1f} s)")
        return _train_remaining(spark, plan, state, train, x_test, y_test, log), timings, x_test[:SIGNATURE_EXAMPLES]
    finally:
        train.release()  # cached by the validating read; on a notebook's session it would stay


def _train_remaining(
    spark: SparkSession, plan: JobPlan, state: RunState, train: LibsvmData, x_test: np.ndarray, y_test: np.ndarray,
    log: Say,
) -> list[VariantResult]:
    """Each variant's result: kept from an earlier attempt of the run, or trained now."""
    run, placement = plan.run, plan.placement
    finisher = VariantFinisher(list(plan.variants), placement.np, run.seed, run.deterministic, state, x_test, y_test,
                               log)
    checkpoints = state.checkpoints()
    results: dict[str, VariantResult] = {}
    remaining = []
    for variant in plan.variants:
        finished = state.finished(variant.name)
        last = checkpoints.latest(variant.name)
        if finished is not None:
            log(f"{variant.name}: finished by an earlier attempt of this run, kept "
                f"(test accuracy {finished.evaluation.accuracy:.4f})")
            results[variant.name] = finished
        elif last is not None and last.epoch >= variant.epochs:  # trained, but the driver stopped before keeping it
            results[variant.name] = finisher.finish(variant, last)
        else:
            remaining.append(variant)
    if remaining:
        results.update(_train_in_one_stage(spark, plan, remaining, train, finisher, state, checkpoints, log))
    return [results[variant.name] for variant in plan.variants]


def _train_in_one_stage(
    spark: SparkSession, plan: JobPlan, variants: list[VariantConfig], train: LibsvmData, finisher: VariantFinisher,
    state: RunState, checkpoints: CheckpointStore, log: Say,
) -> dict[str, VariantResult]:
    """Every remaining variant in one barrier stage: one TensorFlow import and one strategy for all.

    Each variant is evaluated on the driver as soon as its last epoch's checkpoint arrives, while the
    ranks go on with the next; a retried attempt skips the variants that finished.
    """
    from sparkml_mnist.training.loop import VariantJob, train_variants

    run, placement = plan.run, plan.placement
    splits = sorted({variant.validation_split for variant in variants})
    layouts = shard_layouts(train, placement.size, splits)
    frame = layouts.frame.persist(StorageLevel.MEMORY_AND_DISK)  # a retry skips the shuffle
    jobs = [VariantJob(v, layouts.plans[splits.index(v.validation_split)], splits.index(v.validation_split))
            for v in variants]
    for job in jobs:
        log(f"{job.variant.name}: {job.variant.description}; np={placement.np} ({placement.backend}), "
            f"{job.variant.epochs} epochs, global batch {job.variant.batch_size}, {job.plan.train_per_shard:,} "
            f"training + {job.plan.validation_per_shard:,} validation rows per rank")
    checkpoints.subscribe(finisher.on_checkpoint)
    # Training reports progress every step, so the watchdog ends a hung collective within
    # progress_timeout_s. TensorFlow's own per-collective timeout would keep a sleeping thread per
    # collective for that long (1,610 threads in one rank at 300 s, against ~120 without); Horovod's
    # Gloo timeout costs nothing and also bounds its rendezvous, so it stays.
    collective_timeout_s = NO_COLLECTIVE_TIMEOUT if placement.backend == TF_BACKEND else None
    runner = HorovodRunner(np=placement, spark=spark, data=frame, progress_timeout_s=run.progress_timeout_s,
                           collective_timeout_s=collective_timeout_s, max_retries=run.max_retries,
                           checkpoints=checkpoints)
    finisher.start()
    try:
        runner.run_all(train_variants, jobs=jobs, seed=run.seed, deterministic=run.deterministic,
                       allreduce=run.allreduce)
    finally:
        try:
            finisher.close()  # the last variant's evaluation, and any that failed
        finally:
            frame.unpersist()
    ranks = runner.attempts[-1].progress or {}
    if ranks.get("straggler"):
        logger.warning("%s", ranks["straggler"])
    finished = {}
    for variant in variants:
        result = finisher.results[variant.name]
        result.rank_records = rank_rows(runner.results.get(variant.name, {}))
        result.attempts = [_attempt_summary(a, runner.attempts, variant.name) for a in runner.attempts]
        result.ranks = ranks
        finished[variant.name] = state.save_finished(result)  # again, now with what the ranks reported
    return finished


def _attempt_summary(attempt: Any, attempts: list[Any], name: str) -> dict[str, Any]:
    """An attempt for a variant's report: where it resumed that variant, and what a retry cost (the
    failure to the next attempt's first training step)."""
    summary = asdict(attempt)
    summary["resumed_from_epoch"] = summary.pop("resumed_from", {}).get(name)
    previous = attempts[attempt.number - 2] if attempt.number > 1 else None
    if previous is not None and previous.ended_at is not None and attempt.first_step_at is not None:
        summary["seconds_from_failure_to_first_step"] = attempt.first_step_at - previous.ended_at
    return summary
