"""The training job: read and shard once, train every variant in one barrier stage, evaluate, report.

The SparkSession comes from the entry point, the plan from ``sparkml_mnist.job.plan`` (every setting
checked once, before any Spark work). The output is claimed at start (``job.state``); each variant's
result is kept there as it finishes and rank 0 checkpoints every epoch there (or, with the run's
``checkpoint_dir``, straight into storage), so a failed or stopped run resumes (``--resume``) where it
stopped. The report folder appears only once the run is complete.
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

from sparkml_mnist.config import RunConfig, VariantConfig
from sparkml_mnist.data.columns import LABEL_COLUMN, PIXELS_COLUMN, ROW_COLUMN
from sparkml_mnist.data.libsvm import LibsvmData, load_libsvm
from sparkml_mnist.data.shards import shard_layouts
from sparkml_mnist.data.tensors import images_and_labels
from sparkml_mnist.errors import LaunchError, SparkMnistError
from sparkml_mnist.job.evaluate import Evaluator
from sparkml_mnist.job.plan import JobPlan, check_devices, plan_job
from sparkml_mnist.launcher.backends.tf import NAME as TF_BACKEND
from sparkml_mnist.launcher.driver import events as log_module
from sparkml_mnist.launcher.driver.attempt import Attempt
from sparkml_mnist.launcher.driver.reports import ReportListener
from sparkml_mnist.launcher.policy import NO_COLLECTIVE_TIMEOUT, FailurePolicy
from sparkml_mnist.launcher.protocol import Checkpoint
from sparkml_mnist.launcher.runner import HorovodRunner
from sparkml_mnist.redact import redact, redact_all
from sparkml_mnist.report import ReportError, VariantResult, collect_versions, format_summary_table, write_report
from sparkml_mnist.job.state import RunState
from sparkml_mnist.job.tracking import (
    TRACKING_URI_ENV, Tracking, ended_status, log_variants, run_params, variant_params,
)
from sparkml_mnist.job.versions import enforce_versions
from sparkml_mnist.training.scoring import scored_key

logger = logging.getLogger(__name__)
Say = Callable[[str], None]

SIGNATURE_EXAMPLES = 5  # test images that show MLflow the model's input and output (a limit(), never the set)


def run_job(
    spark: SparkSession,
    run: RunConfig | JobPlan,
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
    plan = run if isinstance(run, JobPlan) else plan_job(run, overwrite)
    check_devices(plan, spark)
    tracking = tracking if tracking is not None else _tracking_from_environment(plan.run.register_model)
    versions = {**collect_versions(), "python": platform.python_version()}
    params = {v.name: variant_params(v, plan.placement, plan.run.seed, plan.run.deterministic) for v in plan.variants}
    with RunState.claim(plan.output, plan.run, resume=plan.resume, overwrite=plan.overwrite) as state:
        if tracking is not None:  # live from here: each variant's child run starts with its first epoch
            tracking.start(plan.run.name, run_params(plan.run, plan.placement, versions), variants=params,
                           output=str(plan.output.absolute()), resume=plan.resume, register_as=plan.run.register_model)
        try:
            results, timings, x_sample = JobRun(spark, plan, state, say, tracking).train_all()
            timings["total_s"] = time.perf_counter() - started
            folder = _write(plan, results, timings, versions, state, say)
        except BaseException as error:
            if tracking is not None:  # its runs end FAILED, or KILLED (Ctrl-C, SIGTERM), with their epochs so far
                tracking.end(None, status=ended_status(error))
            if not plan.resume and not state.holds_work():
                state.complete()  # it failed before anything was kept (e.g. reading the data): nothing to resume
            raise
        if tracking is not None:
            log_variants(tracking, results, params, folder, x_sample)
            tracking.end(folder)
        state.complete()
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


def _tracking_from_environment(register_model: str | None = None) -> Tracking | None:
    """MLflow when ``MLFLOW_TRACKING_URI`` is set, or the run registers its models (MLflow's default URI then)."""
    if not os.environ.get(TRACKING_URI_ENV) and not register_model:
        return None
    try:
        return Tracking()
    except SparkMnistError as error:
        why = f"{TRACKING_URI_ENV} is set" if os.environ.get(TRACKING_URI_ENV) else "register_model is given"
        logger.warning("%s but %s; the run goes on without tracking", why, error)
        return None


class JobRun:
    """One run of the job: read the data once, keep what earlier attempts finished, train the rest in
    one barrier stage, where the ranks also score the test set; keep each variant as its sums come in."""

    def __init__(self, spark: SparkSession, plan: JobPlan, state: RunState, say: Say,
                 tracking: Tracking | None = None) -> None:
        self.spark, self.plan, self.state, self.say = spark, plan, state, say
        self.tracking = tracking  # hears every report too: rank 0's epochs go to MLflow as they come

    def train_all(self) -> tuple[list[VariantResult], dict[str, float], np.ndarray | None]:
        """Every variant's result (in the plan's order), the data stage's timings, a few test images (None
        without MLflow tracking)."""
        paths, timings = self.plan.inputs, {}
        self.say(f"reading and checking {redact(paths.train)} and {redact(paths.test)}")
        clock = time.perf_counter()
        train = load_libsvm(self.spark, paths.train)
        test: LibsvmData | None = None
        try:
            test = load_libsvm(self.spark, paths.test)
            # a few raw test images for MLflow's signature: a job of its own, made only when MLflow logs
            x_sample = signature_examples(test) if self.tracking is not None else None
            timings["read_and_validate_s"] = time.perf_counter() - clock
            self.say(f"  {train.num_rows:,} training rows, {test.num_rows:,} test rows "
                     f"({timings['read_and_validate_s']:.1f} s)")
            run, placement = self.plan.run, self.plan.placement
            evaluator = Evaluator(list(self.plan.variants), placement.np, placement.size, test.num_rows, run.seed,
                                  run.deterministic, self.state, self.say)
            results = self._kept(evaluator)
            remaining = [variant for variant in self.plan.variants if variant.name not in results]
            if remaining:
                results.update(self._train(remaining, train, test, evaluator))
            return [results[v.name] for v in self.plan.variants], timings, x_sample
        finally:
            train.release()  # cached by the validating read; on a notebook's session it would stay
            if test is not None:
                test.release()

    def _kept(self, evaluator: Evaluator) -> dict[str, VariantResult]:
        """The variants an earlier attempt of the run finished. One it trained whose evaluation the driver never
        kept (it stopped in between) is not kept: the ranks score it from its last checkpoint, without training."""
        checkpoints = self.state.checkpoints()
        kept: dict[str, VariantResult] = {}
        for variant in self.plan.variants:
            finished = self.state.finished(variant.name)
            last = checkpoints.latest(variant.name)
            if finished is not None:
                self.say(f"{variant.name}: finished by an earlier attempt of this run, kept "
                         f"(test accuracy {finished.evaluation.accuracy:.4f})")
                kept[variant.name] = finished
            elif last is not None and last.epoch >= variant.epochs:  # trained; the driver stopped before keeping it
                self.say(f"{variant.name}: trained by an earlier attempt of this run; its ranks score it now")
                evaluator.final_checkpoint(variant.name, last)
        return kept

    def _train(self, variants: list[VariantConfig], train: LibsvmData, test: LibsvmData,
               evaluator: Evaluator) -> dict[str, VariantResult]:
        """Every remaining variant in one barrier stage: one TensorFlow import and one strategy for all.

        The test rows travel in the same hand-off frame; after each fit every rank scores its share and
        reports sums, and the driver keeps the variant as soon as all of them and its last checkpoint are
        in, while the ranks go on with the next; a retried attempt only scores the variants that finished.
        """
        from sparkml_mnist.training.loop import VariantPlan, train_variants

        run, placement = self.plan.run, self.plan.placement
        splits = sorted({variant.validation_split for variant in variants})
        layouts = shard_layouts(train, placement.size, splits, test=test)
        # On disk, not in the JVM's heap: the ranks read it once per attempt, and a retry skips the shuffle.
        # Materialised now, so the validated reads' caches are freed before training, not after it.
        frame = layouts.frame.persist(StorageLevel.DISK_ONLY)
        frame.count()
        train.release()
        test.release()
        plans = [VariantPlan(v, layouts.plans[splits.index(v.validation_split)], splits.index(v.validation_split),
                             run.max_steps_per_epoch)
                 for v in variants]
        for plan in plans:
            variant = plan.variant
            self.say(f"{variant.name}: {variant.description}; np={placement.np} ({placement.backend}), "
                     f"{variant.epochs} epochs, global batch {variant.batch_size}, {plan.shards.train_per_shard:,} "
                     f"training + {plan.shards.validation_per_shard:,} validation rows per rank")
        # Training reports progress every step, so the watchdog ends a hung collective within
        # progress_timeout_s. TensorFlow's own per-collective timeout would keep a sleeping thread per
        # collective for that long (1,610 threads in one rank at 300 s, against ~120 without); Horovod's
        # Gloo timeout costs nothing and also bounds its rendezvous, so it stays.
        policy = FailurePolicy(
            progress_timeout_s=run.progress_timeout_s, max_retries=run.max_retries,
            collective_timeout_s=NO_COLLECTIVE_TIMEOUT if placement.backend == TF_BACKEND else None,
        )
        runner = HorovodRunner(np=placement, data=frame, policy=policy, checkpoint_dir=self.state.checkpoints(),
                               on_report=self._listener(evaluator), spark=self.spark)
        evaluator.start()
        try:
            outcome = runner.run_all(train_variants, plans=plans, seed=run.seed, deterministic=run.deterministic,
                                     allreduce=run.allreduce)
        finally:
            try:
                evaluator.close()  # the last variant's evaluation, and any that failed
            finally:
                frame.unpersist()
        if outcome.ranks.get("straggler"):
            logger.warning("%s", outcome.ranks["straggler"])
        finished = {}
        for variant in variants:
            result = evaluator.results.get(variant.name)
            if result is None:
                raise LaunchError(f"the ranks ended without every rank's test sums of {variant.name}; "
                                  f"`sparkml-mnist train --resume {self.plan.output}` scores it again")
            # Training records; a variant only scored here (trained by an earlier run) has its scoring records.
            reports = outcome.reports.get(variant.name) or outcome.reports.get(scored_key(variant.name), {})
            result.rank_records = [reports[rank] for rank in sorted(reports)]
            result.attempts = [_attempt_row(attempt, variant.name) for attempt in outcome.attempts]
            result.ranks = outcome.ranks
            finished[variant.name] = self.state.save_finished(result)  # again, now with what the ranks reported
        return finished

    def _listener(self, evaluator: Evaluator) -> ReportListener:
        """The runner's one report listener: the evaluator's, then tracking's (which only queues, never raises)."""
        tracking = self.tracking
        if tracking is None:
            return evaluator.on_report

        def on_report(key: str, rank: int, metrics: dict[str, Any], checkpoint: Checkpoint | None) -> None:
            try:
                evaluator.on_report(key, rank, metrics, checkpoint)
            finally:
                tracking.on_report(key, rank, metrics, checkpoint)

        return on_report


def signature_examples(test: LibsvmData) -> np.ndarray:
    """The test file's first images, raw ``uint8`` as the served model takes them: a ``limit()``, the set
    stays on the executors."""
    first = test.frame.select(ROW_COLUMN, LABEL_COLUMN, PIXELS_COLUMN).orderBy(ROW_COLUMN).limit(SIGNATURE_EXAMPLES)
    return images_and_labels(first.toArrow(), scaled=False)[0]


def _attempt_row(attempt: Attempt, key: str) -> dict[str, Any]:
    """An attempt as one variant's report shows it: where it resumed that variant."""
    row = asdict(attempt)
    row["resumed_from_epoch"] = row.pop("resumed_from").get(key)
    row.pop("ranks")
    return row
