"""How a run treats slow, silent and failed ranks: timeouts and retries, in one object.

The driver's watchdog, the channel and the backends read their limits from here; a rank gets the same
object in its spec. Checked once, when it is made.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparkml_mnist.errors import ConfigError

NO_COLLECTIVE_TIMEOUT = 0.0  # collective_timeout_s: no per-collective timeout (the watchdog ends a hung one)


@dataclass(frozen=True)
class FailurePolicy:
    """``progress_timeout_s``: a rank that sends no heartbeat for this long, or an attempt whose ranks
    report progress but none moved for this long, is ended with a ``RankStalledError`` naming the
    rank(s); it must exceed the slowest step and any rank-0-only work. ``startup_timeout_s`` (default:
    the same) bounds the time until every rank's first heartbeat. ``collective_timeout_s`` (default:
    ``progress_timeout_s``) bounds each collective of the backend; ``NO_COLLECTIVE_TIMEOUT`` turns that
    off for a function that reports progress every step, since under tf each timed collective keeps a
    sleeping thread for the whole timeout. ``max_retries``: attempts after the first, each resuming
    from the last checkpoints. ``executor_wait_s``: how long the pre-flight waits for executors.
    """

    progress_timeout_s: float = 600.0
    startup_timeout_s: float | None = None
    collective_timeout_s: float | None = None
    heartbeat_interval_s: float = 1.0
    max_retries: int = 2
    executor_wait_s: float = 60.0

    def __post_init__(self) -> None:
        if self.progress_timeout_s <= self.heartbeat_interval_s:
            raise ConfigError(f"progress_timeout_s ({self.progress_timeout_s}) must exceed heartbeat_interval_s "
                              f"({self.heartbeat_interval_s})")
        if self.startup_timeout_s is not None and self.startup_timeout_s <= self.heartbeat_interval_s:
            raise ConfigError(f"startup_timeout_s ({self.startup_timeout_s}) must exceed heartbeat_interval_s "
                              f"({self.heartbeat_interval_s})")
        if self.collective_timeout_s is not None and self.collective_timeout_s < 0:
            raise ConfigError(f"collective_timeout_s must be >= 0 (0: no per-collective timeout), got "
                              f"{self.collective_timeout_s}")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ConfigError(f"max_retries must be a whole number >= 0, got {self.max_retries!r}")
        if self.executor_wait_s < 0:
            raise ConfigError(f"executor_wait_s must be >= 0, got {self.executor_wait_s}")

    @property
    def startup_limit_s(self) -> float:
        return self.startup_timeout_s if self.startup_timeout_s is not None else self.progress_timeout_s

    @property
    def collective_limit_s(self) -> float | None:
        """Seconds each collective may take; None: no limit."""
        limit = self.collective_timeout_s if self.collective_timeout_s is not None else self.progress_timeout_s
        return None if limit == NO_COLLECTIVE_TIMEOUT else limit

    @property
    def driver_loss_timeout_s(self) -> float:
        """The driver unreachable this long: a rank gives up."""
        return self.progress_timeout_s
