"""The driver's stall watchdog: decides, from heartbeats and progress counters, which rank stalled.

It is armed when an attempt is launched. Each rank's training process sends a heartbeat every
second with a progress counter that moves on every training batch (``ProgressCallback``,
``LogCallback``, ``context.report()``). Three ways an attempt stalls:

* a rank never sends a heartbeat within ``startup_timeout_s`` (of the launch, or of the first rank
  that did): the rank is named; when no rank at all reached the driver, the message says so;
* a rank stops sending heartbeats (process stopped, frozen, machine gone): that rank is named;
* heartbeats keep coming but no rank's counter moved: the ranks behind the others are named
  (the ones ahead are waiting for them in a collective); if none is behind, all unfinished ranks.
  Only a run whose ranks report progress at all is judged this way: a function that never reports
  (a custom loop written for HorovodRunner) is judged by its heartbeats, not killed for silence.

Ranks that finished are never blamed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from sparkml_mnist.launcher.protocol import Heartbeat

WATCHDOG_POLL_S = 0.5


@dataclass
class _RankState:
    host: str = "?"
    last_heartbeat: float | None = None
    progress: int = -1
    done: bool = False


@dataclass(frozen=True)
class StallVerdict:
    ranks: list[int]
    hosts: list[str]
    reason: str
    setting: str = "progress_timeout_s"  # the limit that was passed, named in the error
    limit_s: float = 0.0


class Watchdog:
    """Tracks every rank's heartbeats; ``check`` returns a verdict once the attempt stalled."""

    def __init__(self, size: int, timeout_s: float, clock: Callable[[], float] = time.monotonic,
                 startup_timeout_s: float | None = None, driver_address: str = "the driver") -> None:
        self.size = size
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s if startup_timeout_s is not None else timeout_s
        self.driver_address = driver_address
        self._clock = clock
        self._ranks = [_RankState() for _ in range(size)]
        self._launched_at = clock()
        self._first_seen: float | None = None
        self._last_progress: float | None = None
        self._tasks_started = 0
        self._lock = threading.Lock()
        self.verdict: StallVerdict | None = None

    def task_started(self, rank: int, host: str | None = None) -> None:
        """A barrier task reached the driver (before its rank's process exists)."""
        with self._lock:
            self._tasks_started += 1
            if host:
                self._ranks[rank].host = host

    def heartbeat(self, rank: int, beat: Heartbeat) -> None:
        progress, done, host = beat.progress, beat.done, beat.host
        now = self._clock()
        with self._lock:
            state = self._ranks[rank]
            if self._first_seen is None:
                self._first_seen = now
            if state.last_heartbeat is None or progress > state.progress or (done and not state.done):
                self._last_progress = now
            state.last_heartbeat = now
            state.progress = max(state.progress, progress)
            state.done = state.done or done
            state.host = host if host != "?" else state.host

    def check(self) -> StallVerdict | None:
        """Judge the attempt now; the first verdict sticks."""
        now = self._clock()
        with self._lock:
            if self.verdict is None:
                self.verdict = self._judge(now)
            return self.verdict

    def _judge(self, now: float) -> StallVerdict | None:
        waiting = [rank for rank, state in enumerate(self._ranks) if not state.done]
        never = [rank for rank in waiting if self._ranks[rank].last_heartbeat is None]
        since = self._first_seen if self._first_seen is not None else self._launched_at
        if never and now - since > self.startup_timeout_s:
            if self._first_seen is None and self._tasks_started == 0:
                reason = (f"never reached the driver at {self.driver_address}: no barrier task started or none could "
                          "connect (are there free task slots? can executors reach spark.driver.host?)")
            else:
                reason = "never started: its training process sent no heartbeat"
            return self._verdict(never, reason, "startup_timeout_s", self.startup_timeout_s)
        seen = [rank for rank in waiting if rank not in never]
        silent = [rank for rank in seen if now - (self._ranks[rank].last_heartbeat or since) > self.timeout_s]
        if silent:
            return self._verdict(
                silent, "stopped sending heartbeats (its process is stopped, frozen or unreachable)",
                "progress_timeout_s", self.timeout_s,
            )
        reports = any(state.progress > 0 for state in self._ranks)
        if seen and reports and now - (self._last_progress or since) > self.timeout_s:
            lowest = min(self._ranks[rank].progress for rank in seen)
            behind = [rank for rank in seen if self._ranks[rank].progress == lowest]
            ahead = any(state.progress > lowest for state in self._ranks)
            reason = (
                f"made no progress (stuck at progress {lowest} while other ranks were further and waiting "
                "for it)" if ahead else f"made no progress (all unfinished ranks stuck at progress {lowest})"
            )
            return self._verdict(behind, reason, "progress_timeout_s", self.timeout_s)
        return None

    def _verdict(self, ranks: list[int], reason: str, setting: str, limit_s: float) -> StallVerdict:
        return StallVerdict(ranks=ranks, hosts=[self._ranks[rank].host for rank in ranks], reason=reason,
                            setting=setting, limit_s=limit_s)

    def watch(self, on_stall: Callable[[StallVerdict], None]) -> Callable[[], None]:
        """Check in a background thread, call ``on_stall`` once; returns a function that stops it."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(WATCHDOG_POLL_S):
                verdict = self.check()
                if verdict is not None:
                    on_stall(verdict)
                    return

        thread = threading.Thread(target=loop, name="sparkml-mnist-watchdog", daemon=True)
        thread.start()

        def stop_watching() -> None:
            stop.set()
            thread.join()

        return stop_watching
