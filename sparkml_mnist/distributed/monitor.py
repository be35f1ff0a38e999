"""The driver's stall watchdog: decides, from heartbeats and progress counters, which rank stalled.

Each rank's training process sends a heartbeat every second with a progress counter that moves
on every training batch (and on ``context.report_progress()``). Two ways a run stalls:

* a rank stops sending heartbeats (process stopped, frozen, machine gone): that rank is named;
* heartbeats keep coming but no rank's counter moved: the ranks behind the others are named
  (the ones ahead are waiting for them in a collective); if none is behind, all unfinished ranks.
  Only a run whose ranks report progress at all is judged this way: a function that never reports
  (a custom loop written for HorovodRunner) is judged by its heartbeats, not killed for silence.

Nothing is judged before the first rank reports (earlier stages, e.g. the data shuffle, may run
for long), and ranks that finished are never blamed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

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


class ProgressMonitor:
    """Tracks every rank's heartbeats; ``check`` returns a verdict once the run stalled."""

    def __init__(self, size: int, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self.timeout_s = timeout_s
        self._clock = clock
        self._ranks = [_RankState() for _ in range(size)]
        self._first_seen: float | None = None
        self._last_progress: float | None = None
        self._lock = threading.Lock()
        self.verdict: StallVerdict | None = None

    def heartbeat(self, rank: int, progress: int, done: bool = False, host: str | None = None) -> None:
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
            state.host = host or state.host

    def check(self) -> StallVerdict | None:
        """Judge the run now; the first verdict sticks."""
        now = self._clock()
        with self._lock:
            if self.verdict is not None or self._first_seen is None:
                return self.verdict
            waiting = [rank for rank, state in enumerate(self._ranks) if not state.done]
            silent = [
                rank for rank in waiting
                if now - (self._ranks[rank].last_heartbeat or self._first_seen) > self.timeout_s
            ]
            if silent:
                never = all(self._ranks[rank].last_heartbeat is None for rank in silent)
                reason = (
                    "never started: its training process sent no heartbeat" if never
                    else "stopped sending heartbeats (its process is stopped, frozen or unreachable)"
                )
                self.verdict = self._verdict(silent, reason)
            elif (
                waiting
                and any(state.progress > 0 for state in self._ranks)
                and now - (self._last_progress or self._first_seen) > self.timeout_s
            ):
                lowest = min(self._ranks[rank].progress for rank in waiting)
                behind = [rank for rank in waiting if self._ranks[rank].progress == lowest]
                ahead = any(state.progress > lowest for state in self._ranks)
                reason = (
                    f"made no progress (stuck at progress {lowest} while other ranks were further and waiting "
                    "for it)" if ahead else f"made no progress (all unfinished ranks stuck at progress {lowest})"
                )
                self.verdict = self._verdict(behind, reason)
            return self.verdict

    def _verdict(self, ranks: list[int], reason: str) -> StallVerdict:
        return StallVerdict(ranks=ranks, hosts=[self._ranks[rank].host for rank in ranks], reason=reason)

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
