"""Pre-flight checks on the driver, before any task starts, and what Spark gives the ranks (slots, cores, GPUs).

Left to Spark, a barrier stage with more tasks than slots fails only after ~10 minutes of
silent retries (40 checks, 15 s apart), and dynamic allocation fails it outright; both are
checked here first with a message that says what to change.
"""

from __future__ import annotations

import ipaddress
import os
import re
import time
from typing import Any

from pyspark.sql import SparkSession

from sparkml_mnist.launcher.backends import horovod, jax, tf
from sparkml_mnist.launcher.failures import PreflightError
from sparkml_mnist.launcher.policy import FailurePolicy

TASK_CPUS_CONF = "spark.task.cpus"
MASTER_CONF = "spark.master"
DYNAMIC_ALLOCATION_CONF = "spark.dynamicAllocation.enabled"
DEFAULT_TASK_CPUS = 1

EXECUTOR_POLL_S = 1.0
TASK_GPU_CONF = "spark.task.resource.gpu.amount"
_LOCAL_MASTER = re.compile(r"^local(?:\[(\*|\d+)(?:,\s*\d+)?\])?$")


def spark_conf(spark: SparkSession, key: str, default: str | None = None) -> str | None:
    try:
        return spark.conf.get(key, default)
    except Exception:  # Spark Connect refuses some static confs
        return default


def local_master_slots(master: str | None) -> int | None:
    """Slots of ``local``, ``local[N]``, ``local[*]`` and ``local[N,F]``; None for other masters."""
    match = _LOCAL_MASTER.match(master or "")
    if not match:
        return None
    threads = match.group(1)
    if threads is None:
        return 1
    return os.cpu_count() or 1 if threads == "*" else int(threads)


def is_local_master(spark: SparkSession) -> bool:
    """True on ``local``/``local[N]``/``local[*]``: every task runs on the driver's machine."""
    return local_master_slots(spark_conf(spark, MASTER_CONF)) is not None


def means_every_interface(address: str) -> bool:
    """True for a bind address that listens on every interface: ``0.0.0.0``, ``::``, ``[::]``, empty."""
    text = address.strip().strip("[]")
    if not text:
        return True
    try:
        return ipaddress.ip_address(text).is_unspecified
    except ValueError:  # a host name: one address
        return False


def task_cpus(spark: SparkSession) -> int:
    return int(spark_conf(spark, TASK_CPUS_CONF, str(DEFAULT_TASK_CPUS)) or DEFAULT_TASK_CPUS)


def barrier_slots(spark: SparkSession) -> int | None:
    """How many barrier tasks can run at once, as Spark's own barrier check counts them (None: unknown)."""
    try:
        jsc = spark.sparkContext._jsc.sc()  # classic Spark only
        return int(jsc.maxNumConcurrentTasks(jsc.resourceProfileManager().defaultResourceProfile()))
    except Exception:
        slots = local_master_slots(spark_conf(spark, MASTER_CONF))
        return None if slots is None else slots // task_cpus(spark)


def check_barrier_run(spark: SparkSession, num_tasks: int, executor_wait_s: float = FailurePolicy.executor_wait_s) -> None:
    """Fail fast when ``num_tasks`` barrier tasks cannot all run at once on this cluster."""
    master = spark_conf(spark, MASTER_CONF) or ""
    is_local = is_local_master(spark)
    if not is_local and (spark_conf(spark, DYNAMIC_ALLOCATION_CONF, "false") or "").lower() == "true":
        raise PreflightError(
            f"{DYNAMIC_ALLOCATION_CONF} is true, and Spark's barrier mode (which runs all ranks at once) does "
            f"not support dynamic allocation: set {DYNAMIC_ALLOCATION_CONF}=false and a fixed number of executors"
        )
    slots = barrier_slots(spark)
    deadline = time.monotonic() + (0 if is_local else executor_wait_s)
    while slots is not None and slots < num_tasks and time.monotonic() < deadline:
        time.sleep(EXECUTOR_POLL_S)  # executors still registering
        slots = barrier_slots(spark)
    if slots is not None and slots < num_tasks:
        raise PreflightError(
            f"np={num_tasks} needs {num_tasks} barrier tasks running at once, but this cluster ({master}, "
            f"{TASK_CPUS_CONF}={task_cpus(spark)}) has only {slots} task slots (executors x cores / "
            f"{TASK_CPUS_CONF}). Use np<={slots}, add executors or cores, or lower {TASK_CPUS_CONF}; "
            "or np<0 to run on the driver alone"
        )


# Spark settings that say the cluster's operators want its traffic encrypted or authenticated.
SECURITY_CONFS = ("spark.authenticate", "spark.network.crypto.enabled", "spark.ssl.enabled", "spark.ssl.rpc.enabled")
ACCEPT_RISK_CONF = "spark.sparkml_mnist.allowUnencryptedCollectives"
_UNREADABLE = object()  # a conf this session refuses to read (Spark Connect hides the cluster's core settings)

# What each backend's ranks listen on, unauthenticated and unencrypted (README "Security" has the table).
BACKEND_LISTENERS = {
    tf.NAME: "TensorFlow's gRPC server on each rank (every interface; it runs any graph it is sent)",
    horovod.NAME: "Gloo's ports on each rank (the interface of HOROVOD_GLOO_IFACE)",
    jax.NAME: "JAX's coordinator on rank 0 (its address) and XLA's collectives (Gloo on CPU, NCCL on GPU)",
}
ANY_BACKEND_LISTENERS = "the collectives' servers on the ranks (TensorFlow's gRPC, Gloo, JAX's coordinator)"


def _security_conf(spark: SparkSession, key: str) -> object:
    """``key``'s value, lower-cased ("false" when unset), or ``_UNREADABLE``."""
    try:
        value = spark.conf.get(key, "false")
    except Exception:  # Spark Connect refuses some confs
        return _UNREADABLE
    return (value or "false").strip().lower()


def check_secured_cluster(spark: SparkSession, backend: str | None = None) -> str | None:
    """Refuse to send collectives in clear on a cluster whose operators turned on Spark's security;
    say once, on any other cluster, what the ranks listen on without authentication.

    The ranks' collective traffic (TensorFlow's gRPC, Gloo, JAX) is neither encrypted nor authenticated,
    whatever Spark's own settings are, and TensorFlow's servers listen on every interface of the ranks'
    hosts. Returns the one warning line to log (None: nothing to say, e.g. on a local master).
    """
    listeners = BACKEND_LISTENERS.get(backend or "", ANY_BACKEND_LISTENERS)
    values = {key: _security_conf(spark, key) for key in SECURITY_CONFS}
    enabled = [key for key, value in values.items() if value == "true"]
    if enabled:
        problem = (
            f"this cluster has {', '.join(f'{key}=true' for key in enabled)}, but the ranks' collective traffic, "
            f"through {listeners}, is neither encrypted nor authenticated: weights and gradients would cross the "
            "network in clear"
        )
        if (spark_conf(spark, ACCEPT_RISK_CONF, "false") or "").strip().lower() == "true":
            return f"{problem} ({ACCEPT_RISK_CONF}=true accepts that)"
        raise PreflightError(
            f"{problem}. Set {ACCEPT_RISK_CONF}=true to accept the risk (e.g. on a private network that the "
            "cluster's policy isolates), or train where that is acceptable"
        )
    if is_local_master(spark):
        return None
    unreadable = [key for key, value in values.items() if value is _UNREADABLE]
    state = (
        f"Spark's security settings cannot be read from this session ({', '.join(unreadable)}; Spark Connect "
        "hides them)" if unreadable else f"Spark's security is off ({', '.join(SECURITY_CONFS)} not true)"
    )
    return (
        f"{state}, and the ranks open servers that accept connections without authentication: {listeners}. "
        "Anyone who reaches the executors' hosts can connect to them while the run lasts; allow only the "
        "cluster's own nodes to reach them (README, 'Security')"
    )


def driver_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def driver_gpus(spark: SparkSession | None) -> list[str]:
    """GPU addresses Spark assigned to the driver (``spark.driver.resource.gpu.*``), if any."""
    if spark is None:
        return []
    try:
        resources: dict[str, Any] = spark.sparkContext.resources
    except Exception:
        return []
    gpu = resources.get("gpu")
    return list(gpu.addresses) if gpu is not None else []


def task_gpus(spark: SparkSession) -> float:
    """GPUs Spark gives each task (``spark.task.resource.gpu.amount``); 0 when none or unreadable."""
    try:
        return float(spark_conf(spark, TASK_GPU_CONF) or 0)
    except ValueError:
        return 0.0
