"""The training job: read and shard once, train each variant through the launcher, evaluate, report.

The SparkSession comes from the entry point. Everything the job prints is progress a person can
follow; everything it writes lands in one output folder, and only once the run is complete.
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
from sparkml_mnist.data.paths import resolve_inputs
from sparkml_mnist.data.shards import ShardedFrame, collect_tensors, shard_frame
from sparkml_mnist.distributed import resources
from sparkml_mnist.distributed.backends import get_backend
from sparkml_mnist.evaluate import evaluate
from sparkml_mnist.report import (
    VariantResult,
    check_output_folder,
    collect_versions,
    format_summary_table,
    write_report,
)
from sparkml_mnist.versions import enforce_versions

MODEL_FILE_SUFFIX = ".keras"
PREDICT_BATCH = 1024  # driver-side inference batch: large batches are faster, memory is small


def run_job(
    spark: SparkSession,
    run: RunConfig,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Train every variant of ``run`` and write the report folder; returns its path."""
    started = time.perf_counter()
    enforce_versions(log)  # an impossible pyspark / TensorFlow / tf_keras stops here, untested ones warn
    get_backend(run.backend).check_available("driver")  # e.g. Horovod asked for but not installed
    variants = run.load_variants()
    on_gpus = resources.ranks_have_gpus(spark, run.np)
    for variant in variants:
        variant.check_replicas(abs(run.np))
        variant.check_xla(abs(run.np), on_gpus, run.backend)
    paths = resolve_inputs(run.data, run.train, run.test)
    check_output_folder(Path(run.output), overwrite)  # before any training, not after it
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
        for variant in variants:
            split = variant.validation_split
            if split not in shards:
                shards[split] = shard_frame(train, abs(run.np), split)
            result = train_variant(spark, run, variant, shards[split], x_test, y_test, Path(models_dir), log)
            results.append(result)
        timings["total_s"] = time.perf_counter() - started
        folder = write_report(
            run.output,
            results,
            config={"run": asdict(run), "variants": {v.name: asdict(v) for v in variants}, "inputs": asdict(paths)},
            versions={**collect_versions(), "python": platform.python_version()},
            timings=timings,
            overwrite=overwrite,
        )
    log(format_summary_table(results))
    log(f"report: {folder / 'report.md'} (plots and models beside it)")
    return folder


def train_variant(
    spark: SparkSession,
    run: RunConfig,
    variant: VariantConfig,
    sharded: ShardedFrame,
    x_test: np.ndarray,
    y_test: np.ndarray,
    models_dir: Path,
    log: Callable[[str], None],
) -> VariantResult:
    """One variant: distributed training, then the driver's evaluation of rank 0's weights."""
    from sparkml_mnist.distributed.runner import HorovodRunner
    from sparkml_mnist.models import build_model
    from sparkml_mnist.train import train_rank

    plan = sharded.plan
    log(
        f"{variant.name}: {variant.description}; np={run.np} ({run.backend}), {variant.epochs} epochs, global batch "
        f"{variant.batch_size}, {plan.train_per_shard:,} training + {plan.validation_per_shard:,} validation rows per rank"
    )
    clock = time.perf_counter()
    runner = HorovodRunner(
        np=run.np, spark=spark, data=sharded, backend=run.backend, progress_timeout_s=run.progress_timeout_s
    )
    records = runner.run_all(train_rank, variant=variant, seed=run.seed)
    train_s = time.perf_counter() - clock
    chief = records[0].value

    clock = time.perf_counter()
    model = build_model(variant)
    model.set_weights(chief["weights"])
    probabilities = model.predict(x_test, batch_size=PREDICT_BATCH, verbose=0)
    evaluation = evaluate(y_test, probabilities)
    model_file = models_dir / f"{variant.name}{MODEL_FILE_SUFFIX}"
    model.save(model_file)
    evaluate_s = time.perf_counter() - clock
    log(f"{variant.name}: test accuracy {evaluation.accuracy:.4f}, loss {evaluation.loss:.4f} ({train_s:.0f} s training)")

    return VariantResult(
        name=variant.name,
        description=variant.description,
        np=run.np,
        epochs=variant.epochs,
        history=chief["history"],
        evaluation=evaluation,
        parameter_count=int(model.count_params()),
        rank_records=[_record_summary(record) for record in records],
        seconds={"train": train_s, "evaluate": evaluate_s, "total": train_s + evaluate_s},
        lab_reference_accuracy=variant.lab_test_accuracy,
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

