"""The job's boundary: a run config checked once, before any Spark work, into a plan the layers below trust.

Here ``np`` becomes a ``Placement`` (zero, backend name and availability), every variant is loaded
and checked against it (the global batch splits evenly across the replicas; XLA only where ranks can
all-reduce under it), the inputs are resolved, the output folder is checked (a local path of the
driver, not a non-empty folder; with --overwrite, one that holds only this tool's report), so is the
run state beside it, if any (this user's own, private, no links), and so is the checkpoint_dir, when
given (created, written, read back and cleaned). Nothing below re-checks these.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sparkml_mnist.config import RunConfig, VariantConfig
from sparkml_mnist.data.paths import DatasetPaths, resolve_inputs
from sparkml_mnist.launcher.backends import DEFAULT_BACKEND
from sparkml_mnist.launcher.backends.base import FULL_PRECISION
from sparkml_mnist.launcher.backends.jax import NAME as JAX_BACKEND
from sparkml_mnist.launcher.checkpoints import probe
from sparkml_mnist.launcher.placement import Placement, parse_placement, rank_devices
from sparkml_mnist.errors import ConfigError
from sparkml_mnist.job.state import check_state_folder
from sparkml_mnist.report.folder import check_output_folder
from sparkml_mnist.report.results import ReportError

LOCAL_FILE_SCHEME = "file"
LOCAL_HOSTS = ("", "localhost")


@dataclass(frozen=True)
class JobPlan:
    """A run config, checked: where the ranks run, the variants that fit them, the inputs, the output."""

    run: RunConfig
    placement: Placement
    variants: tuple[VariantConfig, ...]
    inputs: DatasetPaths
    output: Path
    overwrite: bool = False
    resume: bool = False


def plan_job(run: RunConfig, overwrite: bool = False, resume: bool = False) -> JobPlan:
    """Every check that needs no Spark: a bad setting ends here with one line naming it."""
    placement = parse_placement(run.np, run.backend, run.source)
    variants = run.load_variants()
    for variant in variants:
        check_replicas(variant, placement.size)
    check_allreduce(run.allreduce, placement)
    inputs = resolve_inputs(run.data, run.train, run.test)
    output = local_output_folder(run)
    check_checkpoint_dir(run)
    check_state_folder(output)  # a state folder another user planted beside the output: refused before Spark
    try:
        check_output_folder(output, overwrite)
    except ReportError as error:  # found before any work: a usage error, like every other check here
        raise ConfigError(str(error)) from None
    return JobPlan(run=run, placement=placement, variants=variants, inputs=inputs, output=output, overwrite=overwrite,
                   resume=resume)


def local_output_folder(run: RunConfig) -> Path:
    """The report folder as a path of the driver's filesystem, where the report writer writes.

    A ``file:`` URI is taken as its path. A URI of another filesystem (``hdfs://``, ``s3a://``,
    ``dbfs:/``, ...) is refused here, before any training: the writer does not go through Hadoop.
    """
    location = urlparse(run.output)
    if len(location.scheme) <= 1:  # no scheme (a one-letter one is a Windows drive)
        return Path(run.output)
    if location.scheme == LOCAL_FILE_SCHEME and location.netloc in LOCAL_HOSTS:
        return Path(location.path)
    raise ConfigError(
        f"{run.source}: field 'output' (--output) {run.output!r}: the report is written by the driver through its "
        f"local filesystem, which cannot write {location.scheme}: URIs; give a local path or a mounted one (an NFS "
        "mount, /dbfs/... or /Volumes/... on Databricks), and copy the folder to other storage afterwards"
    )


def check_checkpoint_dir(run: RunConfig) -> None:
    """The run's checkpoint_dir, when it has one, can be created, written, read and cleaned from here."""
    if run.checkpoint_dir is None:
        return
    try:
        probe(run.checkpoint_dir)
    except ConfigError as error:
        problem = str(error).removeprefix("checkpoint_dir ")
        raise ConfigError(f"{run.source}: field 'checkpoint_dir' (--checkpoint-dir) {problem}") from None


def check_devices(plan: JobPlan, spark: Any) -> bool:
    """The checks that need the Spark session's resources (XLA against GPUs); True when ranks get GPUs."""
    on_gpus = rank_devices(plan.placement, spark).on_gpus
    for variant in plan.variants:
        check_xla(variant, plan.placement, on_gpus)
    return on_gpus


def check_allreduce(allreduce: str, placement: Placement) -> None:
    """Half-precision gradients need a backend that all-reduces them itself (tf, horovod); JAX's are XLA's."""
    if allreduce != FULL_PRECISION and placement.backend == JAX_BACKEND:
        raise ConfigError(
            f"allreduce: {allreduce!r} is not available under the jax backend (its all-reduce is compiled by "
            f"XLA); use allreduce: {FULL_PRECISION!r} (--allreduce {FULL_PRECISION}) or --backend tf"
        )


def check_replicas(variant: VariantConfig, replicas: int) -> None:
    """The global batch must split evenly, or ranks would disagree on per-replica batches."""
    if variant.batch_size % replicas:
        raise ConfigError(
            f"{variant.source}: field 'batch_size' ({variant.batch_size}) is not divisible by the "
            f"{replicas} replicas; choose a batch size that is a multiple of np"
        )


def check_xla(variant: VariantConfig, placement: Placement, on_gpus: bool) -> None:
    """XLA with several ranks needs XLA collectives: TensorFlow has them on GPUs only (tf backend).

    Under jax the setting does not apply: JAX always compiles with XLA, collectives included.
    """
    if not variant.jit_compile or placement.size <= 1 or placement.backend == JAX_BACKEND:
        return
    if placement.backend != DEFAULT_BACKEND:
        reason = f"the {placement.backend!r} backend's all-reduce cannot be compiled by XLA"
    elif not on_gpus:
        reason = "TensorFlow has no XLA collectives for CPU devices ('Collectives are not yet implemented')"
    else:
        return
    raise ConfigError(
        f"{variant.source}: field 'jit_compile' is true, but {placement.size} ranks cannot train with XLA here: "
        f"{reason}; set jit_compile: false, or train with np=1"
    )
