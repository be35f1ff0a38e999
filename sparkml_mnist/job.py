"""The training job: read and shard once, train each variant through the launcher, evaluate, report.

The SparkSession comes from the entry point, the plan from ``sparkml_mnist.plan`` (every setting
checked once, before any Spark work). Everything the job prints is progress a person can follow;
everything it writes lands in one output folder, and only once the run is complete.
"""

from __future__ import annotations

import platform
import tempfile
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
from sparkml_mnist.distributed.runner import HorovodRunner
from sparkml_mnist.evaluate import evaluate
from sparkml_mnist.plan import JobPlan, check_devices, plan_job
from sparkml_mnist.report import VariantResult, collect_versions, format_summary_table, write_report
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
    run, paths = plan.run, plan.inputs
    timings: dict[str, float] = {}

    log(f"reading {paths.train} and {paths.test}")
    clock = time.perf_counter()
    train = load_libsvm(spark, paths.train)
    test = load_libsvm(spark, paths.test)
    x_test, y_test = collect_tensors(test)
    timings["read_and_validate_s"] = time.perf_counter() - clock
    log(f"  {train.num_rows:,} training rows, {test.num_rows:,} test rows ({timings['read_and_validate_s']:.1f} s)")

    results: list[VariantResult] = []
    with tempfile.TemporaryDirectory(prefix="sparkml-mnist-models-") as models_dir:
        shards: dict[float, ShardedFrame] = {}
        for variant in plan.variants:
            split = variant.validation_split
            if split not in shards:
                shards[split] = shard_frame(train, plan.placement.size, split)
            result = train_variant(spark, plan, variant, shards[split], x_test, y_test, Path(models_dir), log)
            results.append(result)
        timings["total_s"] = time.perf_counter() - started
        folder = write_report(
            plan.output,
            results,
            config={"run": asdict(run), "variants": {v.name: asdict(v) for v in plan.variants}, "inputs": asdict(paths)},
            versions={**collect_versions(), "python": platform.python_version()},
            timings=timings,
            overwrite=plan.overwrite,
        )
    log(format_summary_table(results))
    log(f"report: {folder / 'report.md'} (plots and models beside it)")
    return folder


def train_variant(
    spark: SparkSession,
    plan: JobPlan,
    variant: VariantConfig,
    sharded: ShardedFrame,
    x_test: np.ndarray,
    y_test: np.ndarray,
    models_dir: Path,
    log: Callable[[str], None],
) -> VariantResult:
    """One variant: distributed training, then the driver's evaluation of rank 0's weights."""
    from sparkml_mnist.saved_models import rank_zero_model
    from sparkml_mnist.train import train_rank

    placement, shard_plan = plan.placement, sharded.plan
    log(
        f"{variant.name}: {variant.description}; np={placement.np} ({placement.backend}), {variant.epochs} epochs, "
        f"global batch {variant.batch_size}, {shard_plan.train_per_shard:,} training + "
        f"{shard_plan.validation_per_shard:,} validation rows per rank"
    )
    clock = time.perf_counter()
    runner = HorovodRunner(
        np=placement, spark=spark, data=sharded.frame, progress_timeout_s=plan.run.progress_timeout_s
    )
    records = runner.run_all(train_rank, variant=variant, plan=shard_plan, seed=plan.run.seed)
    train_s = time.perf_counter() - clock
    chief = records[0].value

    clock = time.perf_counter()
    model_file = models_dir / f"{variant.name}{MODEL_FILE_SUFFIX}"
    model = rank_zero_model(variant, chief, model_file)
    probabilities = model.predict(x_test, batch_size=PREDICT_BATCH, verbose=0)
    evaluation = evaluate(y_test, probabilities)
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
    )


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
        "epoch_seconds": value.get("epoch_seconds"),
        "history": value.get("history"),  # every rank's own Keras History (identical under MWMS)
        "timings": record.timings,
    }
