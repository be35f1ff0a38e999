"""``np`` parsed once, at the boundary where it enters, into one object: how many ranks, where, which backend.

sparkdl's convention: ``np > 0`` runs ``np`` Spark barrier tasks on executors, ``np < 0`` runs
``-np`` processes on the driver alone. Everything below the boundary takes a ``Placement`` and
trusts it; the devices the ranks get follow from it by one rule (``rank_devices``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sparkml_mnist.launcher.driver import cluster as resources
from sparkml_mnist.launcher.backends import DEFAULT_BACKEND, check_backend_name, driver_backend
from sparkml_mnist.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """How many ranks, where they run, and how they talk (the backend, checked available on the driver)."""

    size: int
    on_driver: bool
    backend: str = DEFAULT_BACKEND

    @property
    def np(self) -> int:
        """The signed number in sparkdl's convention (reports show it as the user wrote it)."""
        return -self.size if self.on_driver else self.size

    @property
    def where(self) -> str:
        return "driver processes" if self.on_driver else "barrier tasks"


def parse_placement(np: Any, backend: str = DEFAULT_BACKEND, source: str | None = None) -> Placement:
    """The only place ``np`` is checked; ``source`` (a config file) is named in the error when given."""
    if isinstance(np, Placement):
        return np
    if isinstance(np, bool) or not isinstance(np, int) or np == 0:
        what = f"{source}: field 'np' is {np!r}" if source else f"np must be a non-zero integer, got {np!r}"
        raise ConfigError(
            f"{what}; use np > 0 for Spark barrier tasks on executors, or np < 0 for processes on the driver only"
        )
    check_backend_name(backend, source)
    driver_backend(backend).check_available("driver")  # a missing backend fails now, not in every task
    return Placement(size=abs(np), on_driver=np < 0, backend=backend)


@dataclass(frozen=True)
class RankDevices:
    """What the ranks of one run get: threads each, and GPUs (per rank on the driver; per task on executors)."""

    threads: int
    on_gpus: bool
    driver_gpus: tuple[tuple[str, ...], ...] = ()  # rank -> its GPU addresses (driver processes only)
    # Each CPU rank on cores of its own: only where the run's ranks are all that train on the machine (a
    # local master, or processes on the driver). On a cluster's executors other tasks share the cores.
    pin_cores: bool = False


def rank_devices(placement: Placement, spark: Any) -> RankDevices:
    """The one GPU rule: a rank trains on a GPU only if it gets one of its own, else on CPU.

    Barrier tasks: the GPU addresses Spark assigns to each task (``spark.task.resource.gpu.amount``).
    Driver processes: one of the driver's GPUs each when there are enough for every rank, else none.
    """
    if not placement.on_driver:
        return RankDevices(threads=resources.task_cpus(spark), on_gpus=resources.task_gpus(spark) > 0,
                           pin_cores=resources.is_local_master(spark))
    gpus = resources.driver_gpus(spark)
    cores = resources.driver_cores()
    if placement.size > cores:
        logger.warning(
            "np=-%d starts %d training processes on a driver with %d cores: they will compete for them. "
            "Use np>=-%d, or np>0 to run on executors", placement.size, placement.size, cores, cores,
        )
    per_rank = tuple((gpu,) for gpu in gpus[: placement.size]) if len(gpus) >= placement.size else ()
    return RankDevices(threads=max(1, cores // placement.size), on_gpus=bool(per_rank), driver_gpus=per_rank,
                       pin_cores=True)
